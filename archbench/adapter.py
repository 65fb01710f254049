"""The adapter contract: one model of one family behind one activation interface.

An adapter builds a model sized for a task, trains it into an organism, saves and loads it
(safetensors + JSON), lists its hook points and runs it with caching and interventions:

    out = adapter.run(tokens, cache=["stream"], interventions={"blocks.0.resid_post": Zero()})
    out.logits            # (batch, pos, vocab)
    out.cache[name]       # (batch, pos, *features)

Torch adapters declare each hook point once, in `hooks()`, as a `Hook`: its `HookSpec`
(name, role, axes, depth) and its `Site` (a module, input or output, which tuple element, how
to reshape to the canonical axes). They inherit `run`, which registers plain
`register_forward_hook`s with `prepend=True` (so edits are seen by any hook the wrapped
library registered itself) and removes them in `finally`, even when the forward raises.
Declared capabilities are checked against what the adapter exposes: names when the class is
defined (the registry imports it), roles when its hook points are first listed.
"""

from __future__ import annotations

import abc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from archbench import feature_groups, snapshots, variants
from archbench.hooks import HookSpec, InterventionLike, ROLES, StateHookPoint

# Capabilities an adapter may declare; techniques list the ones they need.
CAPABILITIES = {
    "gradients": "backpropagation from logits to inputs and activations works",
    "trainable": "archbench can train it from a config",
    "attention": "attention patterns can be cached",
    "recurrent_state": "per-step recurrent state is a hook point",
    "router": "expert routing is a hook point",
    "readout": "the final readout can decode an intermediate stream activation (decode())",
}
# capability -> the hook role an adapter that declares it must expose (and one that exposes
# the role must declare it, or techniques needing it would skip a family that has it)
CAPABILITY_ROLES = {"attention": "attn_pattern", "recurrent_state": "state", "router": "router"}


@dataclass
class Site:
    """Where a hook point lives in a torch module tree.

    `where="output"` hooks the module's output, `"input"` its first positional input.
    `index` picks one element of a tuple output. `to_canonical` maps the raw tensor to axes
    (batch, pos, *features) and `from_canonical` maps an edited tensor back.
    """

    module: nn.Module
    where: str = "output"
    index: int | None = None
    to_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_canonical: Callable[[torch.Tensor], torch.Tensor] | None = None


class Hook(NamedTuple):
    """One hook point, declared once: what techniques see (`spec`) and where it lives (`site`)."""

    spec: HookSpec
    site: "Site"


def hook(name: str, role: str, axes: tuple[str, ...], layer: int | None, site: "Site") -> Hook:
    """A `Hook` from the `HookSpec` fields and its `Site`: one line per hook point in `hooks()`."""
    return Hook(HookSpec(name, role, axes, layer=layer), site)


@dataclass
class RunOutput:
    logits: torch.Tensor  # (batch, pos, vocab)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (batch, pos, *features)


@dataclass
class TrainReport:
    accuracy: float  # held-out (test split) accuracy of the answer at the last position
    steps: int
    seconds: float
    train_accuracy: float
    history: list[dict] = field(default_factory=list)
    # why training ended: "target" (validation accuracy reached cfg["target"]), "plateau"
    # (no rise of cfg["plateau_delta"] within cfg["plateau_steps"]) or "step cap" (cfg["steps"])
    stopped: str = "step cap"
    # the development axis' snapshots (archbench/snapshots.py): {stage, step, accuracy} each,
    # accuracy on the same test examples as `accuracy`
    snapshots: list[dict] = field(default_factory=list)


