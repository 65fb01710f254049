"""Echo-state networks (reservoirpy), lifted into torch for hooks and gradients.

An echo-state network is a fixed random recurrent reservoir with a trained linear readout
(Jaeger 2001, "The 'echo state' approach to analysing and training recurrent neural
networks"; Lukosevicius 2012, "A practical guide to applying echo state networks"). The
reservoir follows reservoirpy's update (`reservoirpy.nodes.Reservoir`, Trouvain et al. 2020,
"ReservoirPy: an efficient and user-friendly library to design echo state networks"):

    s_t = (1 - lr) * s_{t-1} + lr * tanh(W s_{t-1} + W_in u_t + b),   s_{-1} = 0

with u_t the one-hot token at step t; the readout is reservoirpy's `Ridge` (closed-form ridge
regression) fitted on the state at the last step against the one-hot answer. Training is
that ridge fit (`fit` overrides the base class's AdamW loop; the reservoir never changes).

reservoirpy is numpy, so its fitted weights are lifted into `ESNNet`, a float64 torch module
with the same update, in which hooks, interventions and gradients work. reservoirpy stays
the oracle: `reservoirpy_logits` runs reservoirpy's own nodes on the lifted weights and the
tests check the torch module against it (float64, <= 1e-9).

Hook points:

    input            (batch, pos, vocab)   the one-hot input u_t (role embed)
    reservoir.state  (batch, pos, units)   s_t per step (role state; it is also the only
                                           stream there is, and probes and patching read it)
    logits           (batch, pos, vocab)   readout applied at every step

`reservoir.state` is a `StepHookPoint` (`archbench.stepwise`): an intervention at step t
acts at step t only and the edited state is what step t+1 integrates, so steps < t are
unchanged and steps >= t change. The role table lists the reservoir state under both `stream` and
`state`; the role vocabulary gives one role per name, and `state` is what probes and
patching ask for alongside `stream`.

Measured (not a bug): ESNs sit at chance on running parity and counting mod m.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Hook, Site, TrainReport, hook
from archbench.hooks import HookPoint
from archbench.stepwise import StepHookPoint, StepSite, StepwiseAttach


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if hasattr(m, "toarray") else m, dtype=np.float64)


class ESNNet(nn.Module):
    """tokens (B, T) -> logits (B, T, V): reservoirpy's leaky tanh reservoir + linear readout."""

    def __init__(self, units: int, vocab_size: int):
        super().__init__()
        f64 = torch.float64
        self.W = nn.Parameter(torch.zeros(units, units, dtype=f64))  # recurrent (units, units)
        self.W_in = nn.Parameter(torch.zeros(units, vocab_size, dtype=f64))  # input (units, V)
        self.bias = nn.Parameter(torch.zeros(units, dtype=f64))  # (units,)
        self.register_buffer("lr", torch.ones((), dtype=f64))  # leak rate
        self.W_out = nn.Parameter(torch.zeros(units, vocab_size, dtype=f64))  # readout (units, V)
        self.b_out = nn.Parameter(torch.zeros(vocab_size, dtype=f64))  # (V,)
        self.vocab_size = vocab_size
        self.hook_input = HookPoint()
        self.hook_state = StepHookPoint()
        self.hook_logits = HookPoint()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        u = self.hook_input(F.one_hot(tokens, self.vocab_size).to(torch.float64))  # (B, T, V)
        B, T, _ = u.shape
        drive = u @ self.W_in.T + self.bias  # (B, T, units): W_in u_t + b for every step
        s = u.new_zeros(B, self.W.shape[0])  # (B, units)
        states = []
        for t in range(T):
            pre = torch.tanh(s @ self.W.T + drive[:, t])  # (B, units)
            s = (1 - self.lr) * s + self.lr * pre  # (B, units)
            s = self.hook_state(s, t, T)
            states.append(s)
        states = torch.stack(states, dim=1)  # (B, T, units)
        return self.hook_logits(states @ self.W_out + self.b_out)  # (B, T, V)


