"""Qwen2 checkpoints (Hugging Face `Qwen2ForCausalLM`), for researchers' own weights.

Qwen2 (Yang et al. 2024, "Qwen2 technical report"; Qwen2.5 has the same layout) is the
reference adapter's Llama block (pre-norm RMSNorm, rotary positions, SwiGLU MLP) with biases
on the query, key and value projections and an optional sliding-window attention. The
modules are named as Llama's (`model.layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, ...), so
this adapter is the reference adapter (adapters/transformer.py) with Qwen2's classes: the
same hook points, TransformerLens names and editable eager attention. `attn.q`, `attn.k`,
`attn.v` include their biases; `attn.head_out` sums to `attn.out` (the output projection
has no bias).

`from_pretrained` loads strictly (`archbench.hf_checkpoint.load_strict`) and refuses a
checkpoint with `use_sliding_window=True`: archbench's eager attention applies the causal
mask only, so a windowed model would be run with full attention, a silently wrong forward.
`organisms = False`: archbench trains no Qwen2 organisms; the reference adapter's
`build_model` rebuilds a checkpoint's architecture at random init from its config (Qwen2's
default `use_sliding_window=False` for a tiny one), for a seeded control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from archbench.adapters.transformer import TransformerAdapter


class Qwen2Adapter(TransformerAdapter):
    hf_model_class = Qwen2ForCausalLM  # the reference adapter builds and prepares from these two
    hf_attention_class = Qwen2Attention
    family = "qwen2"
    organisms = False  # wraps users' checkpoints; `archbench run --matrix` leaves it out

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any):
        adapter = super().from_pretrained(path, **kwargs)
        if getattr(adapter.model.config, "use_sliding_window", False):
            raise ValueError(f"checkpoint {path}: use_sliding_window=True; archbench's attention has no sliding "
                             "window, so this Qwen2 checkpoint would run with full attention")
        return adapter
