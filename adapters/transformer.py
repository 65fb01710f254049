"""The reference architecture: a GPT-2-style causal transformer (Hugging Face `GPT2LMHeadModel`).

Every transfer ratio in archbench is measured against this adapter. Organisms are built from
a tiny `GPT2Config`; `from_pretrained` wraps a local checkpoint directory of the same class
so researchers can point archbench at real weights. Attention runs through archbench's
editable eager attention (`archbench.hf_attention`), so `blocks.{i}.attn.pattern` can be
cached and intervened on. References: Radford et al. 2019 (GPT-2); Elhage et al. 2021
(the residual-stream vocabulary: resid_pre / resid_mid / resid_post).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from archbench import hf_attention
from archbench.adapter import Adapter, Site
from archbench.hooks import HookSpec

D = ("batch", "pos", "d_model")


def _heads_last(pattern: torch.Tensor) -> torch.Tensor:
    return pattern.permute(0, 2, 1, 3)  # (B, nh, q, k) -> (B, q, nh, k)


class TransformerAdapter(Adapter):
    family = "transformer"
    capabilities = frozenset({"gradients", "trainable", "attention", "readout"})
    default_config = {"d_model": 64, "n_layers": 2, "n_heads": 4}
    task_train_config = {
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192},
        "parity": {"steps": 2500},
    }

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> GPT2LMHeadModel:
        hf = GPT2Config(vocab_size=config["vocab_size"], n_positions=config["seq_len"],
                        n_embd=config["d_model"], n_layer=config["n_layers"], n_head=config["n_heads"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
        return cls._prepare(GPT2LMHeadModel(hf))

    @staticmethod
    def _prepare(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
        model.config._attn_implementation = hf_attention.NAME
        hf_attention.install(model, GPT2Attention)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TransformerAdapter":
        """Wrap a local `save_pretrained` directory of a GPT2LMHeadModel (no hub access)."""
        model = cls._prepare(GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True))
        c = model.config
        return cls(model, {"vocab_size": c.vocab_size, "seq_len": c.n_positions, "d_model": c.n_embd,
                           "n_layers": c.n_layer, "n_heads": c.n_head, "source": str(path)})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.transformer.ln_f(stream))  # (B, T, vocab)

    def hook_points(self) -> list[HookSpec]:
        specs = [HookSpec("embed", "embed", D, layer=0)]
        for i in range(self.config["n_layers"]):
            specs += [
                HookSpec(f"blocks.{i}.resid_pre", "other", D, layer=i),
                HookSpec(f"blocks.{i}.attn.pattern", "attn_pattern",
                         ("batch", "pos", "head", "key_pos"), layer=i),
                HookSpec(f"blocks.{i}.attn.out", "mixer", D, layer=i),
                HookSpec(f"blocks.{i}.resid_mid", "other", D, layer=i),
                HookSpec(f"blocks.{i}.mlp.out", "mlp", D, layer=i),
                HookSpec(f"blocks.{i}.resid_post", "stream", D, layer=i + 1),
            ]
        return specs + [HookSpec("logits", "logits", ("batch", "pos", "vocab"),
                                 layer=self.config["n_layers"] + 1)]

    def sites(self) -> dict[str, Site]:
        gpt = self.model.transformer
        sites = {"embed": Site(gpt.drop), "logits": Site(self.model.lm_head)}
        for i, block in enumerate(gpt.h):
            sites.update({
                f"blocks.{i}.resid_pre": Site(block, where="input"),
                f"blocks.{i}.attn.pattern": Site(block.attn.hook_pattern, to_canonical=_heads_last,
                                                 from_canonical=_heads_last),
                f"blocks.{i}.attn.out": Site(block.attn, index=0),
                f"blocks.{i}.resid_mid": Site(block.ln_2, where="input"),
                f"blocks.{i}.mlp.out": Site(block.mlp),
                f"blocks.{i}.resid_post": Site(block),
            })
        return sites