class Adapter(abc.ABC):
    """Base class. Subclasses set `family`, `capabilities`, `default_config`, and implement
    `build_model`, `forward` and `hooks` (with `decode` for the `readout` capability)."""

    family: ClassVar[str]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    default_config: ClassVar[dict[str, Any]] = {}
    # Training knobs; `task_train_config[task_name]` overrides per task.
    # The learning rate warms up linearly over `warmup` steps, then decays by a cosine to
    # `min_lr_ratio * lr` at `steps`. Training stops early when validation accuracy has
    # reached `target` at `target_patience` evaluations in a row (small validation splits,
    # modadd's 53 sequences, reach it by luck), or when it has not risen by `plateau_delta`
    # over `plateau_steps` steps while still below `plateau_below` (a run that has reached
    # the gate's level trains on: it is not hopeless, and a dip can recover; None: never).
    # `grad_clip` caps the gradient norm (None: no clipping).
    # plateau_steps 1000, not 500: at 500 the transformer stopped at chance on 16-bit parity
    # (flat at 0.5 to step 700, then 0.9 at 800, 1.0 at 1000) and MoE modadd seed 0 at 0.86
    # (with 1000 it reaches 0.97 at 2500 steps; 0.90 at the 3000 cap before the schedule).
    train_config: ClassVar[dict[str, Any]] = {
        "steps": 2000, "batch": 128, "lr": 1e-3, "weight_decay": 0.1, "n_train": 8192,
        "eval_every": 100, "target": 0.99, "target_patience": 2, "warmup": 100, "min_lr_ratio": 0.1,
        "plateau_steps": 1000, "plateau_delta": 0.02, "plateau_below": 0.9, "grad_clip": None,
    }
    task_train_config: ClassVar[dict[str, dict[str, Any]]] = {}
    # Bumped when this family's training changes meaning without a config change (part of
    # its organisms' identity, so only its organisms and their cells are recomputed).
    training_format: ClassVar[int] = 1
    # False for adapters that only wrap users' checkpoints (no organisms to train from a
    # task config): the matrix leaves them out.
    organisms: ClassVar[bool] = True
    # True where only the readout is trained (reservoirs): the random-init control then has
    # the trained model's very representation, and representation techniques are n/a.
    control_shares_representation: ClassVar[bool] = False
    # Model-config overrides per task, applied by `for_task` (part of the organism's identity).
    task_model_config: ClassVar[dict[str, dict[str, Any]]] = {}
    # Set on the classes of variant rows (`archbench.variants`): the family row a variant is
    # of, its knobs, and for a development row the fraction of training it stands for.
    variant_of: ClassVar[str | None] = None
    variant_knobs: ClassVar[dict[str, Any]] = {}
    stage: ClassVar[float | None] = None
    # Model-config widths that scale with d_model on the scale axis (`scaled_config`).
    width_tied: ClassVar[tuple[str, ...]] = ("d_mlp", "d_expert", "lru_width")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.capabilities) - set(CAPABILITIES)
        if unknown:
            raise TypeError(f"{cls.__name__} declares unknown capabilities {sorted(unknown)}; "
                            f"known: {sorted(CAPABILITIES)}")
        if "readout" in cls.capabilities and cls.decode is Adapter.decode:
            raise TypeError(f"{cls.__name__} declares 'readout' but does not implement decode()")

    def __init__(self, model: nn.Module, config: dict[str, Any]):
        self.model = model
        self.config = dict(config)
        self.model.eval()
        self._specs: dict[str, HookSpec] | None = None

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def build(cls, vocab_size: int, seq_len: int, seed: int, **overrides: Any) -> "Adapter":
        """A random-init model sized for a task's vocabulary and length (deterministic in seed)."""
        config = {**cls.default_config, **overrides, "vocab_size": vocab_size, "seq_len": seq_len}
        torch.manual_seed(seed)
        return cls(cls.build_model(config), config)

    @classmethod
    def for_task(cls, task, seed: int, **overrides: Any) -> "Adapter":
        return cls.build(task.vocab_size, task.seq_len, seed,
                         **{**cls.task_model_config.get(task.name, {}), **overrides})

    @classmethod
    def scaled_config(cls, d_model: int | None, n_layers: int | None) -> dict[str, Any]:
        """The model-config overrides of this family at width `d_model` and depth `n_layers`
        (None: as by default), for the scale axis (`archbench.variants`). Widths in
        `width_tied` keep their ratio to d_model. Families whose depth or width is another
        knob override this; one without either raises ValueError with the reason."""
        cfg, out = cls.default_config, {}
        if d_model is not None:
            if "d_model" not in cfg:
                raise ValueError(f"{cls.family} has no d_model knob to scale")
            out["d_model"] = d_model
            out.update({k: max(1, round(cfg[k] * d_model / cfg["d_model"])) for k in cls.width_tied
                        if isinstance(cfg.get(k), int)})
        if n_layers is not None:
            if "n_layers" not in cfg:
                raise ValueError(f"{cls.family} has no n_layers knob to scale")
            out["n_layers"] = n_layers
        return out

    @classmethod
    def trains_by_steps(cls) -> bool:
        """True where organisms train by `Adapter.fit`'s gradient steps, which keep snapshots
        for the development axis (a family with its own `fit` has no such trajectory)."""
        return getattr(cls.fit, "__func__", cls.fit) is Adapter.fit

    @classmethod
    @abc.abstractmethod
    def build_model(cls, config: dict[str, Any]) -> nn.Module:
        """The wrapped model, freshly initialised from a config."""

    # ---- forward and hooks -------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The wrapped model's own forward: (batch, pos) long -> logits (batch, pos, vocab)."""

    @abc.abstractmethod
    def hooks(self) -> list[Hook]:
        """Every hook point with its site, in depth order (one `hook(...)` line each)."""

    def hook_points(self) -> list[HookSpec]:
        """Every hook point's spec, in depth order."""
        return [h.spec for h in self.hooks()]

    def sites(self) -> dict[str, Site]:
        """name -> Site for every hook point."""
        return {h.spec.name: h.site for h in self.hooks()}

    def check_capabilities(self, specs: Iterable[HookSpec]) -> None:
        """Raise if a declared capability's role is missing, or an exposed one undeclared."""
        roles = {s.role for s in specs}
        for capability, role in CAPABILITY_ROLES.items():
            if (capability in self.capabilities) != (role in roles):
                have = "declares" if capability in self.capabilities else "does not declare"
                raise TypeError(f"{type(self).__name__} {have} capability {capability!r} but "
                                f"{'has no' if role not in roles else 'has'} hook point of role {role!r}")

    def answer_position(self, seq_len: int) -> int:
        """The activation position at which the answer is computed, for inputs of length seq_len.

        Activation positions 0..seq_len-1 are the input tokens in every family. Causal
        families read the answer at the last input position; a family that appends slots
        (the diffusion LM's answer slot) overrides this, and techniques read per-example
        variables and patch the readout position here rather than at `task.primary_position`.
        """
        return seq_len - 1

    def describe(self) -> dict[str, Any]:
        """What an organism's metadata records about this model beyond its training report.

        Empty for weight-trained families; a family whose mechanism is readable as text
        (the program family: its program) returns it here, and `archbench inspect` prints it.
        """
        return {}

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        """Apply the final readout to a stream activation: (batch, pos, d) -> (batch, pos, vocab)."""
        raise NotImplementedError(f"{self.family} has no readout usable on intermediate sites")

    @property
    def specs(self) -> dict[str, HookSpec]:
        if self._specs is None:
            specs = self.hook_points()
            self.check_capabilities(specs)
            self._specs = {s.name: s for s in specs}
        return self._specs

    def names(self, names_or_roles: Iterable[str] | str | None) -> list[str]:
        """Resolve hook names and/or roles (e.g. "stream") into hook names, in depth order."""
        if names_or_roles is None:
            return []
        if isinstance(names_or_roles, str):
            names_or_roles = [names_or_roles]
        wanted = set(names_or_roles)
        groups = [n for n in dict.fromkeys(names_or_roles) if feature_groups.parse(n) is not None]
        unknown = wanted - set(self.specs) - set(ROLES) - {"all"} - set(groups)
        unknown |= {n for n in groups if feature_groups.spec(self.specs, n) is None}
        if unknown:
            raise KeyError(f"{self.family} has no hook point or role {sorted(unknown)}")
        named = [n for n, s in self.specs.items() if "all" in wanted or n in wanted or s.role in wanted]
        return named + groups  # feature groups (`name[a:b]`, archbench.feature_groups) as given

    def run(self, tokens: torch.Tensor, cache: Iterable[str] | str | None = None,
            interventions: Mapping[str, InterventionLike] | None = None,
            grad: bool = False) -> RunOutput:
        """Forward with activations cached (after any intervention) and interventions applied.

        `cache` takes hook names and/or roles, and both take feature groups `name[a:b]`
        (`archbench.feature_groups`). With no cache and no interventions this is
        exactly `forward(tokens)`. Gradients flow only when `grad=True` (adapters with the
        `gradients` capability). A cached `StateHookPoint` whose scan reran after an edit
        holds the states the scan actually used.
        """
        if grad and "gradients" not in self.capabilities:
            raise ValueError(f"{self.family} has no gradients (it lacks the 'gradients' capability)")
        requested = self.names(cache)
        cache_names = {feature_groups.base_name(n) for n in requested}
        interventions = dict(interventions or {})
        missing = {n for n in interventions if feature_groups.spec(self.specs, n) is None}
        if missing:
            raise KeyError(f"{self.family} has no hook point {sorted(missing)}")
        interventions = feature_groups.merge(interventions, self.specs)  # keyed by hook point
        store: dict[str, torch.Tensor] = {}
        sites = self.sites()
        handles = []
        try:
            for name in cache_names | set(interventions):
                handles.append(self._attach(sites[name], self.specs[name],
                                            interventions.get(name), store if name in cache_names else None,
                                            grad))
            with torch.set_grad_enabled(grad):
                logits = self.forward(tokens)
            for name in cache_names & set(store):
                module = sites[name].module
                if isinstance(module, StateHookPoint) and module.used is not None:
                    store[name] = module.used if grad else module.used.detach()
        finally:
            for h in handles:
                h.remove()
            for name in cache_names | set(interventions):
                if isinstance(sites[name].module, StateHookPoint):
                    sites[name].module.used = None
        return RunOutput(logits=logits, cache={n: feature_groups.select(store[feature_groups.base_name(n)], n)
                                               for n in requested if feature_groups.base_name(n) in store})

    @staticmethod
    def _attach(site: Site, spec: HookSpec, intervention, store, grad: bool):
        to_c = site.to_canonical or (lambda t: t)
        from_c = site.from_canonical or (lambda t: t)

        def edit(raw: torch.Tensor) -> torch.Tensor | None:
            act = to_c(raw)
            changed = None
            if intervention is not None:
                act = intervention(act, spec)
                changed = from_c(act)
            if store is not None:
                store[spec.name] = act if grad else act.detach()
            return changed

        def replace(container, new):
            if site.index is None:
                return new
            items = list(container)
            items[site.index] = new
            return type(container)(items) if isinstance(container, tuple) else items

        if site.where == "input":
            def pre_hook(module, args, kwargs):
                new = edit(args[0])
                if new is None:
                    return None
                return (new, *args[1:]), kwargs
            return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)

        def hook(module, args, output):
            raw = output if site.index is None else output[site.index]
            new = edit(raw)
            return None if new is None else replace(output, new)
        return site.module.register_forward_hook(hook, prepend=True)

    # ---- training ----------------------------------------------------------------------
    def fit(self, task, seed: int, extra_loss: Callable[[int], torch.Tensor] | None = None,
            val_metric: Callable[[], float] | None = None, **overrides: Any) -> TrainReport:
        """Train on the task's train split (answer at the last position) with AdamW.

        The learning rate follows `lr_factor` (warm-up, then cosine decay). Early stopping
        reads the task's validation split (sequences training never sees, so a memorising
        model does not stop early) every `eval_every` steps: at `target` accuracy held for
        `target_patience` evaluations, or on a plateau (no rise of `plateau_delta` over the
        best accuracy counted so far within `plateau_steps`, while that best is below
        `plateau_below`). The reported accuracy is on the test split; `stopped` says why
        training ended.

        Two optional callables let another objective reuse this loop (interchange
        intervention training, `archbench.iit`): `extra_loss(step)` is added to each batch's
        loss before the backward pass, and `val_metric()` replaces the validation accuracy
        that early stopping reads. Without them training is exactly the ordinary one.
        """
        cfg = {**Adapter.train_config, **self.train_config, **self.task_train_config.get(task.name, {}),
               **overrides}
        gen = torch.Generator().manual_seed(seed)
        train = task.sample(cfg["n_train"], seed, "train")
        val = task.sample(512, seed, "val")
        test = task.sample(1024, seed, "test")
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self.lr_factor(s, cfg))
        start, history, step, stopped = time.perf_counter(), [], 0, "step cap"
        best, best_step = None, 0  # the accuracy the plateau rule measures rises against
        at_target = 0  # evaluations in a row at the target
        keeper = snapshots.SnapshotKeeper(self.model)
        self.model.train()
        for step in range(1, cfg["steps"] + 1):
            idx = torch.randint(len(train), (cfg["batch"],), generator=gen)  # (batch,)
            loss = self.loss(train.tokens[idx], train.answer[idx], cfg, gen)
            if extra_loss is not None:
                loss = loss + extra_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"])
            opt.step()
            sched.step()
            keeper.offer(step)
            if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
                acc = self.accuracy(val) if val_metric is None else val_metric()
                history.append({"step": step, "loss": loss.item(), "val_accuracy": acc,
                                "lr": opt.param_groups[0]["lr"]})
                self.model.train()
                at_target = at_target + 1 if acc >= cfg["target"] else 0
                if at_target >= cfg["target_patience"]:
                    stopped = "target"
                    break
                # a rise counts when it beats the best by plateau_delta and by two standard
                # errors of the validation estimate: at chance on parity (512 examples, SE
                # 0.022) noise alone rose by 0.02 and kept hopeless runs going to the cap
                noise = 2 * math.sqrt(max(best or 0.0, 1e-3) * (1 - min(best or 0.0, 1 - 1e-3)) / len(val))
                if best is None or acc >= best + max(cfg["plateau_delta"], noise):
                    best, best_step = acc, step
                elif (cfg["plateau_steps"] and step - best_step >= cfg["plateau_steps"]
                      and best < cfg["plateau_below"] and step < cfg["steps"]):
                    stopped = "plateau"
                    break
        self.model.eval()
        report = TrainReport(accuracy=self.accuracy(test), steps=step, seconds=time.perf_counter() - start,
                             train_accuracy=self.accuracy(task.sample(1024, seed, "train")),
                             history=history, stopped=stopped)
        self.snapshots = keeper.at_stages(step, variants.STAGES)
        if self.snapshots:
            final = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            for stage, at, weights in self.snapshots:
                self.model.load_state_dict(weights)
                report.snapshots.append({"stage": stage, "step": at, "accuracy": self.accuracy(test)})
            self.model.load_state_dict(final)
        return report

    @staticmethod
    def lr_factor(step: int, cfg: Mapping[str, Any]) -> float:
        """The learning rate at optimiser step `step` (0-based) as a fraction of cfg["lr"].

        Linear warm-up to 1 over cfg["warmup"] steps, then a cosine from 1 down to
        cfg["min_lr_ratio"] at step cfg["steps"] (and that floor after it).
        """
        warmup, steps = max(1, cfg["warmup"]), cfg["steps"]
        if step < warmup:
            return (step + 1) / warmup
        floor = cfg["min_lr_ratio"]
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def loss(self, tokens: torch.Tensor, answer: torch.Tensor, cfg: dict[str, Any],
             gen: torch.Generator) -> torch.Tensor:
        """The training loss of one batch: cross-entropy of the answer at the last position.

        Families with another objective (the diffusion LM's masked denoising) override this
        and keep `fit`'s loop, schedule and early stopping.
        """
        logits = self.forward(tokens)[:, -1]  # (batch, vocab)
        return nn.functional.cross_entropy(logits, answer)

    @torch.no_grad()
    def accuracy(self, examples) -> float:
        self.model.eval()
        pred = self.predict(examples.tokens)
        return float((pred == examples.answer).float().mean())

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        """Argmax answer at the last position: (n, T) -> (n,)."""
        return torch.cat([self.forward(tokens[i:i + batch])[:, -1].argmax(-1)
                          for i in range(0, len(tokens), batch)])

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        if getattr(self, "snapshots", None):
            snapshots.save(path, self.snapshots)
        (path / "adapter.json").write_text(json.dumps(
            {"family": self.family, "config": self.config, "meta": meta or {}}, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        """Load an organism saved by `save` (weights through safetensors only)."""
        path = Path(path)
        info = json.loads((path / "adapter.json").read_text())
        if info.get("family") != cls.family:
            raise ValueError(f"{path} holds a {info.get('family')!r} organism, not {cls.family!r}")
        adapter = cls(cls.build_model(info["config"]), info["config"])
        adapter.model.load_state_dict(load_file(str(path / "model.safetensors")))
        adapter.model.eval()
        return adapter
