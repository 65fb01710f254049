"""The conventions researchers expect: TransformerLens hook names, per-head hook points,
`inspect` and `zoo ls` tables.

Tiny random-init models; every expected value follows from the computation (a zeroed query
makes attention uniform, zeroed values make the attention output zero, ...).
"""

import pytest
import torch

from archbench.adapters.looped import LoopedAdapter
from archbench.adapters.moe import MoEAdapter
from archbench.adapters.transformer import TransformerAdapter
from archbench.hooks import Patch, Zero


@pytest.fixture
def moe():
    return MoEAdapter.build(vocab_size=10, seq_len=6, seed=0)


def wrapped_logits(adapter, tokens):
    with torch.no_grad():
        return adapter.model(input_ids=tokens, use_cache=False).logits  # (B, T, V)


# ---- TransformerLens aliases -------------------------------------------------------------------

def test_tl_resid_post_is_the_same_tensor_as_resid_post(gpt, tokens):
    out = gpt.run(tokens, cache=["blocks.0.hook_resid_post", "blocks.0.resid_post"])
    assert list(out.cache) == ["blocks.0.resid_post", "blocks.0.hook_resid_post"]
    assert torch.equal(out.cache["blocks.0.hook_resid_post"], out.cache["blocks.0.resid_post"])
    alone = gpt.run(tokens, cache="blocks.0.hook_resid_post").cache
    assert list(alone) == ["blocks.0.hook_resid_post"]  # keyed by the name asked for, nothing else
    assert torch.equal(alone["blocks.0.hook_resid_post"], out.cache["blocks.0.resid_post"])


def test_looped_iterations_answer_to_the_unrolled_tl_block_names(tokens):
    looped = LoopedAdapter.build(vocab_size=10, seq_len=6, seed=0, n_loops=3)
    aliases = looped.aliases()
    assert sorted(a.target for a in aliases.values()) == sorted(n for n, s in looped.specs.items()
                                                                 if s.role != "logits")
    out = looped.run(tokens, cache=["blocks.2.hook_resid_post", "loops.2.resid_post", "blocks.1.hook_mlp_out"])
    assert torch.equal(out.cache["blocks.2.hook_resid_post"], out.cache["loops.2.resid_post"])
    edited = looped.run(tokens, interventions={"blocks.0.hook_attn_out": Zero()}).logits
    assert torch.equal(edited, looped.run(tokens, interventions={"loops.0.attn.out": Zero()}).logits)
    assert "blocks.4.hook_resid_post" in looped.run(tokens, loops=5, cache="blocks.4.hook_resid_post").cache


def test_tl_axis_orders(gpt, tokens):
    c = gpt.run(tokens, cache=["blocks.0.attn.hook_pattern", "blocks.0.attn.pattern", "blocks.0.attn.hook_q",
                               "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z",
                               "blocks.0.attn.hook_result", "blocks.0.attn.hook_attn_scores"]).cache
    b, t, h, d_head = 4, 6, 4, 16
    assert c["blocks.0.attn.hook_pattern"].shape == (b, h, t, t)  # (batch, head, query, key)
    assert torch.equal(c["blocks.0.attn.hook_pattern"], c["blocks.0.attn.pattern"].permute(0, 2, 1, 3))
    assert c["blocks.0.attn.hook_pattern"][:, :, 0, 1:].abs().max() == 0  # query 0 sees key 0 only
    for name in ("hook_q", "hook_k", "hook_v", "hook_z"):
        assert c[f"blocks.0.attn.{name}"].shape == (b, t, h, d_head), name  # (batch, pos, head, d_head)
    assert c["blocks.0.attn.hook_result"].shape == (b, t, h, 64)
    assert c["blocks.0.attn.hook_attn_scores"].shape == (b, h, t, t)
    assert torch.allclose(c["blocks.0.attn.hook_attn_scores"].softmax(-1), c["blocks.0.attn.hook_pattern"], atol=1e-6)


def test_every_hook_point_has_one_tl_alias(gpt, moe):
    for adapter in (gpt, moe):
        aliases = adapter.aliases()
        targets = [a.target for a in aliases.values()]
        assert len(targets) == len(set(targets))  # one alias per hook point
        assert set(targets) <= set(adapter.specs)
        assert "hook_embed" in aliases and "ln_final.hook_normalized" in aliases
        assert adapter.aliases()["blocks.1.hook_mlp_out"].target == (
            "blocks.1.moe.out" if adapter is moe else "blocks.1.mlp.out")
    missing = set(gpt.specs) - {a.target for a in gpt.aliases().values()}
    assert missing == {"logits"}  # TransformerLens has no hook on the logits themselves


