"""Mixture of experts: a sparse Mixtral-style transformer (Hugging Face `MixtralForCausalLM`).

Each block's MLP is replaced by a top-k routed set of SwiGLU experts (Shazeer et al. 2017,
"Outrageously large neural networks: the sparsely-gated mixture-of-experts layer"; Fedus et al.
2022, Switch Transformers; Jiang et al. 2024, "Mixtral of experts"). Organisms are built from a
tiny `MixtralConfig` (4 experts, top-2, d=64, 2 layers); `from_pretrained` wraps a local
`save_pretrained` directory of the same class.

In transformers 5 the experts of a block are one module holding 3-D parameters
(`gate_up_proj` (E, 2f, d), `down_proj` (E, d, f)), so no module boundary exists per expert.
This adapter registers an experts function with transformers' `ExpertsInterface`
("archbench_experts"): it evaluates every expert on every token, passes each expert's
(unweighted) output through a `HookPoint`, and sums the router-weighted outputs in the same
order as transformers' eager experts loop. Non-routed experts get weight 0, so the output
equals the sparse computation (tested against transformers' own eager and grouped_mm paths).
The router is swapped for a subclass whose gate logits pass through a `HookPoint` *before*
the softmax and top-k, so an intervention on `blocks.{i}.moe.router` re-routes tokens
(forced routing). Attention runs through archbench's editable eager attention.

Hook points beyond the transformer's: `blocks.{i}.moe.router` (gate logits, role router),
`blocks.{i}.moe.experts.{e}.out` (expert e's output before weighting, role expert) and
`blocks.{i}.moe.out` (the weighted sum, role mlp; TransformerLens alias `blocks.{i}.hook_mlp_out`). The experts are nested inside
`blocks.{i}.moe.out`: role `expert` keeps them readable and patchable by name or role, but
it is not a component role, so block-level techniques (ablation) see one `mlp` component
per block, the granularity of every other family, and never count an expert twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.mixtral.modeling_mixtral import MixtralAttention, MixtralTopKRouter

from archbench import hf_attention
from archbench.adapter import Hook, Site, hook
from archbench.adapters.transformer import D, TransformerAdapter
from archbench.hooks import HookPoint

EXPERTS_NAME = "archbench_experts"


def hooked_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Dense experts with a HookPoint per expert output; same result as the sparse eager loop.

    hidden_states (S, d) with S = batch*pos tokens, top_k_index (S, k), top_k_weights (S, k).
    """
    final = torch.zeros_like(hidden_states)  # (S, d)
    hooks = getattr(self, "hook_expert", None)
    for e in range(self.num_experts):
        gate, up = F.linear(hidden_states, self.gate_up_proj[e]).chunk(2, dim=-1)  # (S, f) each
        out = F.linear(self.act_fn(gate) * up, self.down_proj[e])  # (S, d): expert e on every token
        if hooks is not None:
            out = hooks[e](out)
        top_k_pos, token_idx = torch.where((top_k_index == e).T)  # routed (slot, token) pairs
        weighted = out[token_idx] * top_k_weights[token_idx, top_k_pos, None]  # (n_e, d)
        final.index_add_(0, token_idx, weighted.to(final.dtype))
    return final


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_NAME, hooked_experts_forward)


class HookedRouter(MixtralTopKRouter):
    """Mixtral's top-k router with its gate logits passed through a HookPoint before routing."""

    def __init__(self, config):
        super().__init__(config)
        self.hook_logits = HookPoint()

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # (S, d)
        router_logits = self.hook_logits(F.linear(hidden_states, self.weight))  # (S, E)
        router_probs = F.softmax(router_logits.float(), dim=-1)  # (S, E)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)  # (S, k)
        router_top_value = router_top_value / router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value, router_indices


