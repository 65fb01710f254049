"""TransformerLens-compatible hook names: aliases that resolve to archbench's hook points.

Researchers know TransformerLens's names (`blocks.0.hook_resid_post`, `blocks.0.attn.hook_pattern`,
`blocks.0.attn.hook_z`, ...; Nanda & Bloom 2022). An adapter that mixes in `TLAliases` and
lists an alias table accepts them wherever it takes a hook name: `run`'s `cache` and
`interventions`, and `names`. The canonical names stay the ones techniques, the store and
the report use ("all" and roles never include an alias); an alias is another way to ask.

An alias has TransformerLens's axis order. Most have the canonical order; the attention
scores and pattern are (batch, head, query_pos, key_pos) under their TransformerLens names
and (batch, pos, head, key_pos) under archbench's. `run` returns a cached alias under the
name asked for, in its own axis order, and hands an intervention on an alias the activation
in that order (and the `Alias` as its spec). An `Intervention` with `positions` on an alias
whose axis 1 is not `pos` is refused: its positions would silently select heads.
The names match TransformerLens; the values are archbench's model's own (TransformerLens
folds norm weights and centres weights when it loads a checkpoint; archbench does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from archbench.hooks import HookSpec, InterventionLike


@dataclass(frozen=True)
class Alias:
    """A TransformerLens name for a hook point: its target, axes and the axis permutation
    (alias = canonical.permute(perm); None when the orders agree)."""

    name: str
    target: str
    axes: tuple[str, ...]
    role: str
    layer: int | None = None
    perm: tuple[int, ...] | None = None

    def from_canonical(self, act: torch.Tensor) -> torch.Tensor:
        return act if self.perm is None else act.permute(self.perm)

    def to_canonical(self, act: torch.Tensor) -> torch.Tensor:
        if self.perm is None:
            return act
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        return act.permute(inverse)


# (batch, pos, head, key_pos) -> TransformerLens's (batch, head, query_pos, key_pos)
HEADS_FIRST = ((0, 2, 1, 3), ("batch", "head", "query_pos", "key_pos"))


def alias_table(rows: Iterable[tuple], specs: Mapping[str, HookSpec]) -> dict[str, Alias]:
    """Aliases from rows (tl_name, target) or (tl_name, target, (perm, axes)); every target
    must be a hook point (a typo in a table is an error, not a dead alias)."""
    table = {}
    for tl_name, target, *order in rows:
        if target not in specs:
            raise KeyError(f"alias {tl_name} names {target}, which is not a hook point")
        spec = specs[target]
        perm, axes = order[0] if order else (None, spec.axes)
        table[tl_name] = Alias(tl_name, target, tuple(axes), spec.role, spec.layer, perm)
    return table


def _on_alias(alias: Alias, intervention: InterventionLike):
    """An intervention written for the alias's axes, applied at the canonical hook point."""
    if alias.perm is not None and alias.axes[1] != "pos" and getattr(intervention, "positions", None) is not None:
        raise ValueError(f"{alias.name} has axes ({', '.join(alias.axes)}), so positions would index "
                         f"{alias.axes[1]}; intervene on {alias.target} to select positions")

    def edit(act: torch.Tensor, spec: HookSpec) -> torch.Tensor:
        return alias.to_canonical(intervention(alias.from_canonical(act), alias))
    return edit


def _as_list(names_or_roles) -> list[str]:
    if names_or_roles is None:
        return []
    return [names_or_roles] if isinstance(names_or_roles, str) else list(names_or_roles)


class TLAliases:
    """Mixin for an `Adapter`: TransformerLens names resolve in `run` and `names`.

    Subclasses implement `aliases()`; put the mixin before `Adapter` in the bases.
    """

    def aliases(self) -> dict[str, Alias]:
        """TransformerLens name -> Alias, for every hook point that has one."""
        raise NotImplementedError

    def canonical(self, name: str) -> str:
        """archbench's name for a hook name or alias."""
        alias = self.aliases().get(name)
        return alias.target if alias else name

    def names(self, names_or_roles: Iterable[str] | str | None) -> list[str]:
        wanted = _as_list(names_or_roles)
        if any("hook_" in n for n in wanted):  # every TransformerLens name has a hook_ part
            aliases = self.aliases()
            wanted = [aliases[n].target if n in aliases else n for n in wanted]
        return super().names(wanted)

    def run(self, tokens: torch.Tensor, cache: Iterable[str] | str | None = None,
            interventions: Mapping[str, InterventionLike] | None = None, grad: bool = False, **kwargs):
        wanted, interventions = _as_list(cache), dict(interventions or {})
        if not any("hook_" in n for n in [*wanted, *interventions]):
            return super().run(tokens, cache, interventions, grad, **kwargs)
        aliases = self.aliases()
        edits: dict[str, InterventionLike] = {}
        named: dict[str, str] = {}  # canonical name -> the name its intervention was given under
        for name, iv in interventions.items():
            alias = aliases.get(name)
            target = alias.target if alias else name
            if target in edits:
                raise ValueError(f"{named[target]} and {name} are the same hook point ({target}); "
                                 f"give it one intervention")
            edits[target], named[target] = (_on_alias(alias, iv) if alias else iv), name
        asked = [n for n in wanted if n in aliases]
        direct = [n for n in wanted if n not in aliases]
        out = super().run(tokens, [*direct, *(aliases[n].target for n in asked)], edits, grad, **kwargs)
        keep = set(super().names(direct))
        by_target: dict[str, list[str]] = {}
        for n in dict.fromkeys(asked):
            by_target.setdefault(aliases[n].target, []).append(n)
        result = {}
        for name, act in out.cache.items():  # depth order; an alias right after its target
            if name in keep:
                result[name] = act
            for a in by_target.get(name, []):
                result[a] = aliases[a].from_canonical(act)
        out.cache = result
        return out


def tl_rows(prefix: str, pairs: Sequence[tuple]) -> list[tuple]:
    """Rows with a common prefix: tl_rows("blocks.0", [("hook_resid_pre", "resid_pre")])."""
    return [(f"{prefix}.{tl}", f"{prefix}.{target}", *rest) for tl, target, *rest in pairs]
