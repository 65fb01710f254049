"""The hook plumbing shared by GPT-2 and GPT-NeoX: pre-LayerNorm decoders with a fused QKV.

Both wrap a Hugging Face causal LM whose blocks are LayerNorm -> attention with one fused
query-key-value projection -> output projection, and LayerNorm -> two-layer MLP (Radford et
al. 2019, GPT-2; Black et al. 2022, GPT-NeoX; Biderman et al. 2023, Pythia). A subclass
names the modules (`_parts`, `_embeddings`, `_final_norm`) and the config class; this base
installs archbench's instrumentation and declares the hook points, as the reference
adapter (adapters/transformer.py) does for Llama:

- attention through archbench's editable eager attention (`archbench.hf_attention`): the
  scores and pattern are hook points, the output projection splits into per-head terms
  only while `attn.head_out` is hooked;
- the fused projection through `archbench.hf_qkv`: per-head q, k, v only while hooked;
- LayerNorms through `archbench.hf_norm`: the normalized value (before weight and bias).

Hook points per block: `resid_pre`, `attn_norm.normalized`, `attn.q`, `attn.k`, `attn.v`
(batch, pos, head, d_head), `attn.rot_q`, `attn.rot_k` (rotary models), `attn.scores`,
`attn.pattern` (batch, pos, head, key_pos), `attn.z`, `attn.head_out` (batch, pos, head,
d_model; summing to `attn.out` less the projection's bias), `attn.out`, `resid_mid` (not
with a parallel residual, where attention and MLP both read `resid_pre`), `mlp_norm.normalized`,
`mlp.pre` (the first projection's output) and `mlp.hidden` (after the activation, the
second projection's input), each (batch, pos, d_mlp), `mlp.out`, `resid_post`; then
`final_norm.normalized` and `logits`. Each has its TransformerLens name (`aliases()`).
Reading any of them leaves the logits bit for bit the same.

These adapters wrap users' checkpoints (`organisms = False`). `build_model(config)` rebuilds
the architecture from `config["hf_config"]` (the checkpoint's config, `to_dict()`) with the
config's `vocab_size` and `seq_len`, so a seeded random-init control of a checkpoint can be
built; without `hf_config` it builds a small model from `d_model`, `n_layers`, `n_heads`, `d_mlp`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from archbench import hf_attention, hf_norm, hf_qkv
from archbench.adapter import Adapter, Hook, Site, hook
from archbench.adapters.transformer import D, HEADS, MLP_HIDDEN, PATTERN, _heads_last, _merge_heads, _split_heads, \
    _swap_pos_heads
from archbench.aliases import HEADS_FIRST, Alias, TLAliases, alias_table
from archbench.hf_checkpoint import load_strict

# archbench suffix -> TransformerLens suffix (HookedTransformer's names for GPT-2 and Pythia)
TL_NAMES = {
    "resid_pre": "hook_resid_pre", "attn_norm.normalized": "ln1.hook_normalized",
    "attn.q": "attn.hook_q", "attn.k": "attn.hook_k", "attn.v": "attn.hook_v",
    "attn.rot_q": "attn.hook_rot_q", "attn.rot_k": "attn.hook_rot_k",
    "attn.scores": ("attn.hook_attn_scores", HEADS_FIRST), "attn.pattern": ("attn.hook_pattern", HEADS_FIRST),
    "attn.z": "attn.hook_z", "attn.head_out": "attn.hook_result", "attn.out": "hook_attn_out",
    "resid_mid": "hook_resid_mid", "mlp_norm.normalized": "ln2.hook_normalized",
    "mlp.pre": "mlp.hook_pre", "mlp.hidden": "mlp.hook_post", "mlp.out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
    "embed": "hook_embed", "pos_embed": "hook_pos_embed", "final_norm.normalized": "ln_final.hook_normalized",
}


class Parts(NamedTuple):
    """The modules of one block that carry hook points."""

    ln1: nn.Module
    attn: nn.Module
    qkv: nn.Module
    out_proj: nn.Module
    ln2: nn.Module
    mlp: nn.Module
    fc_in: nn.Module
    fc_out: nn.Module
    parallel: bool  # attention and MLP both read resid_pre (no resid_mid)


class DecoderAdapter(TLAliases, Adapter):
    capabilities = frozenset({"gradients", "attention", "readout"})
    organisms = False  # wraps users' checkpoints; `archbench run --matrix` leaves it out
    default_config = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_mlp": 256}
    model_class: ClassVar[type]
    attention_class: ClassVar[type]
    out_proj: ClassVar[str]  # the attention module's output projection attribute
    qkv_layout: ClassVar[str]  # hf_qkv.LAYOUTS
    rotary: ClassVar[bool] = False

    def __init__(self, model, config: dict[str, Any]):
        hf_norm.install(model)
        super().__init__(model, config)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def hf_config(cls, config: dict[str, Any]):
        """The transformers config for an adapter config (`hf_config`, or the small defaults)."""
        raise NotImplementedError

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> nn.Module:
        return cls._prepare(cls.model_class(cls.hf_config(config)))

    @classmethod
    def _prepare(cls, model: nn.Module) -> nn.Module:
        model.config._attn_implementation = hf_attention.NAME
        hf_attention.install(model, cls.attention_class, out_proj=cls.out_proj)
        for block in cls._blocks(model):
            parts = cls._parts(block)
            d_head = parts.out_proj.d_head
            hf_qkv.install(parts.qkv, parts.out_proj.n_heads, d_head, cls.qkv_layout)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "DecoderAdapter":
        """Wrap a local `save_pretrained` directory (no hub access); `kwargs` (`dtype`,
        `device_map`, ...) go to transformers' `from_pretrained`. A checkpoint of another
        model type or with missing or unexpected weights is refused (`load_strict`)."""
        model = cls._prepare(load_strict(cls.model_class, path, **kwargs))
        return cls(model, {**cls.config_of(model.config), "source": str(path)})

    @classmethod
    def config_of(cls, hf) -> dict[str, Any]:
        """The adapter config that rebuilds this architecture (`build_model`)."""
        raise NotImplementedError

    # ---- the model's layout (subclasses) ------------------------------------------------
    @staticmethod
    def _blocks(model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    @staticmethod
    def _parts(block: nn.Module) -> Parts:
        raise NotImplementedError

    def _embeddings(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of the input embeddings: `embed` first (role embed), then the rest."""
        raise NotImplementedError

    def _final_norm(self) -> nn.Module:
        raise NotImplementedError

    # ---- forward and hooks -------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self._final_norm()(stream))  # (B, T, vocab)

    def hooks(self) -> list[Hook]:
        (first, embed), *others = self._embeddings()
        out = [hook(first, "embed", D, 0, Site(embed)), *[hook(n, "other", D, 0, Site(m)) for n, m in others]]
        blocks = self._blocks(self.model)
        for i, block in enumerate(blocks):
            p, b = self._parts(block), f"blocks.{i}"
            split = _split_heads(p.out_proj.d_head)
            rotated = lambda point: Site(point, to_canonical=_swap_pos_heads, from_canonical=_swap_pos_heads)  # noqa: E731
            out += [
                hook(f"{b}.resid_pre", "other", D, i, Site(block, where="input")),
                hook(f"{b}.attn_norm.normalized", "other", D, i, Site(p.ln1.hook_normalized)),
                hook(f"{b}.attn.q", "other", HEADS, i, Site(p.qkv.hook_q)),
                hook(f"{b}.attn.k", "other", HEADS, i, Site(p.qkv.hook_k)),
                hook(f"{b}.attn.v", "other", HEADS, i, Site(p.qkv.hook_v)),
                *([hook(f"{b}.attn.rot_q", "other", HEADS, i, rotated(p.attn.hook_rot_q)),
                   hook(f"{b}.attn.rot_k", "other", HEADS, i, rotated(p.attn.hook_rot_k))] if self.rotary else []),
                hook(f"{b}.attn.scores", "other", PATTERN, i,
                     Site(p.attn.hook_scores, to_canonical=_heads_last, from_canonical=_heads_last)),
                hook(f"{b}.attn.pattern", "attn_pattern", PATTERN, i,
                     Site(p.attn.hook_pattern, to_canonical=_heads_last, from_canonical=_heads_last)),
                hook(f"{b}.attn.z", "other", HEADS, i,
                     Site(p.out_proj, where="input", to_canonical=split, from_canonical=_merge_heads)),
                hook(f"{b}.attn.head_out", "other", ("batch", "pos", "head", "d_model"), i,
                     Site(p.out_proj.hook_result)),
                hook(f"{b}.attn.out", "mixer", D, i, Site(p.attn, index=0)),
                *([] if p.parallel else [hook(f"{b}.resid_mid", "other", D, i, Site(p.ln2, where="input"))]),
                hook(f"{b}.mlp_norm.normalized", "other", D, i, Site(p.ln2.hook_normalized)),
                hook(f"{b}.mlp.pre", "other", MLP_HIDDEN, i, Site(p.fc_in)),
                hook(f"{b}.mlp.hidden", "other", MLP_HIDDEN, i, Site(p.fc_out, where="input")),
                hook(f"{b}.mlp.out", "mlp", D, i, Site(p.mlp)),
                hook(f"{b}.resid_post", "stream", D, i + 1, Site(block)),
            ]
        n = len(blocks)
        return out + [hook("final_norm.normalized", "other", D, n, Site(self._final_norm().hook_normalized)),
                      hook("logits", "logits", ("batch", "pos", "vocab"), n + 1, Site(self.model.lm_head))]

    def aliases(self) -> dict[str, Alias]:
        """TransformerLens's hook names (HookedTransformer's GPT-2 / Pythia) -> these hook points."""
        rows = []
        for name in self.specs:
            prefix, _, suffix = name.partition(".") if name.startswith("blocks.") else ("", "", name)
            if prefix:
                index, _, suffix = suffix.partition(".")
                prefix = f"blocks.{index}."
            tl = TL_NAMES.get(suffix)
            if tl is not None:
                tl_name, *order = (tl,) if isinstance(tl, str) else tl
                rows.append((prefix + tl_name, name, *order))
        return alias_table(rows, self.specs)
