"""Kolmogorov-Arnold networks (pykan's `KAN` / `MultKAN`) as a non-sequence family.

A KAN puts a learnable univariate function on every edge (a B-spline plus a scaled SiLU
base) and sums the edges at each node (Liu et al. 2024, "KAN: Kolmogorov-Arnold Networks";
Liu et al. 2024, "KAN 2.0"). It has no notion of position: the whole token sequence enters
at once as a flattened one-hot vector (T * V inputs) and the answer comes out once, so
`forward` returns logits of shape (batch, 1, vocab); the answer is read at the last (the
only) position.

Hook points. `KANNet` wraps the pykan model and re-runs its layer loop (verified equal to
`MultKAN.forward` in the tests) so that every quantity passes through a `HookPoint`:

    input            (batch, pos, vocab)        the one-hot tokens, before flattening
    blocks.{i}.edges (batch, pos, out, in)      per-edge activations phi_{i,o,j}(x_j); the
                                                node value is their sum over `in`, so a
                                                replaced edge changes the output
    blocks.{i}.out   (batch, pos, width_{i+1})  node values after layer i (affine included)
    logits           (batch, 1, vocab)          the model output (= blocks.{L-1}.out)

Scalar inputs (model config `"input": "value"`; the default `"onehot"` is the above,
unchanged). For tasks whose tokens stand for numbers (`regression`: each input token is one
quantised variable x on [-1, 1]) the KAN takes the T scalars themselves, as in the paper,
and returns one scalar y_hat; pykan's symbolic fitting is only meaningful on such inputs.
`for_task` reads from the task (it must expose `token_values`, `bin_centres`, `bin_width`)
and stores in the model config, so a loaded organism needs no task: `value_table` (the x of
each token id, 0 for ids that are never inputs), `readout_tokens` (the answer token of each
bin), `readout_centres` (each bin's centre c_b) and `readout_width` (the bin width w). The
width is [T, *hidden, 1], and a fixed readout (no parameters) maps y_hat to logits:

    logit_b = -(y_hat - c_b)^2 / tau,   tau = config["tau"] * w^2   for answer tokens b
    logit   = NON_ANSWER_LOGIT (-1e9)                                for every other token

so the argmax is the bin whose centre is nearest to y_hat (with equal-width bins, the bin
that holds y_hat) and every technique reads logits as usual; `predict_values` gives y_hat
itself. Shapes in this mode: `input` (batch, pos, 1) the scalars x, `blocks.{i}.edges`
(batch, pos, out, in), `blocks.{i}.out` (batch, pos, width_{i+1}) with the last one
(batch, pos, 1) = y_hat at the answer position, `logits` (batch, 1, vocab) the readout.

Training in value mode is `fit` with one change of loss (`KANAdapter.loss`): the softmax
over the bins is extended by `guard_bins` (3) phantom bins beyond each end, which are no
tokens. Cross-entropy pulls y_hat to its bin's centre (a smooth KAN then fits the smooth y
through the staircase of centres), but over the real bins alone the first and last bins'
probability grows without bound past their centre, which drove y_hat of the lowest bin to
-4 where y is 0.5 (R^2 of y_hat -2.0 at bin accuracy 0.98); with the phantom bins R^2 was
0.998. On `regression` the loss also carries pykan's sparsity regulariser (`lamb`, see
`task_train_config`), as the paper trains a KAN it means to read as a formula.

Alignment of non-sequence activations. The techniques read activations at
`task.primary_position` (the last position) and patch at every position 0..T-1, so the
internal activations are aligned to the token sequence: canonical tensors have pos = T,
the value sits at the answer position T-1 and earlier positions hold zeros (nothing is
computed there). An edit is read back from position T-1 only; an intervention that touches
only earlier positions has no effect. `input` is genuinely per position.

pykan side effects. pykan writes `./model/` on construction and on every `log_history`
unless told not to: the model is built with `auto_save=False`, `log_history` is replaced by a
no-op and `ckpt_path` points into a temporary directory (`prune`/`refine` build new models
with `auto_save=True` and would write there, not in the working directory). `MultKAN`
reseeds torch, numpy and `random` globally; the adapter derives pykan's seed from the torch
generator and restores numpy's and `random`'s state afterwards.

pykan's own interpretability is exposed as methods: `feature_scores` (pykan's attribution
scores, `MultKAN.attribute`, reshaped to (pos, vocab) and summed per position) and
`symbolic` (auto_symbolic on a copy, returning sympy formulas). Symbolic edges bypass
`KANLayer` (and hooks on it); `KANNet` adds the symbolic branch into `blocks.{i}.edges`, so
the edge hook sees both branches.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Hook, Site, hook
from archbench.hooks import HookPoint

CKPT_PATH = os.path.join(tempfile.gettempdir(), "archbench-pykan")  # never the working dir
NON_ANSWER_LOGIT = -1e9  # value mode: the logit of every token that is not an answer bin


def _no_history(*args, **kwargs) -> None:
    """Stands in for `MultKAN.log_history`, which writes checkpoints to `ckpt_path`."""


def _drop_saved_acts(kan) -> None:
    """Forget the activations `MultKAN.forward` saved (save_act), so copies stay small."""
    kan.acts = None
    kan.cache_data = None
    for name in ("acts_premult", "spline_preacts", "spline_postsplines", "spline_postacts", "acts_scale",
                 "acts_scale_spline", "subnode_actscale", "edge_actscale"):
        setattr(kan, name, [])


def make_kan(width: list[int], grid: int, k: int, seed: int):
    """A pykan MultKAN that never touches the filesystem, seeded without global side effects."""
    from kan import KAN

    np_state, py_state = np.random.get_state(), random.getstate()
    torch_state = torch.random.get_rng_state()
    try:
        kan = KAN(width=list(width), grid=grid, k=k, seed=seed, noise_scale=0.0, auto_save=False,
                  save_act=False, symbolic_enabled=False, ckpt_path=CKPT_PATH)
        # pykan fits its initial spline noise with a batched least-squares solve that is not
        # bit-reproducible on CPU (~1e-8 between identical builds); draw the same noise
        # (0.3 / grid, pykan's default scale) directly in coefficient space instead.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in kan.act_fun:
                layer.coef.copy_((torch.rand(layer.coef.shape, generator=gen) - 0.5) * 0.3 / grid)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.random.set_rng_state(torch_state)
    kan.log_history = _no_history
    return kan


class KANNet(nn.Module):
    """pykan's KAN layer loop with HookPoints: tokens (B, T) -> logits (B, 1, V).

    Mirrors `MultKAN.forward` for sum-only widths (no multiplication nodes): per layer,
    `KANLayer` gives the per-edge post-activations; the symbolic branch is added when
    enabled; nodes are the sum over inputs, then the subnode and node affine maps.
    """

    def __init__(self, kan, seq_len: int, vocab_size: int, readout: dict[str, Any] | None = None):
        super().__init__()
        if any(w[1] for w in kan.width):
            raise ValueError("KANNet supports sum nodes only (no multiplication nodes)")
        self.kan = kan
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.value_input = readout is not None
        if self.value_input:  # fixed tables, not parameters: rebuilt from the config, never saved
            dtype = kan.act_fun[0].coef.dtype
            centre = torch.zeros(vocab_size, dtype=dtype)  # (V,)
            centre[readout["readout_tokens"]] = torch.tensor(readout["readout_centres"], dtype=dtype)
            is_answer = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
            is_answer[readout["readout_tokens"]] = True
            self.register_buffer("value_table", torch.tensor(readout["value_table"], dtype=dtype), persistent=False)
            self.register_buffer("centre", centre, persistent=False)
            self.register_buffer("is_answer", is_answer, persistent=False)
            self.tau = float(readout.get("tau", 1.0)) * float(readout["readout_width"]) ** 2
            bin_of = torch.full((vocab_size,), -1, dtype=torch.long)  # (V,) bin index of an answer token
            bin_of[readout["readout_tokens"]] = torch.arange(len(readout["readout_tokens"]))
            self.register_buffer("bin_of", bin_of, persistent=False)
            # the training loss's centres: the bins plus `guard_bins` phantom bins beyond each end
            guard, width = int(readout.get("guard_bins", 3)), float(readout["readout_width"])
            centres = torch.tensor(readout["readout_centres"], dtype=dtype)  # (C,)
            steps = torch.arange(1, guard + 1, dtype=dtype) * width  # (guard,)
            self.register_buffer("loss_centres", torch.cat([centres[0] - steps.flip(0), centres,
                                                            centres[-1] + steps]), persistent=False)  # (C+2g,)
            self.guard = guard
        self.hook_input = HookPoint()
        self.hook_edges = nn.ModuleList(HookPoint() for _ in range(kan.depth))
        self.hook_out = nn.ModuleList(HookPoint() for _ in range(kan.depth))
        self.hook_logits = HookPoint()

    def flat_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) long -> the input pykan sees: (B, T*V) one-hot, or (B, T) values."""
        if self.value_input:
            return self.value_table[tokens]  # (B, T)
        dtype = self.kan.act_fun[0].coef.dtype
        return F.one_hot(tokens, self.vocab_size).to(dtype).flatten(1)

    def readout(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Value mode: (B, 1) y_hat -> (B, V) logits, -(y_hat - c_b)^2 / tau on answer tokens."""
        score = -(y_hat - self.centre[None, :]) ** 2 / self.tau  # (B, V)
        return torch.where(self.is_answer[None, :], score, score.new_full((), NON_ANSWER_LOGIT))  # (B, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.body(tokens)  # (B, V), or (B, 1) y_hat in value mode
        if self.value_input:
            x = self.readout(x)  # (B, 1) y_hat -> (B, V)
        return self.hook_logits(x[:, None, :])  # (B, 1, V)

    def body(self, tokens: torch.Tensor) -> torch.Tensor:
        """The KAN itself, through every hook but the logits: (B, T) -> (B, width_L)."""
        kan = self.kan
        if self.value_input:
            x = self.hook_input(self.value_table[tokens][..., None]).flatten(1)  # (B, T, 1) -> (B, T)
        else:
            onehot = F.one_hot(tokens, self.vocab_size).to(kan.act_fun[0].coef.dtype)  # (B, T, V)
            x = self.hook_input(onehot).flatten(1)  # (B, T*V)
        for l in range(kan.depth):
            _, _, edges, _ = kan.act_fun[l](x)  # (B, out, in)
            if kan.symbolic_enabled:
                edges = edges + kan.symbolic_fun[l](x)[1]  # (B, out, in): symbolic branch
            edges = self.hook_edges[l](edges)  # (B, out, in)
            # Sum over inputs in KANLayer's own memory layout (B, in, out), so the result is
            # bit-identical to pykan's forward when no symbolic edge is active.
            x = edges.permute(0, 2, 1).sum(1)  # (B, out)
            x = kan.subnode_scale[l][None, :] * x + kan.subnode_bias[l][None, :]
            x = kan.node_scale[l][None, :] * x + kan.node_bias[l][None, :]
            x = self.hook_out[l](x)  # (B, out)
        return x  # (B, width_L)


def _aligned(seq_len: int):
    """Maps between a per-example activation (B, *f) and its canonical (B, T, *f) form."""

    def to_canonical(raw: torch.Tensor) -> torch.Tensor:
        out = raw.new_zeros(raw.shape[0], seq_len, *raw.shape[1:])  # (B, T, *f)
        out[:, -1] = raw  # the answer position; earlier positions hold zeros
        return out

    def from_canonical(act: torch.Tensor) -> torch.Tensor:
        return act[:, -1].contiguous()  # (B, *f): only the answer position is read back

    return to_canonical, from_canonical


class KANAdapter(Adapter):
    family = "kan"
    capabilities = frozenset({"gradients", "trainable"})
    default_config = {"hidden": [16], "grid": 3, "k": 3}

    @classmethod
    def scaled_config(cls, d_model, n_layers):
        """The scale axis: d_model is the hidden layers' width over 4 (16 hidden nodes stand for
        d_model 64, the other families' default), n_layers the number of KAN layers (hidden
        layers + 1; the default [16] is 2 layers)."""
        hidden = cls.default_config["hidden"]
        width = hidden[0] if d_model is None else max(1, d_model // 4)
        layers = len(hidden) + 1 if n_layers is None else n_layers
        return {"hidden": [width] * (layers - 1)}
    train_config = {**Adapter.train_config, "steps": 1500, "lr": 1e-2, "weight_decay": 0.0,
                    "batch": 128, "warmup": 20}
    # regression: pykan's sparsity regulariser (MultKAN.fit's `lamb`, with its lamb_l1 and
    # lamb_entropy defaults) on top of the cross-entropy, as the paper trains for
    # interpretability. Measured on exp(sin(pi x1) + x2^2), seed 0: at lamb 0.001 and 0.01
    # all 5 hidden nodes keep pykan attribution scores 0.1-0.4 (a formula of 5 summed
    # paths); at 0.1 one node carries the function (score 1.0, the others 0.00) and bin
    # accuracy stays 0.96; at 0.5 training fails (0.09).
    task_train_config: dict[str, dict[str, Any]] = {
        "regression": {"lamb": 0.1, "lamb_l1": 1.0, "lamb_entropy": 2.0}}
    # regression: scalar inputs and the [2, 5, 1] KAN the paper starts its exp(sin(pi x) + y^2)
    # example from (Liu et al. 2024, Fig. 2.4); grid 5, finer than the one-hot default's 3
    task_model_config = {"regression": {"input": "value", "hidden": [5], "grid": 5, "tau": 1.0, "guard_bins": 3}}

    @classmethod
    def for_task(cls, task, seed: int, **overrides: Any) -> "KANAdapter":
        """As `Adapter.for_task`; in value mode the task's token values and bins go in the config."""
        config = {**cls.default_config, **cls.task_model_config.get(task.name, {}), **overrides}
        if config.get("input", "onehot") == "value":
            missing = [a for a in ("token_values", "bin_centres", "bin_width") if not hasattr(task, a)]
            if missing:
                raise ValueError(f"kan input 'value' needs a task with numeric tokens; {task.name} lacks "
                                 f"{', '.join(missing)}")
            overrides = {"value_table": task.token_values.tolist(),
                         "readout_tokens": task.answer_tokens().tolist(),
                         "readout_centres": task.bin_centres.tolist(),
                         "readout_width": float(task.bin_width), **overrides}
        return super().for_task(task, seed, **overrides)

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> KANNet:
        mode = config.get("input", "onehot")  # absent from older configs: one-hot
        if mode not in ("onehot", "value"):
            raise ValueError(f"kan input must be 'onehot' or 'value', not {mode!r}")
        seed = int(torch.randint(0, 2**31 - 1, ()))  # deterministic in the build seed
        if mode == "value":
            width = [config["seq_len"], *config["hidden"], 1]
            return KANNet(make_kan(width, config["grid"], config["k"], seed),
                          config["seq_len"], config["vocab_size"], readout=config)
        width = [config["seq_len"] * config["vocab_size"], *config["hidden"], config["vocab_size"]]
        return KANNet(make_kan(width, config["grid"], config["k"], seed),
                      config["seq_len"], config["vocab_size"])

    @property
    def value_input(self) -> bool:
        """True in value mode: the KAN reads one scalar per position and outputs y_hat."""
        return self.model.value_input

    @torch.no_grad()
    def predict_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """Value mode: the network's own y_hat, the output node before the readout: (n, T) -> (n,)."""
        if not self.value_input:
            raise ValueError("predict_values needs a KAN with scalar inputs (model config input='value')")
        return self.model.body(tokens)[:, 0]  # (n,)

    def loss(self, tokens: torch.Tensor, answer: torch.Tensor, cfg: dict[str, Any],
             gen: torch.Generator) -> torch.Tensor:
        """Cross-entropy of the answer; in value mode over the bins and the phantom guard bins.

        Value mode: the readout's softmax over centres c_1 - guard*w .. c_B + guard*w, of
        which only the real bins are tokens, plus `lamb` times pykan's regulariser
        (`MultKAN.reg`, 'edge_forward_spline_n': l1 and entropy of the edges' scales) when
        cfg sets lamb. Over the real bins alone (guard 0: exactly `Adapter.loss` on the
        logits, the non-answer tokens adding exp(-1e9) = 0) the first and last bins'
        probability grows without bound as y_hat leaves the range, and cross-entropy drove
        y_hat of the lowest bin of exp(sin(pi x1) + x2^2) to -4 where y is 0.5 (held-out bin
        accuracy 0.98, R^2 of y_hat -2.0); with phantom bins every bin's probability peaks
        at its own centre.
        """
        if not self.value_input:
            return super().loss(tokens, answer, cfg, gen)
        m, lamb = self.model, cfg.get("lamb", 0.0)
        if lamb:
            kan = m.kan
            kan.save_act = True  # MultKAN.forward then records each edge's scale for the regulariser
            try:
                y_hat = kan(m.flat_input(tokens))  # (batch, 1): equal to m.body (no symbolic edge yet)
                reg = kan.get_reg("edge_forward_spline_n", cfg["lamb_l1"], cfg["lamb_entropy"], 0.0, 0.0)
            finally:
                kan.save_act = False
                _drop_saved_acts(kan)
        else:
            y_hat, reg = m.body(tokens), 0.0  # (batch, 1)
        logits = -(y_hat - m.loss_centres[None, :]) ** 2 / m.tau  # (batch, C + 2 guard)
        return F.cross_entropy(logits, m.bin_of[answer] + m.guard) + lamb * reg

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)  # (B, 1, V)

    @property
    def kan(self):
        """The wrapped pykan MultKAN."""
        return self.model.kan

    def hooks(self) -> list[Hook]:
        to_c, from_c = _aligned(self.config["seq_len"])
        m, depth = self.model, self.kan.depth
        input_axes = ("batch", "pos", "value") if m.value_input else ("batch", "pos", "vocab")
        out = [hook("input", "embed", input_axes, 0, Site(m.hook_input))]
        for i in range(depth):
            out += [hook(f"blocks.{i}.edges", "mlp", ("batch", "pos", "out", "in"), i,
                         Site(m.hook_edges[i], to_canonical=to_c, from_canonical=from_c)),
                    hook(f"blocks.{i}.out", "stream", ("batch", "pos", "d_hidden"), i + 1,
                         Site(m.hook_out[i], to_canonical=to_c, from_canonical=from_c))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), depth + 1, Site(m.hook_logits))]

    # ---- pykan's own interpretability --------------------------------------------------
    @torch.no_grad()
    def feature_scores(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """pykan's attribution scores (`MultKAN.attribute`) on a batch of sequences.

        Returns `input` (T, V): the score of each (position, token) input ((T, 1) in value
        mode), `position` (T,): their sum per position (comparable to a task's relevance
        mask), and `edges`: pykan's per-layer edge scores, each (out, in).
        """
        kan = self.kan
        save_act = kan.save_act
        kan.save_act = True
        try:
            kan(self.model.flat_input(tokens))
            with torch.enable_grad():  # attribute builds its scores with requires_grad tensors
                kan.attribute(plot=False)
            scores = kan.node_scores[0].detach().view(self.config["seq_len"], -1)  # (T, V) or (T, 1)
            edges = [e.detach().clone() for e in kan.edge_scores]
        finally:
            kan.save_act = save_act
            kan.acts = None
            kan.cache_data = None
        return {"input": scores, "position": scores.sum(-1), "edges": edges}

    def symbolic(self, tokens: torch.Tensor, lib=("x", "x^2", "0"), r2_threshold: float = 0.0,
                 weight_simple: float = 0.8):
        """pykan's symbolic regression on a copy of the model (this organism is untouched).

        Returns (formulas, adapter): one sympy expression per output token in the input
        variables `x_{pos}_{token}` (in value mode: one expression, y_hat, in the variables
        `x_1` .. `x_T`, position t holding x_{t+1}), and an adapter around the symbolic
        copy (its edge hooks include the symbolic branch). Each edge gets the library
        function with the best pykan trade-off of fit (r2) and complexity (`weight_simple`,
        pykan's default 0.8), fitted to the edge's activations on `tokens`. On one-hot
        inputs every first-layer edge is exactly affine in its input (the input takes only
        the values 0 and 1), so `x` fits it with r2 = 1; deeper edges fit only as well as
        their splines allow. Cost grows with the number of edges (pykan fits each edge in
        Python).
        """
        import contextlib
        import io
        import warnings

        import sympy

        clone = type(self)(copy.deepcopy(self.model), self.config)
        kan = clone.kan
        kan.log_history = _no_history
        kan.save_act = True
        kan.symbolic_enabled = True
        with torch.no_grad():
            kan(clone.model.flat_input(tokens))
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pykan prints per edge, sympy warns
            kan.auto_symbolic(lib=list(lib), verbose=0, r2_threshold=r2_threshold, weight_simple=weight_simple)
            T, V = self.config["seq_len"], self.config["vocab_size"]
            if self.value_input:
                names = [sympy.Symbol(f"x_{t + 1}") for t in range(T)]
            else:
                names = [sympy.Symbol(f"x_{t}_{v}") for t in range(T) for v in range(V)]
            formulas, _ = kan.symbolic_formula(var=names)
        kan.save_act = False
        return formulas, clone
