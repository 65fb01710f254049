"""The masked-diffusion adapter: parity with Hugging Face BERT, noise level, unmasking, training."""

import pytest
import torch
from transformers import BertForMaskedLM

from archbench.adapters.diffusion import DiffusionAdapter
from archbench.hooks import Patch, Zero
from archbench.tasks.modadd import ModAdd

torch.set_num_threads(1)


@pytest.fixture
def diff():
    return DiffusionAdapter.build(vocab_size=10, seq_len=6, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def _with_slot(tokens, mask_id=10):
    return torch.cat([tokens, torch.full_like(tokens[:, :1], mask_id)], 1)  # (B, T+1)


def test_no_hook_run_is_exactly_the_wrapped_model(diff, tokens):
    with torch.no_grad():
        own = diff.model(input_ids=_with_slot(tokens)).logits  # (B, T+1, V+1)
    assert torch.equal(diff.run(tokens).logits, own[:, 1:, :10])
    assert torch.equal(diff.run(tokens, cache="all").logits, own[:, 1:, :10])


def test_editable_attention_equals_transformers_eager(diff, tokens):
    ours = diff.run(tokens).logits
    diff.model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            eager = diff.model(input_ids=_with_slot(tokens)).logits[:, 1:, :10]
    finally:
        diff.model.config._attn_implementation = "archbench_eager"
    assert torch.allclose(ours, eager, atol=1e-6)


def test_every_hook_point_fires_with_its_axes(diff, tokens):
    out = diff.run(tokens, cache="all")
    assert set(out.cache) == set(diff.specs)
    for name, spec in diff.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (4, 7), name  # T inputs + the answer slot
    pattern = out.cache["blocks.0.attn.pattern"]
    assert pattern[:, 0, :, 1:].abs().max() > 0  # bidirectional: position 0 attends to the future
    assert torch.allclose(diff.decode(out.cache["blocks.1.resid_post"])[:, 1:], out.logits, atol=1e-5)


def test_zero_mixer_changes_logits_everywhere(diff, tokens):
    base = diff.run(tokens).logits
    out = diff.run(tokens, interventions={"blocks.0.attn.out": Zero(positions=[5])}).logits
    assert not torch.allclose(out[:, 0], base[:, 0])  # bidirectional: earlier positions change too
    assert not torch.allclose(out[:, -1], base[:, -1])


def test_patch_whole_stream_reproduces_source_run(diff, tokens):
    source = tokens.flip(0)
    src = diff.run(source, cache=["blocks.0.resid_post"]).cache["blocks.0.resid_post"]
    out = diff.run(tokens, interventions={"blocks.0.resid_post": Patch(src)}).logits
    assert torch.allclose(out, diff.run(source).logits, atol=1e-5)


def test_noise_level_is_a_run_argument(diff, tokens):
    clean = diff.run(tokens, cache=["embed"])
    noisy = diff.run(tokens, cache=["embed"], t=0.5)
    again = diff.run(tokens, cache=["embed"], t=0.5)
    assert torch.equal(noisy.logits, again.logits)  # seeded noise
    assert not torch.allclose(noisy.logits, clean.logits)
    assert diff.config["t"] == 0.0  # per call
    x = diff.noised(tokens, t=1.0)
    assert (x == 10).all()
    assert torch.equal(diff.noised(tokens, t=0.0)[:, :-1], tokens)


def test_iterative_unmasking_fills_every_slot(diff, tokens):
    ans = diff.answer(tokens)
    assert torch.equal(ans, diff.run(tokens).logits[:, -1].argmax(-1))  # t=0: one step = argmax
    full = diff.answer(tokens, t=1.0)  # generate everything from all-[MASK]
    assert full.shape == (4,) and (full < 10).all()


def test_loads_local_huggingface_checkpoint(diff, tokens, tmp_path):
    diff.model.save_pretrained(tmp_path / "hf")
    wrapped = DiffusionAdapter.from_pretrained(tmp_path / "hf")
    reference = BertForMaskedLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        own = reference(input_ids=_with_slot(tokens)).logits[:, 1:, :10]
    assert wrapped.config["vocab_size"] == 10
    assert torch.allclose(wrapped.run(tokens).logits, own, atol=1e-6)


def test_techniques_read_the_answer_slot_not_the_last_input():
    """Activations have T+1 positions; the answer is computed at the slot (position T)."""
    from archbench.tasks.count import Count
    from archbench.techniques.patching import Patching
    from archbench.techniques.probe import Probe

    task = Count()
    adapter = DiffusionAdapter.for_task(task, 0)
    T = task.seq_len
    assert adapter.answer_position(T) == T
    acts = adapter.run(task.sample(4, 0).tokens, cache="stream").cache
    assert all(a.shape[1] == T + 1 for a in acts.values())
    # count's running count is per position: the probe reads the T input positions only
    assert Probe(n_train=64, n_test=32, steps=5)(adapter, task, 0).applicable
    patch = Patching(n_pairs=8)(adapter, task, 0)
    positions = {d["position"] for d in patch.details}
    assert positions == set(range(T + 1)) | {"aligned"}  # the inputs, the answer slot, each pair's change
    readout = [d for d in patch.details if d["trivial_reason"] == "readout input"]
    assert {d["position"] for d in readout} == {T}  # the deepest site at the slot, not at T - 1
