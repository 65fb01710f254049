"""Matrix rows that vary one family along an axis: scale (width, depth) and development (training).

A variant is named `FAMILY@KNOB=VALUE[,KNOB=VALUE]` and is an ordinary matrix row: the
registry builds its adapter class on first use (in every worker process alike), the zoo
caches its organisms under that name, the store keys its cells by it and the verdict reads
it against the reference like any family. Two kinds:

- Scale, `transformer@d_model=128,n_layers=4`: the family's own model config at that width
  and depth (`Adapter.scaled_config` says what each knob changes in a family: widths tied to
  d_model scale with it, per-layer lists follow the depth). It is a separate organism,
  trained from scratch with the family's training config.
- Development, `transformer@stage=0.3`: the family's ordinary organism as it was 30% of the
  way through its training (`Adapter.fit` keeps snapshots; `archbench.zoo` writes the
  snapshot nearest that fraction of the steps trained as its own organism). Its control is
  the family's control (the same initialisation), its recorded accuracy is the snapshot's
  held-out accuracy, and its gate is the final organism's: the axis asks whether a technique
  finds the variable before, with or after the behaviour appears (hidden progress, Barak et
  al. 2022, "Hidden progress in deep learning: SGD learns parities near the computational
  limit"), so a snapshot that does not yet solve the task is scored, not gated.

`archbench run --matrix --axis scale|development` expands every family it applies to into
these rows (`SCALE_GRID`, `STAGES`).
"""

from __future__ import annotations

from typing import Any

SEPARATOR = "@"
# the scale axis: widths x depths (the default organisms are d_model 64 with 2 blocks)
SCALE_WIDTHS = (32, 64, 128)
SCALE_DEPTHS = (2, 4, 6)
SCALE_GRID = tuple((w, d) for w in SCALE_WIDTHS for d in SCALE_DEPTHS)
# the development axis: fractions of the steps an organism trained (1.0 is the organism itself)
STAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SCALE_KNOBS = ("d_model", "n_layers")


class VariantError(ValueError):
    """A variant name that cannot be built; the message is one line naming the fix."""


def is_variant(arch: str) -> bool:
    return SEPARATOR in arch


def parse(arch: str) -> tuple[str, dict[str, Any]]:
    """`family@k=v,...` -> (family, {k: v}); values are ints, or floats for `stage`."""
    base, _, spec = arch.partition(SEPARATOR)
    knobs: dict[str, Any] = {}
    for part in filter(None, spec.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in (*SCALE_KNOBS, "stage"):
            raise VariantError(f"variant {arch!r}: each knob is KEY=VALUE with KEY one of "
                               f"{', '.join((*SCALE_KNOBS, 'stage'))}, not {part!r}")
        try:
            knobs[key] = float(value) if key == "stage" else int(value)
        except ValueError:
            raise VariantError(f"variant {arch!r}: {key} must be a number, not {value!r}") from None
    if not knobs:
        raise VariantError(f"variant {arch!r} names no knob: write e.g. {base}@n_layers=4 or {base}@stage=0.5")
    if "stage" in knobs and len(knobs) > 1:
        raise VariantError(f"variant {arch!r}: a development stage is of the family's own organism; "
                           "it cannot be combined with a scale knob")
    if "stage" in knobs and not 0 < knobs["stage"] < 1:
        raise VariantError(f"variant {arch!r}: stage is a fraction of training strictly between 0 and 1")
    if any(knobs.get(k, 1) < 1 for k in SCALE_KNOBS):
        raise VariantError(f"variant {arch!r}: d_model and n_layers must be positive")
    return base, knobs


def name(base: str, **knobs: Any) -> str:
    """The row name of a variant (knobs in a fixed order, so one variant has one name)."""
    order = [k for k in (*SCALE_KNOBS, "stage") if k in knobs]
    return base + SEPARATOR + ",".join(f"{k}={knobs[k]:g}" if k == "stage" else f"{k}={knobs[k]}" for k in order)


def build(arch: str, base_cls) -> type:
    """The adapter class of variant `arch` of the family `base_cls`."""
    base, knobs = parse(arch)
    if getattr(base_cls, "checkpoint", None) is not None:
        raise VariantError(f"variant {arch!r}: {base} is a checkpoint, which has one size and no training")
    if not getattr(base_cls, "organisms", True):
        raise VariantError(f"variant {arch!r}: {base} has no organisms of its own")
    attrs: dict[str, Any] = {"variant_of": base, "variant_knobs": dict(knobs), "__module__": base_cls.__module__}
    if "stage" in knobs:
        if not base_cls.trains_by_steps():
            raise VariantError(f"variant {arch!r}: {base} does not train by gradient steps "
                               f"({base_cls.__name__}.fit is its own), so it has no training trajectory")
        attrs["stage"] = knobs["stage"]
    else:
        try:
            attrs["default_config"] = {**base_cls.default_config,
                                       **base_cls.scaled_config(knobs.get("d_model"), knobs.get("n_layers"))}
        except ValueError as exc:
            raise VariantError(f"variant {arch!r}: {exc}") from None
    return type(f"{base_cls.__name__}[{arch.partition(SEPARATOR)[2]}]", (base_cls,), attrs)


def scale_rows(family: str) -> list[str]:
    return [name(family, d_model=w, n_layers=d) for w, d in SCALE_GRID]


def development_rows(family: str) -> list[str]:
    return [name(family, stage=s) for s in STAGES]


def base_of(arch: str) -> str:
    return arch.partition(SEPARATOR)[0]
