"""GPT-NeoX / Pythia checkpoints (Hugging Face `GPTNeoXForCausalLM`), for researchers' own weights.

GPT-NeoX (Black et al. 2022; the Pythia suite, Biderman et al. 2023) is a pre-LayerNorm
decoder with a fused, per-head interleaved query-key-value `nn.Linear` (`query_key_value`),
partial rotary embeddings (the first `partial_rotary_factor` of each head's dimensions
rotate, Su et al. 2021) and, by default, a parallel residual: attention and MLP both read
the block's input, x + attn(ln1(x)) + mlp(ln2(x)). `from_pretrained` wraps a local
`save_pretrained` directory, strictly (`archbench.hf_checkpoint.load_strict`);
`organisms = False`, and `build_model` rebuilds a checkpoint's architecture at random init
from its config, for a seeded control.

The hook points are the shared decoder's (adapters/decoder.py), with `attn.rot_q` and
`attn.rot_k` (each head's whole query / key after the partial rotary embedding, (batch,
pos, head, d_head): the dimensions past the rotary part are q and k unchanged). With
`use_parallel_residual=True` (Pythia's setting) there is no `resid_mid`: nothing is
computed between the two branches, which both read `resid_pre`; with it False the block is
sequential and `resid_mid` (the MLP norm's input) is a hook point.
"""

from __future__ import annotations

from typing import Any

from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention

from archbench.adapters.decoder import DecoderAdapter, Parts


class GPTNeoXAdapter(DecoderAdapter):
    family = "gpt_neox"
    model_class = GPTNeoXForCausalLM
    attention_class = GPTNeoXAttention
    out_proj = "dense"
    qkv_layout = "per_head"
    rotary = True

    @classmethod
    def hf_config(cls, config: dict[str, Any]) -> GPTNeoXConfig:
        sized = {"vocab_size": config["vocab_size"], "max_position_embeddings": config["seq_len"]}
        if "hf_config" in config:
            return GPTNeoXConfig.from_dict({**config["hf_config"], **sized})
        return GPTNeoXConfig(**sized, hidden_size=config["d_model"], num_hidden_layers=config["n_layers"],
                             num_attention_heads=config["n_heads"], intermediate_size=config["d_mlp"],
                             bos_token_id=None, eos_token_id=None, pad_token_id=None)

    @classmethod
    def config_of(cls, hf: GPTNeoXConfig) -> dict[str, Any]:
        return {"vocab_size": hf.vocab_size, "seq_len": hf.max_position_embeddings, "d_model": hf.hidden_size,
                "n_layers": hf.num_hidden_layers, "n_heads": hf.num_attention_heads,
                "d_mlp": hf.intermediate_size, "hf_config": hf.to_dict()}

    @staticmethod
    def _blocks(model: GPTNeoXForCausalLM):
        return model.gpt_neox.layers

    @staticmethod
    def _parts(block) -> Parts:
        attn, mlp = block.attention, block.mlp
        return Parts(ln1=block.input_layernorm, attn=attn, qkv=attn.query_key_value, out_proj=attn.dense,
                     ln2=block.post_attention_layernorm, mlp=mlp, fc_in=mlp.dense_h_to_4h, fc_out=mlp.dense_4h_to_h,
                     parallel=block.use_parallel_residual)

    def _embeddings(self):
        return [("embed", self.model.gpt_neox.embed_in)]

    def _final_norm(self):
        return self.model.gpt_neox.final_layer_norm
