"""The registry: names -> adapters, techniques and tasks, loaded lazily.

Built-ins are listed once, as "module:attr" strings loaded on first use (as in
lm-evaluation-harness's registry). Third parties register through the entry-point groups
`archbench.adapters`, `archbench.techniques` and `archbench.tasks`; a plugin that fails to
load warns and is skipped. Unknown names raise `UnknownName` with a did-you-mean.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from importlib.metadata import entry_points
from typing import Any

from archbench import variants
from archbench.tasks import BUILTIN_TASKS

BUILTINS: dict[str, dict[str, str]] = {
    "adapters": {
        "transformer": "archbench.adapters.transformer:TransformerAdapter",
        "moe": "archbench.adapters.moe:MoEAdapter",
        "gpt2": "archbench.adapters.gpt2:GPT2Adapter",
        "gpt_neox": "archbench.adapters.gpt_neox:GPTNeoXAdapter",
        "qwen2": "archbench.adapters.qwen2:Qwen2Adapter",
        "looped": "archbench.adapters.looped:LoopedAdapter",
        "mamba": "archbench.adapters.mamba:MambaAdapter",
        "mamba2": "archbench.adapters.mamba2:Mamba2Adapter",
        "rwkv": "archbench.adapters.rwkv:RWKVAdapter",
        "rwkv_pth": "archbench.adapters.rwkv_pth:RWKVPthAdapter",
        "diffusion": "archbench.adapters.diffusion:DiffusionAdapter",
        "kan": "archbench.adapters.kan:KANAdapter",
        "spiking": "archbench.adapters.spiking:SpikingAdapter",
        "reservoir": "archbench.adapters.reservoir:ReservoirAdapter",
        "nvar": "archbench.adapters.nvar:NVARAdapter",
        "gru": "archbench.adapters.gru:GRUAdapter",
        "aaren": "archbench.adapters.aaren:AarenAdapter",
        "program": "archbench.adapters.program:ProgramAdapter",
        "xlstm": "archbench.adapters.xlstm:XLSTMAdapter",
        "hybrid": "archbench.adapters.hybrid:HybridAdapter",
        "deltanet": "archbench.adapters.deltanet:DeltaNetAdapter",
        "griffin": "archbench.adapters.griffin:GriffinAdapter",
    },
    "techniques": {
        "probe": "archbench.techniques.probe:Probe",
        "patching": "archbench.techniques.patching:Patching",
        "ablation": "archbench.techniques.ablation:Ablation",
        "attribution": "archbench.techniques.attribution:Attribution",
        "logit_lens": "archbench.techniques.logit_lens:LogitLens",
        "tuned_lens": "archbench.techniques.tuned_lens:TunedLens",
        "steering": "archbench.techniques.steering:Steering",
        "sae": "archbench.techniques.sae:SAE",
        "cka": "archbench.techniques.cka:CKA",
        "symbolic": "archbench.techniques.symbolic:Symbolic",
        "causal_tracing": "archbench.techniques.causal_tracing:CausalTracing",
        "glitch": "archbench.techniques.glitch:Glitch",
        "fourier": "archbench.techniques.fourier:Fourier",
    },
    "tasks": dict(BUILTIN_TASKS),
}

_extra: dict[str, dict[str, Any]] = {kind: {} for kind in BUILTINS}
_plugins_loaded = False


class UnknownName(KeyError):
    """An adapter, technique or task name that is not registered."""

    def __str__(self) -> str:
        return self.args[0]


def register(kind: str, name: str, target: Any) -> None:
    """Register `target` (a class or a "module:attr" string) under `name`.

    Registering the same target twice is allowed (a module imported twice under two paths);
    registering a different target under a taken name raises.
    """
    table = _table(kind)
    if name in table and _qualname(table[name]) != _qualname(target):
        raise ValueError(f"{kind[:-1]} {name!r} is already registered as {_qualname(table[name])}")
    _extra[kind][name] = target


def _qualname(target: Any) -> str:
    if isinstance(target, str):
        return target
    return f"{target.__module__}:{target.__qualname__}"


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for kind in BUILTINS:
        for ep in entry_points(group=f"archbench.{kind}"):
            try:
                register(kind, ep.name, ep.value)
            except Exception as exc:  # a broken plugin must not break archbench
                warnings.warn(f"archbench: skipping plugin {ep.name!r} ({ep.value}): {exc}")
    from archbench import checkpoints  # researchers' checkpoints described by the driver process

    checkpoints.register_from_environment()


def _table(kind: str) -> dict[str, Any]:
    if kind not in BUILTINS:
        raise ValueError(f"kind must be one of {sorted(BUILTINS)}")
    return {**BUILTINS[kind], **_extra[kind]}


def names(kind: str) -> list[str]:
    """The registered names; variant rows built on use (`family@knob=value`) are not listed."""
    _load_plugins()
    return sorted(n for n in _table(kind) if not variants.is_variant(n))


def matrix_tasks() -> list[str]:
    """The tasks the default matrix runs: every task but those that test one published
    finding (`Task.in_matrix` False: facts_long, mqar, regression; archbench/findings.py)."""
    return [n for n in names("tasks") if getattr(get("tasks", n), "in_matrix", True)]


def resolve(kind: str, name: str) -> str:
    """Check a name exists; raise UnknownName with a suggestion if not."""
    _load_plugins()
    table = _table(kind)
    if name not in table and kind == "adapters" and variants.is_variant(name):
        _register_variant(name)
        return name
    if name not in table and kind == "tasks" and variants.is_variant(name):
        _register_task_variant(name)
        return name
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(table))}"
        raise UnknownName(f"unknown {kind[:-1]} {name!r}{hint}")
    return name


def _register_variant(name: str) -> None:
    """Build and register the class of a variant row (`family@knob=value`, archbench/variants.py)."""
    base = resolve("adapters", variants.base_of(name))
    try:
        _extra["adapters"][name] = variants.build(name, get("adapters", base))
    except variants.VariantError as exc:
        raise UnknownName(str(exc)) from None


def _register_task_variant(name: str) -> None:
    """A task with knobs in its name (`mqar@n_pairs=16`): a matrix axis over one task's knobs."""
    base, _, spec = name.partition(variants.SEPARATOR)
    cls = get("tasks", resolve("tasks", base))
    knobs: dict[str, Any] = {}
    for part in filter(None, spec.split(",")):
        key, eq, value = part.partition("=")
        try:
            knobs[key] = int(value) if eq else None
        except ValueError:
            knobs[key] = None
        if knobs[key] is None:
            raise UnknownName(f"task {name!r}: each knob is KEY=INTEGER, not {part!r}")
    try:
        cls(**knobs)
    except (TypeError, ValueError) as exc:
        raise UnknownName(f"task {name!r}: {str(exc).splitlines()[0]}") from None
    _extra["tasks"][name] = lambda **more: cls(**{**knobs, **more})


def get(kind: str, name: str) -> Any:
    """The registered class for `name`, importing its module on first use."""
    name = resolve(kind, name)  # first: it loads plugins and the driver's checkpoints into the table
    target = _table(kind)[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            if name in BUILTINS[kind]:
                raise
            raise ImportError(f"plugin {kind[:-1]} {name!r} ({target}) failed to load: {exc}") from exc
        return obj
    return target


def adapter(name: str):
    return get("adapters", name)


def technique(name: str):
    return get("techniques", name)


def task(name: str, **knobs):
    """A task instance with its default knobs (or the given ones)."""
    return get("tasks", name)(**knobs)
