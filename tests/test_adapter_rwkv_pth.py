"""The RWKV `.pth` adapter: v4/v5/v6 checkpoints through the `rwkv` package, hooked per layer."""

import gc
import os
import pickle

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("rwkv")

from archbench.adapters.rwkv_pth import (  # noqa: E402
    RWKVPthAdapter, _rwkv_model, detect_version, load_checkpoint, random_checkpoint)
from archbench.hooks import Add, Patch, Zero  # noqa: E402
from archbench.tasks.modadd import ModAdd  # noqa: E402

torch.set_num_threads(1)
VERSIONS = [4, 5.0, 5.1, 5.2, 6.0]


@pytest.fixture(autouse=True)
def no_gc_collect(monkeypatch):
    # the package calls gc.collect() per layer while loading, ~0.2 s each in a big test process
    monkeypatch.setattr(gc, "collect", lambda *args: 0)


def _write(path, version, n_layers=2, seed=0):
    state = random_checkpoint(version, vocab_size=12, d_model=32, n_layers=n_layers, head_size=8,
                              generator=torch.Generator().manual_seed(seed))
    torch.save(state, path)
    return path


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def ckpt(request, tmp_path):
    return request.param, _write(tmp_path / "model.pth", request.param)


@pytest.fixture
def tokens():
    return torch.randint(0, 12, (3, 6), generator=torch.Generator().manual_seed(0))  # (B, T)


def test_loads_each_version_and_capture_does_not_change_logits(ckpt, tokens):
    version, path = ckpt
    adapter = RWKVPthAdapter.from_pth(path)
    assert adapter.config["version"] == version == adapter.model.rwkv.version
    assert adapter.config["n_layers"] == 2 and adapter.config["d_model"] == 32
    reference = _rwkv_model().RWKV(str(path), "cpu fp32", verbose=False)  # the package, unwrapped
    own = torch.stack([reference.forward(row, None, full_output=True)[0] for row in tokens.tolist()])
    assert torch.equal(adapter.run(tokens).logits, own)
    assert torch.equal(adapter.run(tokens, cache="all").logits, own)


def test_every_hook_point_fires_with_its_axes(ckpt, tokens):
    adapter = RWKVPthAdapter.from_pth(ckpt[1])
    out = adapter.run(tokens, cache="all")
    assert set(out.cache) == set(adapter.specs)
    for name, spec in adapter.specs.items():
        t = out.cache[name]
        assert t.dim() == len(spec.axes) and t.shape[:2] == (3, 6), name
    c, w = out.cache, torch.load(ckpt[1], weights_only=True)
    embed = F.layer_norm(w["emb.weight"], (32,), w["blocks.0.ln0.weight"], w["blocks.0.ln0.bias"])
    assert torch.allclose(c["embed"], embed[tokens], atol=1e-6)  # ln0 is folded into the embedding
    assert torch.allclose(c["blocks.0.resid_post"], c["embed"] + c["blocks.0.wkv.out"]
                          + c["blocks.0.ffn.out"], atol=1e-5)
    assert torch.allclose(c["blocks.1.resid_post"], c["blocks.0.resid_post"] + c["blocks.1.wkv.out"]
                          + c["blocks.1.ffn.out"], atol=1e-5)
    assert torch.equal(adapter.decode(c["blocks.1.resid_post"]), out.logits)


@pytest.mark.parametrize("site", ["blocks.0.wkv.out", "blocks.1.wkv.out", "blocks.0.ffn.out",
                                  "blocks.1.resid_post", "embed"])
def test_intervention_on_a_layer_changes_the_output_from_its_position_on(tmp_path, tokens, site):
    adapter = RWKVPthAdapter.from_pth(_write(tmp_path / "v6.pth", 6.0))
    base = adapter.run(tokens).logits
    out = adapter.run(tokens, interventions={site: Zero(positions=[3])}).logits
    assert torch.equal(out[:, :3], base[:, :3])  # causal: earlier positions untouched
    assert not torch.allclose(out[:, 3:], base[:, 3:])