class MoEAdapter(TransformerAdapter):
    hf_model_class = MixtralForCausalLM
    # The reference transformer's blocks, hooks and training knobs; only the feed-forward
    # part (`_mlp_hooks`) is the routed mixture of experts.

    family = "moe"
    capabilities = frozenset({"gradients", "trainable", "attention", "router", "readout"})
    default_config = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_experts": 4, "top_k": 2,
                      "d_expert": 128}

    def __init__(self, model: nn.Module, config: dict[str, Any]):
        super().__init__(model, config)
        self._bt: tuple[int, int] = (1, 1)  # (batch, pos) of the current forward, for flat MoE sites

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> MixtralForCausalLM:
        if "hf_config" in config:  # a checkpoint's own config (its random-init control)
            return cls._prepare(MixtralForCausalLM(MixtralConfig.from_dict(config["hf_config"])))
        hf = MixtralConfig(vocab_size=config["vocab_size"], max_position_embeddings=config["seq_len"],
                           hidden_size=config["d_model"], intermediate_size=config["d_expert"],
                           num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
                           num_key_value_heads=config["n_heads"], num_local_experts=config["n_experts"],
                           num_experts_per_tok=config["top_k"], router_jitter_noise=0.0,
                           attention_dropout=0.0, sliding_window=None, tie_word_embeddings=False,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return cls._prepare(MixtralForCausalLM(hf))

    @staticmethod
    def _prepare(model: MixtralForCausalLM) -> MixtralForCausalLM:
        model.config._attn_implementation = hf_attention.NAME
        model.config._experts_implementation = EXPERTS_NAME
        hf_attention.install(model, MixtralAttention)
        for layer in model.model.layers:
            moe = layer.mlp
            if not isinstance(moe.gate, HookedRouter):
                router = HookedRouter(model.config)
                router.weight = moe.gate.weight  # same parameter, same state_dict key
                moe.gate = router
            moe.experts.hook_expert = nn.ModuleList(HookPoint() for _ in range(moe.experts.num_experts))
        return model.eval()

    @staticmethod
    def config_of(c) -> dict[str, Any]:
        """The adapter config of a checkpoint's transformers config (`hf_config` rebuilds it exactly)."""
        return {"vocab_size": c.vocab_size, "seq_len": c.max_position_embeddings, "d_model": c.hidden_size,
                "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads, "n_experts": c.num_local_experts,
                "top_k": c.num_experts_per_tok, "d_expert": c.intermediate_size, "hf_config": c.to_dict()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self._bt = tuple(tokens.shape[:2])
        return super().forward(tokens)  # (B, T, vocab)

    def _mlp_hooks(self, i: int, block) -> list[Hook]:
        moe, b = block.mlp, f"blocks.{i}.moe"
        flat = dict(to_canonical=self._unflatten, from_canonical=self._flatten)
        return [hook(f"{b}.router", "router", ("batch", "pos", "expert"), i, Site(moe.gate.hook_logits, **flat)),
                *[hook(f"{b}.experts.{e}.out", "expert", D, i, Site(point, **flat))
                  for e, point in enumerate(moe.experts.hook_expert)],
                hook(f"{b}.out", "mlp", D, i, Site(moe))]

    def _mlp_aliases(self) -> list[tuple]:
        # TransformerLens hooks an expert's hidden activation, not its output, and its MoE
        # router hooks differ by version: only the block's output has a TransformerLens name
        return [("hook_mlp_out", "moe.out")]

    def _unflatten(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*self._bt, *t.shape[1:])  # (S, *f) -> (B, T, *f)

    @staticmethod
    def _flatten(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:])  # (B, T, *f) -> (S, *f)

    @torch.no_grad()
    def routing(self, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B, T, E) with zeros for non-routed experts, router logits (B, T, E))."""
        logits = self.run(tokens, cache=[f"blocks.{layer}.moe.router"]).cache[f"blocks.{layer}.moe.router"]
        probs = F.softmax(logits.float(), dim=-1)  # (B, T, E)
        top, idx = probs.topk(self.config["top_k"], dim=-1)  # (B, T, k)
        weights = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return weights, logits