def test_aliases_resolve_in_names(gpt):
    assert gpt.names(["blocks.1.hook_resid_post", "blocks.0.hook_attn_out"]) == [
        "blocks.0.attn.out", "blocks.1.resid_post"]
    assert gpt.canonical("blocks.0.attn.hook_pattern") == "blocks.0.attn.pattern"
    with pytest.raises(KeyError, match="no hook point"):
        gpt.run(torch.zeros(1, 6, dtype=torch.long), cache=["blocks.0.hook_resid_psot"])


def test_reading_every_alias_and_hook_leaves_the_logits_bit_for_bit(gpt, moe, tokens):
    for adapter in (gpt, moe):
        own = wrapped_logits(adapter, tokens)
        assert torch.equal(adapter.run(tokens, cache="all").logits, own)
        out = adapter.run(tokens, cache=list(adapter.aliases()))
        assert torch.equal(out.logits, own) and set(out.cache) == set(adapter.aliases())


def test_an_edit_through_an_alias_is_the_edit_at_its_target(gpt, tokens):
    canonical = gpt.run(tokens, interventions={"blocks.0.resid_post": Zero(positions=[2])}).logits
    aliased = gpt.run(tokens, interventions={"blocks.0.hook_resid_post": Zero(positions=[2])}).logits
    assert torch.equal(canonical, aliased) and not torch.allclose(canonical, gpt.run(tokens).logits)

    seen = {}

    def uniform(pattern, spec):  # TransformerLens order: (batch, head, query, key)
        seen["shape"], seen["name"] = tuple(pattern.shape), spec.name
        causal = torch.tril(torch.ones(6, 6))
        return (causal / causal.sum(-1, keepdim=True)).expand_as(pattern)

    out = gpt.run(tokens, interventions={"blocks.0.attn.hook_pattern": uniform}, cache=["blocks.0.attn.pattern"])
    assert seen == {"shape": (4, 4, 6, 6), "name": "blocks.0.attn.hook_pattern"}
    assert torch.allclose(out.cache["blocks.0.attn.pattern"][0, 2, 0], torch.tensor([1 / 3] * 3 + [0] * 3))


def test_positions_on_a_heads_first_alias_are_refused(gpt, tokens):
    with pytest.raises(ValueError, match="blocks.0.attn.pattern to select positions"):
        gpt.run(tokens, interventions={"blocks.0.attn.hook_pattern": Zero(positions=[1])})


def test_one_hook_point_under_two_names_is_refused(gpt, tokens):
    with pytest.raises(ValueError, match="same hook point"):
        gpt.run(tokens, interventions={"blocks.0.resid_post": Zero(), "blocks.0.hook_resid_post": Zero()})


def test_patching_through_aliases_reproduces_the_source_run(gpt, tokens):
    source = tokens.flip(0)
    src = gpt.run(source, cache=["blocks.0.attn.hook_z"]).cache["blocks.0.attn.hook_z"]
    patched = gpt.run(tokens, interventions={"blocks.0.attn.hook_z": Patch(src)}, cache=["blocks.0.attn.out"])
    clean_src = gpt.run(source, cache=["blocks.0.attn.out"]).cache["blocks.0.attn.out"]
    assert torch.allclose(patched.cache["blocks.0.attn.out"], clean_src, atol=1e-6)


# ---- per-head outputs, q/k/v, norms: real hook points ------------------------------------------

def test_zero_query_or_key_makes_attention_uniform(gpt, tokens):
    causal = torch.tril(torch.ones(6, 6))
    uniform = causal / causal.sum(-1, keepdim=True)  # (q, k)
    for site in ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.rot_q", "blocks.0.attn.hook_k"):
        out = gpt.run(tokens, interventions={site: Zero()}, cache=["blocks.0.attn.hook_pattern"])
        pattern = out.cache["blocks.0.attn.hook_pattern"]  # (B, head, q, k)
        assert torch.allclose(pattern, uniform.expand_as(pattern), atol=1e-6), site
        assert not torch.allclose(out.logits, gpt.run(tokens).logits), site


