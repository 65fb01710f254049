"""Next-generation reservoir computing (reservoirpy's NVAR), lifted into torch for hooks.

An NVAR (Gauthier et al. 2021, "Next generation reservoir computing", Nature Communications
12:5564) replaces the random recurrent reservoir of an echo-state network by a delay line
and polynomial features: at step t the linear features are the current and k-1 delayed
inputs, O_lin = u_t (+) u_{t-s} (+) ... (+) u_{t-(k-1)s}, and the nonlinear features are
every unique monomial of order n of O_lin; a ridge readout (reservoirpy's `Ridge`) maps
O_lin (+) O_nonlin to the answer. Here u_t is the one-hot token, the delay k is the task's
length (the model sees the whole sequence at the answer position) and strides s = 1.

reservoirpy's `NVAR` node (Trouvain et al. 2020) is the oracle: `reservoirpy_features` runs
it, and the tests check `NVARNet` (float64 torch, same features in the same order) against
it to 1e-9. Mind its delay line: `NVAR.store` is not part of the node's state, so
`reset()` does not clear it and the series of a multi-series `run` leak into one another;
`reservoirpy_features` clears it before every sequence.

The number of monomials grows as C(k*V + n - 1, n); the order is 2 (pairwise products of
inputs) except on recall, whose 9 x 16 one-hot inputs would give 10,440 quadratic features
and a ridge solve too slow for this machine, so recall uses order 1 (a linear
autoregression: a finding that it cannot bind keys to values, not a bug). Measured: order
3 learns parity (the XOR of 3 bits is a degree-3 polynomial; held-out 1.0) but its 6,578
features per position take several GB per technique cell, so it is not the default;
`for_task(task, seed, order=3)` builds it.

Hook points:

    input          (batch, pos, vocab)            the one-hot input u_t (role embed)
    nvar.delay     (batch, pos, delay, vocab)     the delay line at step t, newest first
                                                  (role state: replacing it at step t changes
                                                  the features of steps t .. t+k-1)
    nvar.features  (batch, pos, features)         O_lin (+) O_nonlin (role stream: what the
                                                  readout reads)
    logits         (batch, pos, vocab)            readout at every step
"""

from __future__ import annotations

import itertools
from math import comb
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Hook, Site, hook
from archbench.adapters.reservoir import ReservoirAdapter
from archbench.hooks import HookPoint
from archbench.stepwise import StepHookPoint, StepSite


class NVARNet(nn.Module):
    """tokens (B, T) -> logits (B, T, V): reservoirpy's NVAR features + linear readout."""

    def __init__(self, delay: int, order: int, strides: int, vocab_size: int):
        super().__init__()
        linear = delay * vocab_size
        self.delay, self.order, self.strides, self.vocab_size = delay, order, strides, vocab_size
        # reservoirpy's monomial order: combinations with replacement of the linear features
        idx = list(itertools.combinations_with_replacement(range(linear), order))
        self.register_buffer("monomials", torch.tensor(idx, dtype=torch.long).view(-1, order))  # (M, n)
        n_features = linear + comb(linear + order - 1, order)
        self.W_out = nn.Parameter(torch.zeros(n_features, vocab_size, dtype=torch.float64))  # (F, V)
        self.b_out = nn.Parameter(torch.zeros(vocab_size, dtype=torch.float64))  # (V,)
        self.hook_input = HookPoint()
        self.hook_delay = StepHookPoint()
        self.hook_features = HookPoint()
        self.hook_logits = HookPoint()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        u = self.hook_input(F.one_hot(tokens, self.vocab_size).to(torch.float64))  # (B, T, V)
        B, T, V = u.shape
        line = u.new_zeros(B, self.delay * self.strides, V)  # (B, k*s, V) delay line, newest first
        lines = []
        for t in range(T):
            line = torch.cat([u[:, t, None], line[:, :-1]], dim=1)  # (B, k*s, V): np.roll + store
            line = self.hook_delay(line, t, T)
            lines.append(line)
        lin = torch.stack(lines, dim=1)[:, :, ::self.strides].flatten(2)  # (B, T, k*V)
        nonlin = lin[..., self.monomials[:, 0]]  # (B, T, M): one factor at a time keeps
        for j in range(1, self.order):             # memory at (B, T, M), not (B, T, M, order)
            nonlin = nonlin * lin[..., self.monomials[:, j]]
        feats = self.hook_features(torch.cat([lin, nonlin], dim=-1))  # (B, T, F)
        return self.hook_logits(feats @ self.W_out + self.b_out)  # (B, T, V)


class NVARAdapter(ReservoirAdapter):
    """reservoirpy's NVAR + Ridge; training is the ridge fit inherited from the ESN adapter."""

    family = "nvar"
    control_shares_representation = True  # only the ridge readout is trained
    capabilities = frozenset({"gradients", "recurrent_state"})
    default_config = {"order": 2, "strides": 1}
    train_config = {"n_train": 4096, "ridge": 1e-4}
    task_model_config = {"recall": {"order": 1}}
    task_train_config: dict[str, dict[str, Any]] = {}

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> NVARNet:
        """The NVAR's features have no random parameters; the control's readout is random."""
        net = NVARNet(config["seq_len"], config["order"], config["strides"], config["vocab_size"])
        with torch.no_grad():
            F_, V = net.W_out.shape
            net.W_out.copy_(torch.randn(F_, V, dtype=torch.float64) / F_ ** 0.5)
        return net

    def hooks(self) -> list[Hook]:
        m = self.model
        return [hook("input", "embed", ("batch", "pos", "vocab"), 0, Site(m.hook_input)),
                hook("nvar.delay", "state", ("batch", "pos", "delay", "vocab"), 1, StepSite(m.hook_delay)),
                hook("nvar.features", "stream", ("batch", "pos", "features"), 2, Site(m.hook_features)),
                hook("logits", "logits", ("batch", "pos", "vocab"), 3, Site(m.hook_logits))]

    # ---- reservoirpy, the oracle -------------------------------------------------------
    def to_reservoirpy(self):
        """(NVAR, Ridge) reservoirpy nodes with this organism's delay, order and readout."""
        from reservoirpy.nodes import NVAR, Ridge

        m = self.model
        nvar = NVAR(delay=m.delay, order=m.order, strides=m.strides)
        nvar.initialize(np.zeros((1, m.vocab_size)))
        ridge = Ridge(Wout=m.W_out.detach().numpy().copy(), bias=m.b_out.detach().numpy().copy())
        ridge.initialize(np.zeros((1, m.W_out.shape[0])))
        return nvar, ridge

    def reservoirpy_states(self, tokens: torch.Tensor, res=None) -> np.ndarray:
        """reservoirpy's own NVAR features: (n, T) tokens -> (n, T, features).

        Each sequence runs from an empty delay line: `NVAR.store` survives `reset()` and
        multi-series runs, so it is cleared by hand before every sequence.
        """
        nvar = self.to_reservoirpy()[0] if res is None else res
        out = []
        for series in self._onehot(tokens):  # (T, V)
            nvar.store = np.zeros_like(nvar.store)
            nvar.reset()
            out.append(nvar.run(series))
        return np.stack(out)  # (n, T, F)
