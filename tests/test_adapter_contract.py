"""The adapter contract, checked on every registered family that trains organisms.

Family-specific behaviour (parity with the wrapped library, state patching at step t,
per-expert outputs, per-edge replacement) lives in each family's own test file; what every
adapter must do the same way is checked here once: save/load reproduces the logits, every
declared hook point fires with its declared axes, a trained-or-not model runs probe and
patching end to end, and a short `fit` reports sane numbers.
"""

import pytest
import torch

from archbench import adapter as adapter_module
from archbench import registry, zoo
from archbench.tasks.modadd import ModAdd
from archbench.techniques.patching import Patching
from archbench.techniques.probe import Probe

FAMILIES = [a for a in registry.names("adapters") if registry.adapter(a).organisms]
TASK = ModAdd(p=5)  # vocab 6, length 3


@pytest.fixture(params=FAMILIES)
def adapter(request):
    return registry.adapter(request.param).for_task(TASK, 0)


@pytest.fixture
def tokens():
    return TASK.sample(8, 0).tokens  # (8, 3)


def test_save_load_reproduces_the_logits(adapter, tokens, tmp_path):
    adapter.save(tmp_path / "org", {"note": "contract"})
    again = type(adapter).load(tmp_path / "org")
    assert torch.equal(again.run(tokens).logits, adapter.run(tokens).logits)


def test_every_declared_hook_point_fires_with_its_axes(adapter, tokens):
    out = adapter.run(tokens, cache="all")
    assert set(out.cache) == set(adapter.specs), "a declared hook point never fired"
    for name, spec in adapter.specs.items():
        act = out.cache[name]
        assert act.dim() == len(spec.axes) and act.shape[0] == 8, name
        assert spec.axes[0] == "batch", name
    # (batch, pos, vocab) with the answer at the last position (KAN has that position only)
    assert out.logits.shape[0] == 8 and out.logits.shape[-1] == TASK.vocab_size


def test_probe_and_patching_run_end_to_end(adapter):
    probe = Probe(n_train=128, n_test=64, steps=10)(adapter, TASK, 0)
    patch = Patching(n_pairs=16)(adapter, TASK, 0)
    if adapter.control_shares_representation:  # reservoirs: representation scores are n/a
        assert not probe.applicable and "readout" in probe.reason
    else:
        assert probe.applicable and 0.0 <= probe.score <= 1.0
    assert patch.applicable and 0.0 <= patch.score <= 1.0
    assert all(d["role"] in ("embed", "stream", "state") for d in patch.details)


def test_a_short_fit_reports_held_out_numbers(adapter):
    report = adapter.fit(TASK, 0, steps=20, batch=32, n_train=256, eval_every=20)
    assert 0.0 <= report.accuracy <= 1.0 and 0.0 <= report.train_accuracy <= 1.0
    assert report.steps >= 1 and report.seconds >= 0.0


def test_plant_caches_an_untrained_organism_with_its_recorded_accuracy():
    meta = zoo.plant("transformer", "modadd", 0, accuracy=0.5)
    assert zoo.cached_meta("transformer", registry.task("modadd"), 0)["accuracy"] == 0.5
    assert meta["steps"] == 0


def test_hook_points_and_sites_come_from_one_declaration(adapter):
    hooks = adapter.hooks()
    assert [h.spec for h in hooks] == adapter.hook_points()
    assert list(adapter.sites()) == [h.spec.name for h in hooks]
    assert len(set(adapter.sites())) == len(hooks)  # every name declared once


def test_declared_capabilities_match_the_exposed_roles(adapter):
    roles = {s.role for s in adapter.hook_points()}
    for capability, role in adapter_module.CAPABILITY_ROLES.items():
        assert (capability in adapter.capabilities) == (role in roles), (adapter.family, capability)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def _tiny_adapter(capabilities, decode=False):
    body = {"family": "tiny", "capabilities": frozenset(capabilities),
            "build_model": classmethod(lambda cls, config: _Tiny()),
            "forward": lambda self, tokens: self.model(tokens),
            "hooks": lambda self: [adapter_module.hook("embed", "embed", ("batch", "pos", "d"), 0,
                                                       adapter_module.Site(self.model.embed))]}
    if decode:
        body["decode"] = lambda self, stream: self.model.head(stream)
    return type("Tiny", (adapter_module.Adapter,), body)


def test_unknown_capability_or_readout_without_decode_fails_when_the_class_is_defined():
    with pytest.raises(TypeError, match="unknown capabilities"):
        _tiny_adapter({"gradient"})
    with pytest.raises(TypeError, match="decode"):
        _tiny_adapter({"readout"})
    assert _tiny_adapter({"readout"}, decode=True).capabilities == {"readout"}


def test_a_capability_without_its_hook_role_fails_when_hook_points_are_listed():
    claims_state = _tiny_adapter({"recurrent_state"}).build(6, 3, 0)
    with pytest.raises(TypeError, match="recurrent_state.*'state'"):
        claims_state.run(torch.zeros(1, 3, dtype=torch.long), cache="embed")


def test_grad_is_refused_without_the_gradients_capability():
    plain = _tiny_adapter(set()).build(6, 3, 0)
    with pytest.raises(ValueError, match="no gradients"):
        plain.run(torch.zeros(1, 3, dtype=torch.long), grad=True)
