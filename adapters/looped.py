"""Looped (weight-tied, recurrent-depth) transformer: one GPT-2 block applied K times.

Depth comes from iterating one shared block rather than stacking distinct ones (Dehghani et al.
2019, "Universal Transformers"; Giannou et al. 2023, "Looped transformers as programmable
computers"; Geiping et al. 2025, "Scaling up test-time compute with latent reasoning: a
recurrent depth approach"). The block is Hugging Face's `GPT2Block` (its `ln_1`, `attn`,
`ln_2`, `mlp`), with attention through archbench's editable eager attention; the loop is
written out here so every iteration has its own hook points even though the modules are
shared. Optionally (`inject=True`, as in Geiping et al.) the input embedding is added to the
stream before every iteration after the first.

The number of iterations K is `config["n_loops"]` (used in training) and can be changed at
inference with `run(tokens, loops=K)` or `set_loops(K)` (up to `max_loops`): the hook-point
list follows K. Hook points: `embed`, and per iteration k `loops.{k}.attn.out` (mixer),
`loops.{k}.mlp.out` (mlp), `loops.{k}.resid_post` (stream), then `logits`. The shared
attention's pattern is not a per-iteration hook point. Each also answers to the
TransformerLens name of the unrolled model, iteration k as block k (`hook_embed`,
`blocks.{k}.hook_attn_out`, `blocks.{k}.hook_mlp_out`, `blocks.{k}.hook_resid_post`):
`aliases()`, `archbench.aliases`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from archbench import hf_attention  # noqa: F401  (registers the "archbench_eager" attention)
from archbench.adapter import Adapter, Hook, RunOutput, Site, hook
from archbench.aliases import Alias, TLAliases, alias_table
from archbench.hooks import HookPoint, InterventionLike

D = ("batch", "pos", "d_model")


class LoopHooks(nn.Module):
    """The hook points of one loop iteration (no parameters)."""

    def __init__(self):
        super().__init__()
        self.attn_out, self.mlp_out, self.resid_post = HookPoint(), HookPoint(), HookPoint()


class LoopedLM(nn.Module):
    """Token + position embedding, one GPT2Block iterated `n_loops` times, final LayerNorm, readout."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        d = config["d_model"]
        hf = GPT2Config(vocab_size=config["vocab_size"], n_positions=config["seq_len"], n_embd=d,
                        n_layer=1, n_head=config["n_heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
        hf._attn_implementation = hf_attention.NAME
        self.n_loops = config["n_loops"]
        self.inject = config.get("inject", False)
        self.wte = nn.Embedding(config["vocab_size"], d)
        self.wpe = nn.Embedding(config["seq_len"], d)
        self.hook_embed = HookPoint()
        self.block = GPT2Block(hf, layer_idx=0)
        self.loops = nn.ModuleList(LoopHooks() for _ in range(config["max_loops"]))
        self.ln_f = nn.LayerNorm(d, eps=hf.layer_norm_epsilon)
        self.lm_head = nn.Linear(d, config["vocab_size"], bias=False)
        std = hf.initializer_range
        for p in (self.wte.weight, self.wpe.weight, self.lm_head.weight):
            nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        if self.n_loops > len(self.loops):
            raise ValueError(f"n_loops={self.n_loops} exceeds max_loops={len(self.loops)}")
        x = self.hook_embed(self.wte(tokens) + self.wpe(torch.arange(t, device=tokens.device)))  # (B, T, d)
        future = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)  # (T, T)
        mask = torch.zeros(1, 1, t, t, dtype=x.dtype, device=x.device).masked_fill(
            future, torch.finfo(x.dtype).min)  # (1, 1, T, T) additive causal mask
        h, blk = x, self.block
        for k in range(self.n_loops):
            hooks = self.loops[k]
            if self.inject and k > 0:
                h = h + x
            h = h + hooks.attn_out(blk.attn(blk.ln_1(h), attention_mask=mask)[0])  # (B, T, d)
            h = hooks.resid_post(h + hooks.mlp_out(blk.mlp(blk.ln_2(h))))  # (B, T, d)
        return self.lm_head(self.ln_f(h))  # (B, T, vocab)


class LoopedAdapter(TLAliases, Adapter):
    family = "looped"
    capabilities = frozenset({"gradients", "trainable", "readout"})
    default_config = {"d_model": 64, "n_heads": 4, "n_loops": 4, "max_loops": 16, "inject": False}

    @classmethod
    def scaled_config(cls, d_model, n_layers):
        """Depth is the number of iterations of the one block (`n_loops`, within `max_loops`)."""
        out = super().scaled_config(d_model, None)
        if n_layers is not None:
            out["n_loops"] = n_layers
            out["max_loops"] = max(cls.default_config["max_loops"], n_layers)
        return out
    task_train_config = {
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192},
        "parity": {"steps": 2500},
    }

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> LoopedLM:
        return LoopedLM(config).eval()

    @property
    def loops(self) -> int:
        return self.model.n_loops

    def set_loops(self, k: int) -> None:
        """Iterate the block k times from now on (the hook-point list follows)."""
        if not 1 <= k <= len(self.model.loops):
            raise ValueError(f"loops must be in [1, {len(self.model.loops)}], got {k}")
        self.model.n_loops = k
        self._specs = None

    def run(self, tokens: torch.Tensor, cache: Iterable[str] | str | None = None,
            interventions: Mapping[str, InterventionLike] | None = None,
            grad: bool = False, loops: int | None = None) -> RunOutput:
        """`Adapter.run`, with the number of iterations optionally set for this call only."""
        if loops is None:
            return super().run(tokens, cache, interventions, grad)
        before = self.loops
        self.set_loops(loops)
        try:
            return super().run(tokens, cache, interventions, grad)
        finally:
            self.set_loops(before)

    @classmethod
    def from_pretrained(cls, path: str | Path, n_loops: int | None = None, layer: int = 0,
                        max_loops: int = 16) -> "LoopedAdapter":
        """Loop one block of a local `save_pretrained` GPT2LMHeadModel directory (no hub access).

        Embeddings, final LayerNorm and readout come from the checkpoint and block `layer` becomes
        the shared block; with a 1-layer checkpoint and `n_loops=1` the organism is that model.
        """
        gpt = GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True)
        c = gpt.config
        config = {"vocab_size": c.vocab_size, "seq_len": c.n_positions, "d_model": c.n_embd,
                  "n_heads": c.n_head, "n_loops": n_loops or c.n_layer, "max_loops": max_loops,
                  "inject": False, "source": str(path), "source_layer": layer}
        model = cls.build_model(config)
        t = gpt.transformer
        model.wte.load_state_dict(t.wte.state_dict())
        model.wpe.load_state_dict(t.wpe.state_dict())
        model.block.load_state_dict(t.h[layer].state_dict())
        model.ln_f.load_state_dict(t.ln_f.state_dict())
        model.lm_head.weight = nn.Parameter(gpt.lm_head.weight.detach().clone())
        return cls(model, config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.ln_f(stream))  # (B, T, vocab)

    def hooks(self) -> list[Hook]:
        out = [hook("embed", "embed", D, 0, Site(self.model.hook_embed))]
        for k in range(self.loops):
            points = self.model.loops[k]
            out += [hook(f"loops.{k}.attn.out", "mixer", D, k, Site(points.attn_out)),
                    hook(f"loops.{k}.mlp.out", "mlp", D, k, Site(points.mlp_out)),
                    hook(f"loops.{k}.resid_post", "stream", D, k + 1, Site(points.resid_post))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), self.loops + 1, Site(self.model.lm_head))]

    def aliases(self) -> dict[str, Alias]:
        """TransformerLens's names of the unrolled model (iteration k is block k) -> these hook points."""
        rows = [("hook_embed", "embed")]
        for k in range(self.loops):
            rows += [(f"blocks.{k}.hook_attn_out", f"loops.{k}.attn.out"),
                     (f"blocks.{k}.hook_mlp_out", f"loops.{k}.mlp.out"),
                     (f"blocks.{k}.hook_resid_post", f"loops.{k}.resid_post")]
        return alias_table(rows, self.specs)
