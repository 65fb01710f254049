"""Eager attention with an editable pattern, registered with transformers' attention interface.

transformers' own eager attention returns the attention weights only as a by-product: editing
the returned pattern cannot change the output. This function is the same computation
(scores, additive mask, softmax, dropout, weighted sum, grouped-query heads) but passes the
pattern through `module.hook_pattern` (a HookPoint) before it weights the values, so caching
reads it and interventions on `blocks.{i}.attn.pattern` take effect. Registered under the name
"archbench_eager", with transformers' eager mask (an additive float mask).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from archbench.hooks import HookPoint

NAME = "archbench_eager"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, pos, d) -> (batch, kv_heads * n_rep, pos, d) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def hooked_eager_attention(module: nn.Module, query, key, value, attention_mask,
                           scaling=None, dropout=0.0, **kwargs):
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)  # (B, nh, T, hs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, T, T)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, nh, T, T)
    hook = getattr(module, "hook_pattern", None)
    if hook is not None:
        pattern = hook(pattern)
    weights = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return out, pattern


def install(model: nn.Module, attention_class: type) -> list[HookPoint]:
    """Give every `attention_class` module a `hook_pattern` HookPoint; return them in order."""
    points = []
    for module in model.modules():
        if isinstance(module, attention_class):
            if not hasattr(module, "hook_pattern"):
                module.hook_pattern = HookPoint()
            points.append(module.hook_pattern)
    return points


AttentionInterface.register(NAME, hooked_eager_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
