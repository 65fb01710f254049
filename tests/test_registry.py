"""The registry: lazy built-ins, did-you-mean, re-registration, broken plugins."""

import pytest

from archbench import registry


def test_builtins_listed_and_loadable():
    assert "transformer" in registry.names("adapters")
    assert {"probe", "patching"} <= set(registry.names("techniques"))
    assert set(registry.names("tasks")) >= {"modadd", "parity", "recall", "count", "facts"}
    assert registry.matrix_tasks() == ["count", "facts", "modadd", "parity", "recall"]  # the findings' tasks stay out
    assert registry.adapter("transformer").family == "transformer"
    assert registry.task("modadd").name == "modadd"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(registry.UnknownName, match="did you mean 'transformer'"):
        registry.resolve("adapters", "transfomer")
    with pytest.raises(registry.UnknownName, match="known:"):
        registry.resolve("techniques", "zzzzzz")


def test_reregistering_the_same_target_is_allowed_a_different_one_is_not(monkeypatch):
    monkeypatch.setattr(registry, "_extra", {k: {} for k in registry.BUILTINS})
    same = registry.BUILTINS["adapters"]["transformer"]
    registry.register("adapters", "transformer", same)  # a module imported under two paths
    with pytest.raises(ValueError, match="already registered"):
        registry.register("adapters", "transformer", "somewhere.else:Other")


def test_broken_plugin_warns_and_is_skipped(monkeypatch):
    class EP:
        name, value = "broken", "no_such_module_xyz:Thing"

    monkeypatch.setattr(registry, "_extra", {k: {} for k in registry.BUILTINS})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [EP()] if group == "archbench.techniques" else [])
    assert "broken" in registry.names("techniques")
    with pytest.raises(ImportError, match="plugin technique 'broken'"):
        registry.get("techniques", "broken")