def test_zero_values_zero_the_attention_output(gpt, tokens):
    out = gpt.run(tokens, interventions={"blocks.1.attn.hook_v": Zero()},
                  cache=["blocks.1.attn.z", "blocks.1.attn.out", "blocks.1.resid_mid", "blocks.1.resid_pre"])
    c = out.cache
    assert c["blocks.1.attn.z"].abs().max() == 0 and c["blocks.1.attn.out"].abs().max() == 0  # no biases
    assert torch.equal(c["blocks.1.resid_mid"], c["blocks.1.resid_pre"])


def test_head_outputs_sum_to_the_attention_output(gpt, tokens):
    c = gpt.run(tokens, cache=["blocks.0.attn.head_out", "blocks.0.attn.out"]).cache
    assert torch.allclose(c["blocks.0.attn.head_out"].sum(2), c["blocks.0.attn.out"], atol=1e-6)


def test_editing_one_head_removes_exactly_that_head(gpt, tokens):
    clean = gpt.run(tokens, cache=["blocks.0.attn.head_out", "blocks.0.attn.out"]).cache

    def drop_head_2(act, spec):  # (batch, pos, head, ...)
        act = act.clone()
        act[:, :, 2] = 0
        return act

    by_result = gpt.run(tokens, interventions={"blocks.0.attn.hook_result": drop_head_2}, cache=["blocks.0.attn.out"])
    by_z = gpt.run(tokens, interventions={"blocks.0.attn.z": drop_head_2}, cache=["blocks.0.attn.out"])
    expected = clean["blocks.0.attn.out"] - clean["blocks.0.attn.head_out"][:, :, 2]
    assert torch.allclose(by_result.cache["blocks.0.attn.out"], expected, atol=1e-6)
    assert torch.allclose(by_z.cache["blocks.0.attn.out"], expected, atol=1e-6)
    assert torch.allclose(by_result.logits, by_z.logits, atol=1e-5)
    assert not torch.allclose(by_result.logits, gpt.run(tokens).logits)


def test_scores_edit_takes_effect(gpt, tokens):
    def favour_key_0(scores, spec):  # (batch, head, query, key)
        scores = scores.clone()
        scores[..., 0] += 100.0
        return scores

    out = gpt.run(tokens, interventions={"blocks.0.attn.hook_attn_scores": favour_key_0},
                  cache=["blocks.0.attn.hook_pattern"])
    pattern = out.cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern[..., 0], torch.ones_like(pattern[..., 0]), atol=1e-6)


def test_normalized_hooks(gpt, tokens):
    c = gpt.run(tokens, cache=["blocks.0.resid_pre", "blocks.0.ln1.hook_normalized", "blocks.1.resid_post",
                               "ln_final.hook_normalized"]).cache
    x = c["blocks.0.resid_pre"]
    rms = x.pow(2).mean(-1, keepdim=True).add(gpt.model.config.rms_norm_eps).rsqrt()
    assert torch.allclose(c["blocks.0.ln1.hook_normalized"], x * rms, atol=1e-6)  # before the weight
    y = c["blocks.1.resid_post"]
    eps = gpt.model.config.rms_norm_eps
    assert torch.allclose(c["ln_final.hook_normalized"], y * y.pow(2).mean(-1, keepdim=True).add(eps).rsqrt(), atol=1e-6)
    # zeroing the final normalized stream leaves the readout nothing: lm_head has no bias
    assert gpt.run(tokens, interventions={"ln_final.hook_normalized": Zero()}).logits.abs().max() == 0
    # zeroing block 0's attention input zeroes q, k and v, hence the attention output
    out = gpt.run(tokens, interventions={"blocks.0.ln1.hook_normalized": Zero()}, cache=["blocks.0.attn.out"])
    assert out.cache["blocks.0.attn.out"].abs().max() == 0


def test_norm_weight_applies_after_the_normalized_hook(gpt, tokens):
    gpt.model.model.norm.weight.data.mul_(2.0)  # a trained weight is not 1
    c = gpt.run(tokens, cache=["ln_final.hook_normalized", "blocks.1.resid_post"]).cache
    x = c["blocks.1.resid_post"]
    assert torch.allclose(c["ln_final.hook_normalized"], x * x.pow(2).mean(-1, keepdim=True).add(gpt.model.config.rms_norm_eps).rsqrt(),
                          atol=1e-6)
    assert torch.equal(gpt.run(tokens, cache="all").logits, wrapped_logits(gpt, tokens))


