"""RMSNorm and LayerNorm with their normalized value as a hook point (TransformerLens's `hook_normalized`).

Hugging Face's RMSNorm returns weight * x / rms(x) in one forward, with no module boundary at
x / rms(x), the value TransformerLens calls `ln.hook_normalized` (before the weight; with
TransformerLens's default `fold_ln` the weight moves into the next layer and this is what
that layer reads). `install` swaps every RMSNorm of a model to a subclass of its own class
(same parameters, same state-dict keys, still an instance of the original class) whose
forward is the original one unless `hook_normalized` is hooked; then it runs the same
operations in the same order with the HookPoint between the normalisation and the weight,
so reading it leaves the output bit for bit the same and editing it takes effect.

`nn.LayerNorm` (GPT-2, GPT-NeoX) computes (x - mean) / std * weight + bias in one fused
kernel, so no sequence of separate operations reproduces it bit for bit. Its hooked
subclass runs the original forward, and only while hooked also computes the normalized
value (`F.layer_norm` without weight and bias) and passes it through the HookPoint; an
edit enters the output as its difference times the weight (as `HeadedLinear` adds a
head's edit), so reading leaves the output bit for bit the same. RMSNorm models have no
LayerNorm, so their path is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from archbench.hooks import HookPoint


class HookedNorm:
    """Mixin for an RMSNorm class with `weight` and `variance_epsilon` (Llama, Mixtral)."""

    hook_normalized: HookPoint

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.hook_normalized.hooked:
            return super().forward(hidden_states)
        # the operations of transformers' LlamaRMSNorm.forward, with the hook before the weight
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * self.hook_normalized(hidden_states.to(input_dtype))


class HookedLN:
    """Mixin for `nn.LayerNorm`: the fused forward, with the normalized value as a hook point."""

    hook_normalized: HookPoint

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden_states)  # (..., d): nn.LayerNorm's own fused kernel
        if not self.hook_normalized.hooked:
            return out
        normalized = F.layer_norm(hidden_states, self.normalized_shape, None, None, self.eps)  # (..., d)
        edited = self.hook_normalized(normalized)
        if edited is normalized:  # read, not edited: HookPoint is the identity
            return out
        delta = edited - normalized  # (..., d)
        return out + (delta if self.weight is None else delta * self.weight)


_hooked_classes: dict[type, type] = {}


def _is_rmsnorm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), nn.Parameter))


def install(model: nn.Module) -> None:
    """Give every RMSNorm and LayerNorm of `model` a `hook_normalized` HookPoint (idempotent)."""
    for module in model.modules():
        if isinstance(module, (HookedNorm, HookedLN)):
            continue
        if _is_rmsnorm(module):
            mixin = HookedNorm
        elif isinstance(module, nn.LayerNorm):
            mixin = HookedLN
        else:
            continue
        cls = type(module)
        if cls not in _hooked_classes:
            name = f"Hooked{cls.__name__}"
            _hooked_classes[cls] = globals()[name] = type(name, (mixin, cls), {"__module__": __name__})
            # a module attribute under its own name, so a pickled model finds its class again
        module.__class__ = _hooked_classes[cls]  # a class swap: no new parameters, no RNG draw
        module.hook_normalized = HookPoint()
