"""Eager attention with editable internals, registered with transformers' attention interface.

transformers' own eager attention returns the attention weights only as a by-product: editing
the returned pattern cannot change the output. This function is the same computation
(scores, additive mask, softmax, dropout, weighted sum, grouped-query heads) but passes its
intermediate values through HookPoints of the attention module, so caching reads them and
interventions take effect:

  module.hook_rot_q, hook_rot_k   queries and keys as the function receives them: after the
                                  rotary embedding where the model has one (B, heads, T, d_head)
  module.hook_scores              scaled, masked scores before the softmax (B, heads, T, T)
  module.hook_pattern             the softmax pattern before it weights the values (B, heads, T, T)

A module without these attributes (the looped adapter's GPT-2 attention uses only the
function) runs the plain computation. Registered under the name "archbench_eager", with
transformers' eager mask (an additive float mask).

`install` also turns each attention module's output projection (`o_proj` in Llama and Mixtral,
`dense` in GPT-NeoX: an `nn.Linear`; `c_proj` in GPT-2: a transformers `Conv1D`, whose
weight is stored transposed) into a `HeadedLinear` / `HeadedConv1D`: the same module (same
parameters, same state-dict keys, the same fused product) that, only while its
`hook_result` HookPoint is hooked, splits its output into per-head terms (TransformerLens's
`hook_result`). An edit of a head's term is added to the fused output as a difference, so
reading the heads never changes the logits by a rounding error. GPT-2's and GPT-NeoX's eager
attention functions are this same computation (GPT-2's with `reorder_and_upcast_attn`
off, its default; archbench's function ignores that flag, which changes only rounding).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.pytorch_utils import Conv1D

from archbench.hooks import HookPoint

NAME = "archbench_eager"
HOOKS = ("hook_rot_q", "hook_rot_k", "hook_scores", "hook_pattern")


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, pos, d) -> (batch, kv_heads * n_rep, pos, d) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _through(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    hook = getattr(module, name, None)
    return x if hook is None else hook(x)


def hooked_eager_attention(module: nn.Module, query, key, value, attention_mask,
                           scaling=None, dropout=0.0, **kwargs):
    query, key = _through(module, "hook_rot_q", query), _through(module, "hook_rot_k", key)
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)  # (B, nh, T, hs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, T, T)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    scores = _through(module, "hook_scores", scores)
    pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, nh, T, T)
    pattern = _through(module, "hook_pattern", pattern)
    weights = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return out, pattern


class _Headed:
    """Mixin for an output projection whose per-head terms are a hook point.

    Its forward is the projection's own. While `hook_result` is hooked it also computes
    result[b, t, h] = W_O[:, h-th d_head block] @ z[b, t, h] (batch, pos, head, d_model; the
    bias is not split, as in TransformerLens), passes it through `hook_result`, and adds any
    edit to the fused output as (edited - result) summed over heads: unedited, the output is
    the fused product bit for bit; with head h zeroed it is the other heads' sum (to rounding).
    """

    n_heads: int
    d_head: int
    hook_result: HookPoint

    def head_weights(self) -> torch.Tensor:
        raise NotImplementedError  # (d_model, nh, hs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = super().forward(z)  # (B, T, d_model): the projection's own forward
        if not self.hook_result.hooked:
            return out
        heads = z.reshape(*z.shape[:-1], self.n_heads, self.d_head)  # (B, T, nh, hs)
        result = torch.einsum("btnh,dnh->btnd", heads, self.head_weights())  # (B, T, nh, d_model)
        edited = self.hook_result(result)
        if edited is result:  # read, not edited: HookPoint is the identity
            return out
        return out + (edited - result).sum(-2)


class HeadedLinear(_Headed, nn.Linear):
    """An `nn.Linear` output projection (weight (d_model, nh * hs)) with per-head terms."""

    def head_weights(self) -> torch.Tensor:
        return self.weight.view(self.out_features, self.n_heads, self.d_head)  # (d_model, nh, hs)


class HeadedConv1D(_Headed, Conv1D):
    """GPT-2's `Conv1D` output projection (weight (nh * hs, d_model), transposed) with per-head terms."""

    def head_weights(self) -> torch.Tensor:
        return self.weight.view(self.n_heads, self.d_head, self.nf).permute(2, 0, 1)  # (d_model, nh, hs)


def install(model: nn.Module, attention_class: type, out_proj: str = "o_proj") -> list[HookPoint]:
    """Give every `attention_class` module its HookPoints and a headed output projection (the
    attribute `out_proj`); return the pattern HookPoints in order. Adds no parameters and
    changes no state-dict key."""
    points = []
    for module in model.modules():
        if isinstance(module, attention_class):
            for name in HOOKS:
                if not hasattr(module, name):
                    setattr(module, name, HookPoint())
            proj = getattr(module, out_proj, None)  # BERT's projection lives outside its self-attention
            headed = {nn.Linear: HeadedLinear, Conv1D: HeadedConv1D}.get(type(proj))
            if headed is not None:
                # a class swap, not a new module: the same parameters, and no draw from the RNG
                proj.__class__ = headed
                proj.d_head = getattr(module, "head_dim", None) or module.head_size  # GPT-NeoX: head_size
                proj.n_heads = proj.weight.numel() // (proj.d_head * _d_model(proj))
                proj.hook_result = HookPoint()
            points.append(module.hook_pattern)
    return points


def _d_model(proj: nn.Module) -> int:
    return proj.out_features if isinstance(proj, nn.Linear) else proj.nf


AttentionInterface.register(NAME, hooked_eager_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