@pytest.mark.parametrize("version", [4, 5.2])
def test_interventions_see_the_whole_batch(tmp_path, tokens, version):
    adapter = RWKVPthAdapter.from_pth(_write(tmp_path / "m.pth", version))
    source = (tokens + 1) % 12  # every example gets a different source row
    name = "blocks.0.resid_post"
    src = adapter.run(source, cache=[name])
    # patching the stream everywhere with each example's own source row gives the source logits
    out = adapter.run(tokens, cache=[name], interventions={name: Patch(src.cache[name])})
    assert torch.equal(out.logits, src.logits) and torch.equal(out.cache[name], src.cache[name])
    # one position per example (a (batch,) tensor), as patching techniques use it
    at = torch.tensor([1, 4, 2])
    base = adapter.run(tokens).logits
    out = adapter.run(tokens, interventions={name: Patch(src.cache[name], positions=at)}).logits
    for b, t in enumerate(at.tolist()):
        assert torch.equal(out[b, :t], base[b, :t]) and not torch.allclose(out[b, t:], base[b, t:])
    # a steering vector on one layer's mixer output moves every example (not a constant one:
    # the LayerNorms remove it)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(3))  # (d_model,)
    steered = adapter.run(tokens, interventions={"blocks.1.wkv.out": Add(vector)}).logits
    assert not torch.isclose(steered, base).all(-1).any()


def test_single_token_sequences_use_the_one_step_path(tmp_path, tokens):
    adapter = RWKVPthAdapter.from_pth(_write(tmp_path / "v6.pth", 6.0))
    one = adapter.run(tokens[:, :1], cache="all")
    assert one.logits.shape == (3, 1, 12) and one.cache["blocks.1.resid_post"].shape == (3, 1, 32)
    assert torch.allclose(one.logits, adapter.run(tokens).logits[:, :1], atol=1e-5)


def test_hooks_removed_after_a_run_that_raises(tmp_path, tokens):
    adapter = RWKVPthAdapter.from_pth(_write(tmp_path / "v4.pth", 4))

    def boom(act, spec):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        adapter.run(tokens, cache="all", interventions={"blocks.1.ffn.out": boom})
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in adapter.model.modules())
    assert torch.equal(adapter.run(tokens).logits, adapter.run(tokens, cache="all").logits)


def test_no_gradients_no_training(tmp_path, tokens):
    task = ModAdd(p=5)
    adapter = RWKVPthAdapter.for_task(task, 0)  # a random-init checkpoint (the control)
    assert "gradients" not in adapter.capabilities and "trainable" not in adapter.capabilities
    with pytest.raises(NotImplementedError, match="inference only"):
        adapter.fit(task, 0)
    with pytest.raises(ValueError, match="no gradients"):
        adapter.run(task.sample(4, 0, "test").tokens, grad=True)
    with pytest.raises(NotImplementedError, match="from_pth"):
        adapter.save(tmp_path / "org")


def test_techniques_run_and_gradient_methods_fall_back():
    from archbench.techniques.attribution import Attribution
    from archbench.techniques.logit_lens import LogitLens
    from archbench.techniques.patching import Patching

    task = ModAdd(p=5)
    adapter = RWKVPthAdapter.for_task(task, 0)
    attribution = Attribution(n_examples=16)(adapter, task, 0)
    assert attribution.metrics.get("method") == "feature_ablation" or not attribution.applicable
    patch = Patching(n_pairs=8)(adapter, task, 0)
    assert patch.applicable and any(d["role"] == "stream" for d in patch.details)
    assert LogitLens()(adapter, task, 0).applicable


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_untrusted_pickles_are_never_executed(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        RWKVPthAdapter.from_pth(tmp_path / "evil.pth")
    assert not os.path.exists(marker)
    torch.save({"emb.weight": torch.zeros(2, 2), "_strategy": "cpu fp32"}, tmp_path / "converted.pth")
    with pytest.raises(ValueError, match="not a raw RWKV state dict"):
        load_checkpoint(tmp_path / "converted.pth")


def test_rwkv7_is_refused_with_its_reason(tmp_path):
    state = {"emb.weight": torch.zeros(4, 8), "blocks.0.ln0.weight": torch.ones(8),
             "blocks.0.att.key.weight": torch.zeros(8, 8), "blocks.0.att.r_k": torch.zeros(1, 8),
             "ln_out.weight": torch.ones(8), "head.weight": torch.zeros(4, 8)}
    torch.save(state, tmp_path / "v7.pth")
    with pytest.raises(NotImplementedError, match="TorchScript"):
        RWKVPthAdapter.from_pth(tmp_path / "v7.pth")
    assert detect_version(random_checkpoint(5.2, 4, 16, 1, head_size=8)) == 5.2


def test_importing_the_package_leaves_global_torch_flags_alone():
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    module = _rwkv_model()
    assert module.MyModule is torch.nn.Module  # Python layer functions, not TorchScript
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == flags
