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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from archbench import hf_attention
from archbench.adapter import Adapter, Site
from archbench.hooks import HookSpec

D = ("batch", "pos", "d_model")


def _heads_last(pattern: torch.Tensor) -> torch.Tensor:
    return pattern.permute(0, 2, 1, 3)  # (B, nh, q, k) -> (B, q, nh, k)


class TransformerAdapter(Adapter):
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

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> LlamaForCausalLM:
        hf = LlamaConfig(vocab_size=config["vocab_size"], max_position_embeddings=config["seq_len"],
                         hidden_size=config["d_model"], intermediate_size=config["d_mlp"],
                         num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
                         num_key_value_heads=config["n_heads"], tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return cls._prepare(LlamaForCausalLM(hf))

    @staticmethod
    def _prepare(model: LlamaForCausalLM) -> LlamaForCausalLM:
        model.config._attn_implementation = hf_attention.NAME
        hf_attention.install(model, LlamaAttention)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TransformerAdapter":
        """Wrap a local `save_pretrained` directory of a LlamaForCausalLM (no hub access)."""
        model = cls._prepare(LlamaForCausalLM.from_pretrained(str(path), local_files_only=True))
        c = model.config
        return cls(model, {"vocab_size": c.vocab_size, "seq_len": c.max_position_embeddings,
                           "d_model": c.hidden_size, "n_layers": c.num_hidden_layers,
                           "n_heads": c.num_attention_heads, "d_mlp": c.intermediate_size,
                           "source": str(path)})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(stream))  # (B, T, vocab)

    def hook_points(self) -> list[HookSpec]:
        specs = [HookSpec("embed", "embed", D, layer=0)]
        for i in range(self.config["n_layers"]):
            specs += [
                HookSpec(f"blocks.{i}.resid_pre", "other", D, layer=i),
                HookSpec(f"blocks.{i}.attn.pattern", "attn_pattern",
                         ("batch", "pos", "head", "key_pos"), layer=i),
                HookSpec(f"blocks.{i}.attn.out", "mixer", D, layer=i),
                HookSpec(f"blocks.{i}.resid_mid", "other", D, layer=i),
                *self._mlp_specs(i),
                HookSpec(f"blocks.{i}.resid_post", "stream", D, layer=i + 1),
            ]
        return specs + [HookSpec("logits", "logits", ("batch", "pos", "vocab"),
                                 layer=self.config["n_layers"] + 1)]

    def sites(self) -> dict[str, Site]:
        llama = self.model.model
        sites = {"embed": Site(llama.embed_tokens), "logits": Site(self.model.lm_head)}
        for i, block in enumerate(llama.layers):
            sites.update({
                f"blocks.{i}.resid_pre": Site(block, where="input"),
                f"blocks.{i}.attn.pattern": Site(block.self_attn.hook_pattern, to_canonical=_heads_last,
                                                 from_canonical=_heads_last),
                f"blocks.{i}.attn.out": Site(block.self_attn, index=0),
                f"blocks.{i}.resid_mid": Site(block.post_attention_layernorm, where="input"),
                **self._mlp_sites(i, block),
                f"blocks.{i}.resid_post": Site(block),
            })
        return sites

    # The feed-forward part of a block: one dense MLP here; the MoE adapter overrides both.
    def _mlp_specs(self, i: int) -> list[HookSpec]:
        return [HookSpec(f"blocks.{i}.mlp.out", "mlp", D, layer=i)]

    def _mlp_sites(self, i: int, block) -> dict[str, Site]:
        return {f"blocks.{i}.mlp.out": Site(block.mlp)}
