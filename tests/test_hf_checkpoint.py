"""Strict checkpoint loading and the checkpoint -> adapter map (`archbench.hf_checkpoint`).

Tiny checkpoints of each supported class are saved with `save_pretrained` (the adapters'
own random-init models are transformers models) and loaded back through the adapter that
`family_for` names.
"""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig

from archbench import registry
from archbench.adapters.transformer import TransformerAdapter
from archbench.hf_checkpoint import FAMILIES, family_for, load_strict

TOKENS = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    TransformerAdapter.build(vocab_size=10, seq_len=6, seed=0).model.save_pretrained(path)
    return path


def test_a_llama_checkpoint_loads_strictly_and_reproduces_the_logits(llama_dir):
    built = TransformerAdapter.build(vocab_size=10, seq_len=6, seed=0)
    wrapped = TransformerAdapter.from_pretrained(llama_dir)
    assert torch.equal(wrapped.run(TOKENS).logits, built.run(TOKENS).logits)
    wide = TransformerAdapter.from_pretrained(llama_dir, dtype=torch.float64)  # kwargs reach transformers
    assert wide.model.lm_head.weight.dtype == torch.float64


def test_the_llama_adapter_refuses_a_gpt_neox_checkpoint(tmp_path):
    cfg = GPTNeoXConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=8)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        TransformerAdapter.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {tmp_path}: model_type 'gpt_neox', not 'llama'")
    assert "gpt_neox adapter" in msg


def test_a_checkpoint_with_a_deleted_tensor_is_refused_in_one_line(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        TransformerAdapter.from_pretrained(broken)
    assert str(err.value) == f"checkpoint {broken}: 1 weight missing (model.layers.1.self_attn.k_proj.weight)"


def test_unexpected_weights_are_refused(llama_dir, tmp_path):
    extra = tmp_path / "extra"
    shutil.copytree(llama_dir, extra)
    weights = load_file(extra / "model.safetensors")
    weights.update({f"model.layers.9.extra{i}.weight": torch.zeros(2) for i in range(4)})
    save_file(weights, extra / "model.safetensors", metadata={"format": "pt"})
    from transformers import LlamaForCausalLM

    with pytest.raises(ValueError, match=r"4 weights unexpected \(model.layers.9.extra0.weight, "
                                         r"model.layers.9.extra1.weight, model.layers.9.extra2.weight, \.\.\.\)$"):
        load_strict(LlamaForCausalLM, extra)


BUILD = {"transformer": {}, "gpt2": {}, "gpt_neox": {}, "qwen2": {}, "moe": {}, "mamba": {}, "mamba2": {}, "rwkv": {}}


@pytest.mark.parametrize("family", sorted(BUILD))
def test_family_for_names_the_adapter_that_loads_the_checkpoint(family, tmp_path):
    built = registry.adapter(family).build(vocab_size=10, seq_len=6, seed=0, **BUILD[family])
    built.model.save_pretrained(tmp_path)
    assert family_for(tmp_path) == family and family_for(built.model.config) == family
    wrapped = registry.adapter(family_for(tmp_path)).from_pretrained(tmp_path)
    assert torch.allclose(wrapped.run(TOKENS).logits, built.run(TOKENS).logits, atol=1e-6)


def test_family_for_refuses_classes_no_adapter_loads(tmp_path):
    for cfg in (MistralConfig(),):
        cfg.save_pretrained(tmp_path / cfg.model_type)
        with pytest.raises(ValueError) as err:
            family_for(tmp_path / cfg.model_type)
        msg = str(err.value)
        assert "\n" not in msg and f"model_type {cfg.model_type!r} has no archbench adapter" in msg
        assert msg.endswith("supported: " + ", ".join(sorted(FAMILIES)))
    with pytest.raises(ValueError, match="model_type 'bert' has no archbench adapter"):
        family_for({"model_type": "bert"})
    with pytest.raises(ValueError, match="no config.json"):
        family_for(tmp_path)


def test_family_for_reads_a_gguf_files_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "gpt2")
    writer.add_name("tiny")
    writer.add_context_length(8)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_feed_forward_length(16)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tensor("token_embd.weight", torch.zeros(10, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert family_for(tmp_path, gguf_file="tiny.gguf") == "gpt2"


def test_gguf_loading_draws_no_progress_bar_of_its_own(capfd):
    """transformers' GGUF loader calls its module's `tqdm` directly; inside
    `quiet_gguf_loading` that bar is disabled (it would write over archbench's display),
    and outside it transformers' own bar is back."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from archbench.hf_checkpoint import quiet_gguf_loading

    with quiet_gguf_loading():
        list(gguf_utils.tqdm(range(3), desc="de-quantizing"))
    assert "de-quantizing" not in capfd.readouterr().err
    list(gguf_utils.tqdm(range(3), desc="de-quantizing"))
    assert "de-quantizing" in capfd.readouterr().err
