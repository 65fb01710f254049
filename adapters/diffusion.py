"""Masked-diffusion language model: a bidirectional BERT (Hugging Face `BertForMaskedLM`).

A masked (absorbing-state) diffusion LM corrupts a sequence by replacing each token with
[MASK] with probability t (the noise level) and learns to predict the masked tokens from the
rest; it generates by starting from all-[MASK] and iteratively unmasking (Austin et al. 2021,
D3PM; Sahoo et al. 2024, MDLM; Shi et al. 2024; Nie et al. 2025, LLaDA). Here the sequence is
the task's input followed by one answer slot. Training (`fit`, overridden) masks the answer
slot always and every input position with a ratio r ~ U(0, max_mask) drawn per example, and
minimises cross-entropy on all masked positions (inputs weighted by `input_loss_weight`).
Answering unmasks the answer slot (and, at noise level t > 0, the masked inputs) iteratively,
most confident first (`answer`).

Token ids: the task's vocabulary V, plus [MASK] = V. `forward(tokens)` appends the masked
answer slot and returns the logits over the task's vocabulary at positions 1..T, so position
T-1 (the last input position, as for the causal families) holds the answer slot's prediction.
Activations have T+1 positions: the T inputs and then the answer slot. `run(..., t=...)`
masks each input position with probability t (seeded by `noise_seed`) before the forward, so
techniques can sweep the noise level; t=0 (default) masks only the answer slot.

BERT is post-LayerNorm: `blocks.{i}.attn.out` and `blocks.{i}.mlp.out` are the attention and
feed-forward contributions before their residual LayerNorm; `blocks.{i}.resid_post` is the
layer output. Attention runs through archbench's editable eager attention (no mask:
bidirectional). `from_pretrained` wraps a local `save_pretrained` directory whose vocabulary
ends with the [MASK] id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch.nn import functional as F
from transformers import BertConfig, BertForMaskedLM
from transformers.models.bert.modeling_bert import BertSelfAttention

from archbench import hf_attention
from archbench.adapter import Adapter, Hook, RunOutput, Site, hook
from archbench.hooks import InterventionLike

D = ("batch", "pos", "d_model")


class DiffusionAdapter(Adapter):
    family = "diffusion"
    capabilities = frozenset({"gradients", "trainable", "attention", "readout"})
    default_config = {"d_model": 64, "n_layers": 2, "n_heads": 4, "t": 0.0, "noise_seed": 0}
    train_config = {**Adapter.train_config, "max_mask": 0.5, "input_loss_weight": 0.5}
    task_train_config = {
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192},
        "parity": {"steps": 2500},
    }

    @property
    def mask_id(self) -> int:
        return self.config["vocab_size"]

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> BertForMaskedLM:
        d = config["d_model"]
        hf = BertConfig(vocab_size=config["vocab_size"] + 1, hidden_size=d,
                        num_hidden_layers=config["n_layers"], num_attention_heads=config["n_heads"],
                        intermediate_size=4 * d, max_position_embeddings=config["seq_len"] + 1,
                        type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=None, is_decoder=False)
        return cls._prepare(BertForMaskedLM(hf))

    @staticmethod
    def _prepare(model: BertForMaskedLM) -> BertForMaskedLM:
        model.config._attn_implementation = hf_attention.NAME
        hf_attention.install(model, BertSelfAttention)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DiffusionAdapter":
        """Wrap a local `save_pretrained` BertForMaskedLM directory (last vocabulary id = [MASK])."""
        model = cls._prepare(BertForMaskedLM.from_pretrained(str(path), local_files_only=True))
        c = model.config
        return cls(model, {"vocab_size": c.vocab_size - 1, "seq_len": c.max_position_embeddings - 1,
                           "d_model": c.hidden_size, "n_layers": c.num_hidden_layers,
                           "n_heads": c.num_attention_heads, "t": 0.0, "noise_seed": 0, "source": str(path)})

    # ---- noise and the answer slot ----------------------------------------------------
    def noised(self, tokens: torch.Tensor, t: float | None = None, seed: int | None = None) -> torch.Tensor:
        """(B, T) inputs -> (B, T+1) model inputs: each input masked with probability t, answer slot masked."""
        t = self.config["t"] if t is None else t
        x = torch.cat([tokens, torch.full_like(tokens[:, :1], self.mask_id)], 1)  # (B, T+1)
        if t > 0:
            gen = torch.Generator().manual_seed(self.config["noise_seed"] if seed is None else seed)
            drop = torch.rand(tokens.shape, generator=gen) < t  # (B, T)
            x[:, :-1] = torch.where(drop.to(tokens.device), self.mask_id, tokens)
        return x

    def answer_position(self, seq_len: int) -> int:
        return seq_len  # the answer slot after the seq_len inputs

    def model_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model on (B, T+1) ids -> logits over the task vocabulary (B, T+1, V)."""
        return self.model(input_ids=x).logits[..., : self.mask_id]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model_logits(self.noised(tokens))[:, 1:]  # (B, T, V): position T-1 = answer slot

    def run(self, tokens: torch.Tensor, cache: Iterable[str] | str | None = None,
            interventions: Mapping[str, InterventionLike] | None = None,
            grad: bool = False, t: float | None = None, noise_seed: int | None = None) -> RunOutput:
        """`Adapter.run` at noise level t (default: config["t"], 0 = only the answer slot masked)."""
        if t is None and noise_seed is None:
            return super().run(tokens, cache, interventions, grad)
        before = dict(self.config)
        self.config["t"] = before["t"] if t is None else t
        self.config["noise_seed"] = before["noise_seed"] if noise_seed is None else noise_seed
        try:
            return super().run(tokens, cache, interventions, grad)
        finally:
            self.config.update(before)

    @torch.no_grad()
    def answer(self, tokens: torch.Tensor, t: float | None = None, per_step: int = 1) -> torch.Tensor:
        """Iterative unmasking: fill `per_step` masked positions per pass, most confident first;
        return the token placed in the answer slot, (B,)."""
        x = self.noised(tokens, t)  # (B, T+1)
        while bool((x == self.mask_id).any()):
            probs = self.model_logits(x).softmax(-1)  # (B, T+1, V)
            conf, tok = probs.max(-1)  # (B, T+1)
            masked = x == self.mask_id
            conf = conf.masked_fill(~masked, -1.0)
            k = min(per_step, x.shape[1])
            top = conf.topk(k, -1).indices  # (B, k)
            fill = torch.zeros_like(masked).scatter(1, top, True) & masked  # (B, T+1)
            x = torch.where(fill, tok, x)
        return x[:, -1]

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        return torch.cat([self.answer(tokens[i:i + batch]) for i in range(0, len(tokens), batch)])

    # ---- training: random mask ratio per example ----------------------------------------
    def loss(self, tokens: torch.Tensor, answer: torch.Tensor, cfg: dict[str, Any],
             gen: torch.Generator) -> torch.Tensor:
        """Masked-diffusion loss on the answer slot plus inputs masked at ratio r ~ U(0, max_mask)."""
        clean = torch.cat([tokens, answer[:, None]], 1)  # (batch, T+1)
        ratio = torch.rand(len(tokens), 1, generator=gen) * cfg["max_mask"]  # (batch, 1)
        masked = torch.rand(clean.shape, generator=gen) < ratio  # (batch, T+1)
        masked[:, -1] = True  # the answer slot is always noised
        logits = self.model_logits(torch.where(masked, self.mask_id, clean))  # (batch, T+1, V)
        answer_loss = F.cross_entropy(logits[:, -1], clean[:, -1])
        inputs = masked[:, :-1]
        input_loss = (F.cross_entropy(logits[:, :-1][inputs], clean[:, :-1][inputs])
                      if bool(inputs.any()) else logits.sum() * 0)
        return answer_loss + cfg["input_loss_weight"] * input_loss

    # ---- hooks --------------------------------------------------------------------------
    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.cls(stream)[..., : self.mask_id]  # (B, T+1, V)

    def hooks(self) -> list[Hook]:
        bert = self.model.bert
        heads_last = lambda p: p.permute(0, 2, 1, 3)  # (B, nh, q, k) <-> (B, q, nh, k)  # noqa: E731
        out = [hook("embed", "embed", D, 0, Site(bert.embeddings))]
        for i, layer in enumerate(bert.encoder.layer):
            out += [
                hook(f"blocks.{i}.attn.pattern", "attn_pattern", ("batch", "pos", "head", "key_pos"), i,
                     Site(layer.attention.self.hook_pattern, to_canonical=heads_last, from_canonical=heads_last)),
                hook(f"blocks.{i}.attn.out", "mixer", D, i, Site(layer.attention.output.dense)),
                hook(f"blocks.{i}.mlp.out", "mlp", D, i, Site(layer.output.dense)),
                hook(f"blocks.{i}.resid_post", "stream", D, i + 1, Site(layer)),
            ]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), len(bert.encoder.layer) + 1,
                           Site(self.model.cls))]
