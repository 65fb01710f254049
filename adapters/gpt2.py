"""GPT-2 checkpoints (Hugging Face `GPT2LMHeadModel`), for researchers' own weights.

GPT-2 (Radford et al. 2019) is a pre-LayerNorm decoder with learned absolute positions, a
fused query-key-value `Conv1D` (`c_attn`) and a GELU MLP. `from_pretrained` wraps a local
`save_pretrained` directory, strictly (`archbench.hf_checkpoint.load_strict`); archbench
trains no GPT-2 organisms (the reference is the Llama-style adapter; measured there, a tiny
GPT-2 stayed at chance on `recall`), so `organisms = False`, but `build_model` rebuilds a
checkpoint's architecture at random init from its config, for a seeded control.

The hook points are the shared decoder's (adapters/decoder.py) plus `pos_embed` (the
learned position embedding, TransformerLens's `hook_pos_embed`; `embed` is the token
embedding and `blocks.0.resid_pre` their sum). No rotary embedding, so no `rot_q`/`rot_k`.
Attention runs through archbench's eager function, which ignores `reorder_and_upcast_attn`
(off by default; in float32 the difference is rounding only).
"""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from archbench.adapters.decoder import DecoderAdapter, Parts


class GPT2Adapter(DecoderAdapter):
    family = "gpt2"
    model_class = GPT2LMHeadModel
    attention_class = GPT2Attention
    out_proj = "c_proj"
    qkv_layout = "qkv"

    @classmethod
    def hf_config(cls, config: dict[str, Any]) -> GPT2Config:
        sized = {"vocab_size": config["vocab_size"], "n_positions": config["seq_len"]}
        if "hf_config" in config:
            return GPT2Config.from_dict({**config["hf_config"], **sized})
        return GPT2Config(**sized, n_embd=config["d_model"], n_layer=config["n_layers"], n_head=config["n_heads"],
                          n_inner=config["d_mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None)

    @classmethod
    def config_of(cls, hf: GPT2Config) -> dict[str, Any]:
        return {"vocab_size": hf.vocab_size, "seq_len": hf.n_positions, "d_model": hf.n_embd,
                "n_layers": hf.n_layer, "n_heads": hf.n_head, "d_mlp": hf.n_inner or 4 * hf.n_embd,
                "hf_config": hf.to_dict()}

    @staticmethod
    def _blocks(model: GPT2LMHeadModel):
        return model.transformer.h

    @staticmethod
    def _parts(block) -> Parts:
        return Parts(ln1=block.ln_1, attn=block.attn, qkv=block.attn.c_attn, out_proj=block.attn.c_proj,
                     ln2=block.ln_2, mlp=block.mlp, fc_in=block.mlp.c_fc, fc_out=block.mlp.c_proj, parallel=False)

    def _embeddings(self):
        return [("embed", self.model.transformer.wte), ("pos_embed", self.model.transformer.wpe)]

    def _final_norm(self):
        return self.model.transformer.ln_f