class ReservoirAdapter(StepwiseAttach, Adapter):
    family = "reservoir"
    control_shares_representation = True  # only the ridge readout is trained
    capabilities = frozenset({"gradients", "recurrent_state"})
    default_config = {"units": 300, "lr": 0.5, "sr": 0.9, "input_scaling": 1.0,
                      "input_connectivity": 0.5, "rc_connectivity": 0.1, "bias_scaling": 0.2}
    train_config = {"n_train": 8192, "ridge": 1e-4}
    task_train_config: dict[str, dict[str, Any]] = {}

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> ESNNet:
        """A reservoirpy reservoir (seeded from torch's generator) lifted into ESNNet.

        The readout of the random-init control is a small random matrix (the trained
        organism's comes from the ridge fit).
        """
        from reservoirpy.nodes import Reservoir

        units, V = config["units"], config["vocab_size"]
        seed = int(torch.randint(0, 2**31 - 1, ()))  # deterministic in the build seed
        rng = np.random.default_rng(seed)
        res = Reservoir(units, lr=config["lr"], sr=config["sr"], input_scaling=config["input_scaling"],
                        input_connectivity=config["input_connectivity"],
                        rc_connectivity=config["rc_connectivity"],
                        bias=config["bias_scaling"] * rng.uniform(-1, 1, units), seed=seed)
        res.initialize(np.zeros((1, V)))
        net = ESNNet(units, V)
        with torch.no_grad():
            net.W.copy_(torch.from_numpy(_dense(res.W)))
            net.W_in.copy_(torch.from_numpy(_dense(res.Win)))
            net.bias.copy_(torch.from_numpy(_dense(res.bias)))
            net.lr.fill_(float(res.lr))
            net.W_out.copy_(torch.randn(units, V, dtype=torch.float64) / units ** 0.5)
        return net

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)  # (B, T, V)

    def hooks(self) -> list[Hook]:
        m = self.model
        return [hook("input", "embed", ("batch", "pos", "vocab"), 0, Site(m.hook_input)),
                hook("reservoir.state", "state", ("batch", "pos", "units"), 1, StepSite(m.hook_state)),
                hook("logits", "logits", ("batch", "pos", "vocab"), 2, Site(m.hook_logits))]

    # ---- reservoirpy, the oracle -------------------------------------------------------
    def to_reservoirpy(self):
        """(Reservoir, Ridge) reservoirpy nodes holding this organism's weights."""
        from reservoirpy.nodes import Reservoir, Ridge

        m = self.model
        res = Reservoir(W=m.W.detach().numpy().copy(), Win=m.W_in.detach().numpy().copy(),
                        bias=m.bias.detach().numpy().copy(), lr=float(m.lr), activation="tanh")
        ridge = Ridge(Wout=m.W_out.detach().numpy().copy(), bias=m.b_out.detach().numpy().copy())
        res.initialize(np.zeros((1, m.vocab_size)))
        ridge.initialize(np.zeros((1, m.W.shape[0])))
        return res, ridge

    def _onehot(self, tokens: torch.Tensor) -> np.ndarray:
        return F.one_hot(tokens, self.model.vocab_size).double().numpy()  # (n, T, V)

    def reservoirpy_states(self, tokens: torch.Tensor, res=None) -> np.ndarray:
        """reservoirpy's own run: (n, T) tokens -> states (n, T, units), each series from s=0."""
        res = self.to_reservoirpy()[0] if res is None else res
        res.reset()
        return np.asarray(res.run(self._onehot(tokens)))

    def reservoirpy_logits(self, tokens: torch.Tensor) -> np.ndarray:
        """reservoirpy's own run of reservoir and readout: (n, T) -> (n, T, V)."""
        res, ridge = self.to_reservoirpy()
        states = self.reservoirpy_states(tokens, res)  # (n, T, units)
        return np.asarray(ridge.run(states))  # (n, T, V)

    def fit(self, task, seed: int, **overrides: Any) -> TrainReport:
        """reservoirpy's ridge readout on the last-step states; returns held-out accuracy."""
        from reservoirpy.nodes import Ridge

        cfg = {**self.train_config, **self.task_train_config.get(task.name, {}), **overrides}
        start = time.perf_counter()
        train = task.sample(cfg["n_train"], seed, "train")
        states = self.reservoirpy_states(train.tokens)[:, -1]  # (n, units)
        target = F.one_hot(train.answer, self.model.vocab_size).double().numpy()  # (n, V)
        ridge = Ridge(ridge=cfg["ridge"]).fit(states, target)
        with torch.no_grad():
            self.model.W_out.copy_(torch.from_numpy(np.asarray(ridge.Wout, dtype=np.float64)))
            self.model.b_out.copy_(torch.from_numpy(np.asarray(ridge.bias, dtype=np.float64).reshape(-1)))
        self.model.eval()
        seconds = time.perf_counter() - start
        return TrainReport(accuracy=self.accuracy(task.sample(1024, seed, "test")), steps=1,
                           seconds=seconds,
                           train_accuracy=self.accuracy(task.sample(1024, seed, "train")),
                           history=[{"step": 1, "ridge": cfg["ridge"]}])
