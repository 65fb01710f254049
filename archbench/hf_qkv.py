"""A fused query-key-value projection with per-head q, k and v as hook points.

GPT-2 (`c_attn`, a transformers `Conv1D`) and GPT-NeoX (`query_key_value`, an `nn.Linear`)
compute queries, keys and values in one product, so no module outputs q alone (Llama has
`q_proj`, `k_proj`, `v_proj`). `install` swaps the projection to a subclass of its own class
(same parameters, same state-dict keys, no RNG draw) with `hook_q`, `hook_k`, `hook_v`
HookPoints. Its forward is the original product; only while one of them is hooked it also
splits the output into q, k, v of shape (batch, pos, head, d_head) and passes each through
its HookPoint (TransformerLens's `attn.hook_q`, ...). Unedited, the fused output is returned
as it was, bit for bit; an edit is written back into the fused layout, which the attention
module then splits as usual.

The two layouts differ: GPT-2's output is [q | k | v], each head-major (nh * hs);
GPT-NeoX's is per head, [q_h | k_h | v_h] for each head h (its attention views the output
as (B, T, nh, 3 * hs) and chunks the last axis).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from archbench.hooks import HookPoint

LAYOUTS = ("qkv", "per_head")  # GPT-2, GPT-NeoX


class _FusedQKV:
    """Mixin for a fused projection: q, k, v split per head only while hooked."""

    n_heads: int
    d_head: int
    layout: str
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # (B, T, 3 * nh * hs): the projection's own product
        points = (self.hook_q, self.hook_k, self.hook_v)
        if not any(p.hooked for p in points):
            return out
        lead, nh, hs = out.shape[:-1], self.n_heads, self.d_head
        if self.layout == "per_head":
            parts = out.view(*lead, nh, 3 * hs).split(hs, dim=-1)  # 3 x (B, T, nh, hs)
        else:
            parts = [p.view(*lead, nh, hs) for p in out.split(nh * hs, dim=-1)]  # 3 x (B, T, nh, hs)
        edited = [point(part) for point, part in zip(points, parts)]
        if all(e is p for e, p in zip(edited, parts)):  # read, not edited
            return out
        if self.layout == "per_head":
            return torch.cat(edited, dim=-1).reshape(out.shape)  # (B, T, nh, 3 * hs) -> (B, T, 3 * nh * hs)
        return torch.cat([e.reshape(*lead, nh * hs) for e in edited], dim=-1)  # (B, T, 3 * nh * hs)


class FusedQKVLinear(_FusedQKV, nn.Linear):
    """GPT-NeoX's `query_key_value`."""


class FusedQKVConv1D(_FusedQKV, Conv1D):
    """GPT-2's `c_attn`."""


def install(proj: nn.Module, n_heads: int, d_head: int, layout: str) -> nn.Module:
    """Swap `proj` (an `nn.Linear` or `Conv1D`) to its fused-QKV subclass in place (idempotent)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if not isinstance(proj, _FusedQKV):
        proj.__class__ = {nn.Linear: FusedQKVLinear, Conv1D: FusedQKVConv1D}[type(proj)]
        proj.n_heads, proj.d_head, proj.layout = n_heads, d_head, layout
        proj.hook_q, proj.hook_k, proj.hook_v = HookPoint(), HookPoint(), HookPoint()
    return proj