def test_mlp_hidden_hooks(gpt, tokens):
    c = gpt.run(tokens, cache=["blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.0.mlp.hook_post"]).cache
    silu = torch.nn.functional.silu
    assert torch.allclose(c["blocks.0.mlp.hook_post"], silu(c["blocks.0.mlp.hook_pre"]) * c["blocks.0.mlp.hook_pre_linear"],
                          atol=1e-6)
    out = gpt.run(tokens, interventions={"blocks.0.mlp.hook_post": Zero()}, cache=["blocks.0.mlp.out"])
    assert out.cache["blocks.0.mlp.out"].abs().max() == 0


def test_instrumented_model_keeps_its_state_dict_and_init(tokens):
    from transformers import LlamaConfig, LlamaForCausalLM

    adapter = TransformerAdapter.build(vocab_size=10, seq_len=6, seed=0)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=10, max_position_embeddings=6, hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, tie_word_embeddings=False, bos_token_id=None,
                                         eos_token_id=None, pad_token_id=None))
    ours, theirs = adapter.model.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---- `archbench inspect` and `archbench zoo ls` --------------------------------------------------

def test_inspect_lists_tl_names_and_loads_only_the_requested_adapter(capsys, monkeypatch):
    from archbench import registry
    from archbench.cli import main

    loaded = []
    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda kind, name: loaded.append((kind, name)) or real_get(kind, name))
    assert main(["inspect", "transformer", "--task", "modadd"]) == 0
    assert [name for kind, name in loaded if kind == "adapters"] == ["transformer"]
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("TransformerLens name "))
    row = next(line for line in lines[head:] if line.startswith("blocks.0.attn.hook_pattern "))
    assert row.split("  ")[0].strip() == "blocks.0.attn.hook_pattern"
    assert [c.strip() for c in row.split("  ") if c.strip()] == [
        "blocks.0.attn.hook_pattern", "blocks.0.attn.pattern", "batch, head, query_pos, key_pos", "(2, 4, 3, 3)"]
    assert lines[head + 1].startswith("-----")


def _columns(rule: str) -> list[tuple[int, int]]:
    """(start, end) of each column, from the rule of dashes under the header."""
    import re

    return [m.span() for m in re.finditer(r"-+", rule)]


def test_zoo_ls_is_an_aligned_table_with_gate_status(capsys):
    from archbench import zoo
    from archbench.cli import main

    zoo.plant("transformer", "modadd", 0, accuracy=1.0)
    zoo.plant("transformer", "modadd", 1, accuracy=0.8996)  # reads 0.899, and fails the 0.90 gate
    assert main(["zoo", "ls"]) == 0
    header, rule, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["arch", "task", "seed", "accuracy", "gate", "0.90", "stopped", "steps", "seconds",
                              "check", "path"]
    spans = _columns(rule)
    cells = [[row[a:b].strip() for a, b in spans[:-1]] + [row[spans[-1][0]:].strip()] for row in rows]
    assert [c[:6] for c in cells] == [["transformer", "modadd", "0", "1.000", "pass", "?"],
                                      ["transformer", "modadd", "1", "0.899", "fail", "?"]]
    assert all(c[8] == "ok" for c in cells)  # planted organisms carry their weights' hash
    assert all(c[9].endswith(("seed0-" + c[9].rsplit("-", 1)[-1], "seed1-" + c[9].rsplit("-", 1)[-1])) for c in cells)
    assert main(["zoo", "ls", "--gate", "0.85"]) == 0  # the status follows the gate asked for
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert "gate 0.85" in header and all(" pass " in row for row in rows)


def test_zoo_ls_of_an_empty_cache_says_how_to_fill_it(capsys):
    from archbench.cli import main

    assert main(["zoo", "ls"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].split()[:2] == ["arch", "task"] and len(out.out.splitlines()) == 2
    assert "zoo build" in out.err and out.err.count("\n") == 1


def test_instrumented_classes_are_importable_by_name(gpt, tokens):
    import pickle  # in memory only: checks that the swapped classes resolve by name (process pools)

    again = pickle.loads(pickle.dumps(gpt.model))
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens, use_cache=False).logits, wrapped_logits(gpt, tokens))
    assert type(again.model.norm).__name__ == "HookedLlamaRMSNorm"
