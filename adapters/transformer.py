"""The reference architecture: a Llama-style causal transformer (Hugging Face `LlamaForCausalLM`).

Every transfer ratio in archbench is measured against this adapter. Organisms are built from
a tiny `LlamaConfig` (pre-norm RMSNorm, rotary positions, SwiGLU MLP); `from_pretrained`
wraps a local checkpoint directory of the same class so researchers can point archbench at
real weights. Rotary rather than GPT-2's learned absolute positions: measured here, a tiny
GPT-2 stayed at chance on `recall` after 3,000 steps while rotary models learned it in a
few hundred. Attention runs through archbench's
editable eager attention (`archbench.hf_attention`), so `blocks.{i}.attn.pattern` can be
cached and intervened on. References: Touvron et al. 2023 (Llama); Su et al. 2021 (RoPE); Elhage et al. 2021
(the residual-stream vocabulary: resid_pre / resid_mid / resid_post).

Hook points per block, all readable and editable: `resid_pre`; `attn_norm.normalized` (the
RMSNorm's x / rms(x), before its weight); `attn.q`, `attn.k`, `attn.v` (the projections,
before the rotary embedding) and `attn.rot_q`, `attn.rot_k` (after it), each (batch, pos,
head, d_head); `attn.scores` (masked, before the softmax) and `attn.pattern`, each (batch,
pos, head, key_pos); `attn.z` (the heads' weighted values, (batch, pos, head, d_head));
`attn.head_out` (each head's term of the output projection, (batch, pos, head, d_model), summing
to `attn.out` less the projection's bias); `attn.out`; `resid_mid`; `mlp_norm.normalized`;
`mlp.gate`, `mlp.up` (the SwiGLU's two input projections) and `mlp.hidden` (the down
projection's input), each (batch, pos, d_mlp); `mlp.out`; `resid_post`. Then
`final_norm.normalized` and `logits`. Every one of them also answers to its TransformerLens
name (`blocks.0.hook_resid_post`, `blocks.0.attn.hook_pattern` as (batch, head, query_pos,
key_pos), ...): `aliases()`, `archbench.aliases`. Reading any of them leaves the logits bit
for bit the same.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from archbench import hf_attention, hf_norm
from archbench.adapter import Adapter, Hook, Site, hook
from archbench.aliases import HEADS_FIRST, Alias, TLAliases, alias_table, tl_rows
from archbench.hf_checkpoint import FromPretrained

D = ("batch", "pos", "d_model")
HEADS = ("batch", "pos", "head", "d_head")
MLP_HIDDEN = ("batch", "pos", "d_mlp")
PATTERN = ("batch", "pos", "head", "key_pos")


def _heads_last(pattern: torch.Tensor) -> torch.Tensor:
    return pattern.permute(0, 2, 1, 3)  # (B, nh, q, k) -> (B, q, nh, k), and back


def _swap_pos_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # (B, nh, T, hs) -> (B, T, nh, hs), and back


def _split_heads(d_head: int):
    return lambda t: t.reshape(*t.shape[:2], -1, d_head)  # (B, T, nh * hs) -> (B, T, nh, hs)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape[:2], -1).contiguous()  # (B, T, nh, hs) -> (B, T, nh * hs)


class TransformerAdapter(FromPretrained, TLAliases, Adapter):
    hf_model_class = LlamaForCausalLM  # its `config_class` builds the tiny config; a subclass swaps both
    hf_attention_class = LlamaAttention  # the modules archbench's editable attention is installed on
    family = "transformer"
    capabilities = frozenset({"gradients", "trainable", "attention", "readout"})
    default_config = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_mlp": 128}
    task_train_config = {
        # lr 3e-3 with weight decay 1.0 groks fast but can collapse mid-run (seed 1 fell from
        # 0.93 to 0.04 validation accuracy and ended at 0.88); a gradient-norm cap of 1 keeps
        # seeds 1-3 at 0.97-1.00 (700-1,900 steps)
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192, "grad_clip": 1.0},
        "parity": {"steps": 2500},
    }

    def __init__(self, model, config: dict[str, Any]):
        hf_norm.install(model)  # here, not in _prepare, so that subclasses (MoE) get it too
        super().__init__(model, config)

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> LlamaForCausalLM:
        config_class = cls.hf_model_class.config_class  # LlamaConfig here
        if "hf_config" in config:  # a checkpoint's own config (its random-init control)
            return cls._prepare(cls.hf_model_class(config_class.from_dict(config["hf_config"])))
        hf = config_class(vocab_size=config["vocab_size"], max_position_embeddings=config["seq_len"],
                          hidden_size=config["d_model"], intermediate_size=config["d_mlp"],
                          num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
                          num_key_value_heads=config["n_heads"], tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return cls._prepare(cls.hf_model_class(hf))

    @classmethod
    def _prepare(cls, model: LlamaForCausalLM) -> LlamaForCausalLM:
        model.config._attn_implementation = hf_attention.NAME
        hf_attention.install(model, cls.hf_attention_class)
        return model.eval()

    @staticmethod
    def config_of(c) -> dict[str, Any]:
        """The adapter config of a checkpoint's transformers config (`hf_config` rebuilds it exactly)."""
        return {"vocab_size": c.vocab_size, "seq_len": c.max_position_embeddings, "d_model": c.hidden_size,
                "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads, "d_mlp": c.intermediate_size,
                "hf_config": c.to_dict()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(stream))  # (B, T, vocab)

    def hooks(self) -> list[Hook]:
        llama = self.model.model
        out = [hook("embed", "embed", D, 0, Site(llama.embed_tokens))]
        for i, block in enumerate(llama.layers):
            b, attn = f"blocks.{i}", block.self_attn
            split = _split_heads(attn.head_dim)
            heads = lambda module: Site(module, to_canonical=split, from_canonical=_merge_heads)  # noqa: E731
            rotated = lambda point: Site(point, to_canonical=_swap_pos_heads, from_canonical=_swap_pos_heads)  # noqa: E731
            out += [
                hook(f"{b}.resid_pre", "other", D, i, Site(block, where="input")),
                hook(f"{b}.attn_norm.normalized", "other", D, i, Site(block.input_layernorm.hook_normalized)),
                hook(f"{b}.attn.q", "other", HEADS, i, heads(attn.q_proj)),
                hook(f"{b}.attn.k", "other", HEADS, i, heads(attn.k_proj)),
                hook(f"{b}.attn.v", "other", HEADS, i, heads(attn.v_proj)),
                hook(f"{b}.attn.rot_q", "other", HEADS, i, rotated(attn.hook_rot_q)),
                hook(f"{b}.attn.rot_k", "other", HEADS, i, rotated(attn.hook_rot_k)),
                hook(f"{b}.attn.scores", "other", PATTERN, i,
                     Site(attn.hook_scores, to_canonical=_heads_last, from_canonical=_heads_last)),
                hook(f"{b}.attn.pattern", "attn_pattern", PATTERN, i,
                     Site(attn.hook_pattern, to_canonical=_heads_last, from_canonical=_heads_last)),
                hook(f"{b}.attn.z", "other", HEADS, i,
                     Site(attn.o_proj, where="input", to_canonical=split, from_canonical=_merge_heads)),
                hook(f"{b}.attn.head_out", "other", ("batch", "pos", "head", "d_model"), i,
                     Site(attn.o_proj.hook_result)),
                hook(f"{b}.attn.out", "mixer", D, i, Site(attn, index=0)),
                hook(f"{b}.resid_mid", "other", D, i, Site(block.post_attention_layernorm, where="input")),
                hook(f"{b}.mlp_norm.normalized", "other", D, i, Site(block.post_attention_layernorm.hook_normalized)),
                *self._mlp_hooks(i, block),
                hook(f"{b}.resid_post", "stream", D, i + 1, Site(block)),
            ]
        n = len(llama.layers)
        return out + [hook("final_norm.normalized", "other", D, n, Site(llama.norm.hook_normalized)),
                      hook("logits", "logits", ("batch", "pos", "vocab"), n + 1, Site(self.model.lm_head))]

    def aliases(self) -> dict[str, Alias]:
        """TransformerLens's hook names (HookedTransformer, rotary models) -> these hook points."""
        rows = [("hook_embed", "embed")]
        for i in range(self.config["n_layers"]):
            rows += tl_rows(f"blocks.{i}", [
                ("hook_resid_pre", "resid_pre"), ("ln1.hook_normalized", "attn_norm.normalized"),
                ("attn.hook_q", "attn.q"), ("attn.hook_k", "attn.k"), ("attn.hook_v", "attn.v"),
                ("attn.hook_rot_q", "attn.rot_q"), ("attn.hook_rot_k", "attn.rot_k"),
                ("attn.hook_attn_scores", "attn.scores", HEADS_FIRST), ("attn.hook_pattern", "attn.pattern", HEADS_FIRST),
                ("attn.hook_z", "attn.z"), ("attn.hook_result", "attn.head_out"), ("hook_attn_out", "attn.out"),
                ("hook_resid_mid", "resid_mid"), ("ln2.hook_normalized", "mlp_norm.normalized"),
                *self._mlp_aliases(), ("hook_resid_post", "resid_post")])
        rows.append(("ln_final.hook_normalized", "final_norm.normalized"))
        return alias_table(rows, self.specs)

    # The feed-forward part of a block: one dense SwiGLU MLP here; the MoE adapter overrides these.
    def _mlp_hooks(self, i: int, block) -> list[Hook]:
        mlp, b = block.mlp, f"blocks.{i}.mlp"
        return [hook(f"{b}.gate", "other", MLP_HIDDEN, i, Site(mlp.gate_proj)),
                hook(f"{b}.up", "other", MLP_HIDDEN, i, Site(mlp.up_proj)),
                hook(f"{b}.hidden", "other", MLP_HIDDEN, i, Site(mlp.down_proj, where="input")),
                hook(f"{b}.out", "mlp", D, i, Site(mlp))]

    def _mlp_aliases(self) -> list[tuple]:
        """(TransformerLens suffix, archbench suffix) pairs under `blocks.{i}` (gated MLP:
        hook_pre is the gate's pre-activation, hook_pre_linear the linear branch)."""
        return [("mlp.hook_pre", "mlp.gate"), ("mlp.hook_pre_linear", "mlp.up"), ("mlp.hook_post", "mlp.hidden"),
                ("hook_mlp_out", "mlp.out")]
