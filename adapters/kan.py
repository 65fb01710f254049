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


def _no_history(*args, **kwargs) -> None:
    """Stands in for `MultKAN.log_history`, which writes checkpoints to `ckpt_path`."""


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

    def __init__(self, kan, seq_len: int, vocab_size: int):
        super().__init__()
        if any(w[1] for w in kan.width):
            raise ValueError("KANNet supports sum nodes only (no multiplication nodes)")
        self.kan = kan
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.hook_input = HookPoint()
        self.hook_edges = nn.ModuleList(HookPoint() for _ in range(kan.depth))
        self.hook_out = nn.ModuleList(HookPoint() for _ in range(kan.depth))
        self.hook_logits = HookPoint()

    def flat_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) long -> (B, T*V) float: the input pykan sees."""
        dtype = self.kan.act_fun[0].coef.dtype
        return F.one_hot(tokens, self.vocab_size).to(dtype).flatten(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kan = self.kan
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
        return self.hook_logits(x[:, None, :])  # (B, 1, V)


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
    train_config = {**Adapter.train_config, "steps": 1500, "lr": 1e-2, "weight_decay": 0.0,
                    "batch": 128, "warmup": 20}
    task_train_config: dict[str, dict[str, Any]] = {}

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> KANNet:
        width = [config["seq_len"] * config["vocab_size"], *config["hidden"], config["vocab_size"]]
        seed = int(torch.randint(0, 2**31 - 1, ()))  # deterministic in the build seed
        return KANNet(make_kan(width, config["grid"], config["k"], seed),
                      config["seq_len"], config["vocab_size"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)  # (B, 1, V)

    @property
    def kan(self):
        """The wrapped pykan MultKAN."""
        return self.model.kan

    def hooks(self) -> list[Hook]:
        to_c, from_c = _aligned(self.config["seq_len"])
        m, depth = self.model, self.kan.depth
        out = [hook("input", "embed", ("batch", "pos", "vocab"), 0, Site(m.hook_input))]
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

        Returns `input` (T, V): the score of each (position, token) input, `position` (T,):
        their sum per position (comparable to a task's relevance mask), and `edges`: pykan's
        per-layer edge scores, each (out, in).
        """
        kan = self.kan
        save_act = kan.save_act
        kan.save_act = True
        try:
            kan(self.model.flat_input(tokens))
            with torch.enable_grad():  # attribute builds its scores with requires_grad tensors
                kan.attribute(plot=False)
            scores = kan.node_scores[0].detach().view(self.config["seq_len"], self.config["vocab_size"])
            edges = [e.detach().clone() for e in kan.edge_scores]
        finally:
            kan.save_act = save_act
            kan.acts = None
            kan.cache_data = None
        return {"input": scores, "position": scores.sum(-1), "edges": edges}

    def symbolic(self, tokens: torch.Tensor, lib=("x", "x^2", "0"), r2_threshold: float = 0.0):
        """pykan's symbolic regression on a copy of the model (this organism is untouched).

        Returns (formulas, adapter): one sympy expression per output token in the input
        variables `x_{pos}_{token}`, and an adapter around the symbolic copy (its edge hooks
        include the symbolic branch). On one-hot inputs every first-layer edge is exactly
        affine in its input (the input takes only the values 0 and 1), so `x` fits it with
        r2 = 1; deeper edges fit only as well as their splines allow. Cost grows with the
        number of edges (pykan fits each edge in Python).
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
            kan.auto_symbolic(lib=list(lib), verbose=0, r2_threshold=r2_threshold)
            T, V = self.config["seq_len"], self.config["vocab_size"]
            names = [sympy.Symbol(f"x_{t}_{v}") for t in range(T) for v in range(V)]
            formulas, _ = kan.symbolic_formula(var=names)
        kan.save_act = False
        return formulas, clone
