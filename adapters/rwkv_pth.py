"""RWKV `.pth` checkpoints (v4, v5, v6) through the `rwkv` package, for capture and intervention.

RWKV is a linear-attention RNN: each block mixes tokens with a WKV recurrence (time mixing)
and channels with a token-shifted squared-ReLU feed-forward (Peng et al. 2023, "RWKV:
reinventing RNNs for the transformer era"; v5/v6 with matrix-valued heads and data-dependent
decay: Peng et al. 2024, "Eagle and Finch", arXiv:2404.05892). Released RWKV checkpoints are
`.pth` state dicts run by BlinkDL's `rwkv` package (pip `rwkv`, 0.8.x), which keeps the
weights in a dict and computes each layer with Python methods (`att_seq*`, `ffn_seq*`, and
`*_one*` for a single token). This adapter is for users' checkpoints: inference only.

- The package reads `RWKV_JIT_ON` once, at import; with it on, those methods are TorchScript
  and cannot be wrapped, so this file imports `rwkv.model` itself with `RWKV_JIT_ON=0` (and
  `RWKV_CUDA_ON=0`: the strategy is always 'cpu fp32'), and refuses a copy already imported
  with TorchScript. Its import also turns on CUDA TF32 globally; those flags are restored.
- RWKV-7 runs only through the package's TorchScript `RWKV_x070` (`RWKV_V7_ON=1`), whose
  layer loop is compiled: a v7 checkpoint is refused with that reason.
- Loading: the package calls `torch.load(path)` without `weights_only` (safe only under
  torch's default since 2.6, and not if TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set) and accepts
  a path only. So `from_pth` loads the file with `weights_only=True`, checks it is a flat
  dict of tensors, and hands the package a copy written to a private temporary file: the
  package never unpickles the user's file. (The copy costs one checkpoint of temporary disk.)
- No gradients (the package runs under `torch.no_grad`) and no training: `capabilities`
  omits "gradients" and "trainable", so techniques that need them record n/a; `fit` raises.
  The per-step WKV state lives inside the package's loops and is not a hook point.

The package runs one sequence at a time, so `forward` loops over the batch and each layer
hook fires once per example with (pos, d_model). A hook site sees the whole batch as usual:
for example b the intervention gets a (batch, pos, d_model) tensor holding the edited rows
of examples < b, the fresh row b and zeros after it, and only row b is read back. Every
position-wise intervention (Zero, Mean, Patch, Add, Project) therefore acts exactly as on a
whole-batch tensor. The mixer and feed-forward outputs are the differences the package's
layer functions add to the stream (they return x + out); with no intervention on them the
package's own sum is used untouched, so capturing never changes the logits.

Hook points: `embed` (the embedding after `ln0`, which the package folds into `emb.weight`),
per block `blocks.{i}.wkv.out` (mixer), `blocks.{i}.ffn.out` (mlp), `blocks.{i}.resid_post`
(stream), then `logits`. `random_checkpoint` writes the v4/v5/v6 key layout with random
weights: the random-init control of `build`, and the tests' checkpoints.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from archbench.adapter import Adapter, Hook, Site, TrainReport, hook
from archbench.hooks import HookPoint, HookSpec
from archbench.stepwise import StepHookPoint

D = ("batch", "pos", "d_model")
VERSIONS = (4, 5.0, 5.1, 5.2, 6.0)
PIP = "pip install 'rwkv>=0.8.32,<0.9'"


def _rwkv_model():
    """`rwkv.model`, imported with Python (not TorchScript) layer functions."""
    if "rwkv.model" not in sys.modules:
        os.environ["RWKV_JIT_ON"] = "0"  # read at import; the package reads both again later
        os.environ["RWKV_CUDA_ON"] = "0"
        v7 = os.environ.pop("RWKV_V7_ON", None)  # import-time only: v7 makes every class TorchScript
        flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                 torch.backends.cuda.matmul.allow_tf32)
        try:
            import rwkv.model  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"the rwkv_pth adapter needs the `rwkv` package: {PIP}") from exc
        finally:
            (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32) = flags
            if v7 is not None:
                os.environ["RWKV_V7_ON"] = v7
    module = sys.modules["rwkv.model"]
    if module.MyModule is not nn.Module or module.RWKV.__name__ != "RWKV":
        raise RuntimeError("rwkv.model was imported with RWKV_JIT_ON=1 or RWKV_V7_ON=1 (TorchScript "
                           "layers cannot be hooked): import archbench's rwkv_pth adapter first, "
                           "or set RWKV_JIT_ON=0 and unset RWKV_V7_ON before importing rwkv")
    return module


def detect_version(state: Mapping[str, torch.Tensor]) -> float:
    """The RWKV version of a raw state dict, as the package detects it (v7 is refused)."""
    if any(k.endswith((".att.r_k", ".att.w0", ".att.x_r")) for k in state):
        raise NotImplementedError("RWKV-7 checkpoints run only through the rwkv package's TorchScript "
                                  "RWKV_x070 (RWKV_V7_ON=1), whose layer loop cannot be hooked; "
                                  "rwkv_pth supports v4, v5 and v6 .pth checkpoints")
    if any(".time_maa" in k for k in state):
        return 6.0
    if not any(".ln_x." in k for k in state):
        return 4
    decay = state["blocks.0.att.time_decay"]
    if decay.dim() > 1 and decay.shape[1] > 1:
        return 5.2
    return 5.1 if any(".gate.weight" in k for k in state) else 5.0


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an untrusted `.pth` with `weights_only=True` and check it is a flat dict of tensors."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} is not a raw RWKV state dict (name -> tensor); checkpoints "
                         "converted by the rwkv package's convert_model.py are not supported")
    for key in ("emb.weight", "blocks.0.ln0.weight", "blocks.0.att.key.weight", "ln_out.weight",
                "head.weight"):
        if key not in state:
            raise ValueError(f"{path} is not an RWKV checkpoint: no {key!r}")
    return state


def random_checkpoint(version: float, vocab_size: int, d_model: int, n_layers: int, head_size: int = 16,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A raw RWKV state dict with random weights in the layout the package reads for `version`.

    Shapes are those of RWKV-LM's modules (Linear weights (out, in); time-mix vectors
    (1, 1, C)); d_att = d_model, d_ffn = 4 d_model, heads of `head_size` for v5/v6.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version}")
    C, A, Fd = d_model, d_model, 4 * d_model
    H, N = A // head_size, head_size

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=generator) * scale + shift

    def lin(out, inp):
        return rnd(out, inp, scale=inp ** -0.5)  # (out, in)

    def mix():
        return torch.rand(1, 1, C, generator=generator)  # (1, 1, C)

    def ln(name, n):
        return {f"{name}.weight": rnd(n, scale=0.1, shift=1.0), f"{name}.bias": rnd(n, scale=0.1)}

    state = {"emb.weight": rnd(vocab_size, C), **ln("blocks.0.ln0", C)}
    for i in range(n_layers):
        att, ffn = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        state.update(ln(f"blocks.{i}.ln1", C))
        state.update(ln(f"blocks.{i}.ln2", C))
        if int(version) == 5:
            state.update(ln(f"{att}ln_x", A))  # before time_decay: the package reads heads after it
        if version == 6.0:
            for m in "xwkvrg":
                state[f"{att}time_maa_{m}"] = mix()
            state[f"{att}time_maa_w1"] = rnd(C, 5 * 8, scale=0.1)  # (C, 5 * d_mix)
            state[f"{att}time_maa_w2"] = rnd(5, 8, C, scale=0.1)  # (5, d_mix, C)
            state[f"{att}time_decay"] = rnd(1, 1, A, scale=0.5, shift=-1.0)
            state[f"{att}time_decay_w1"] = rnd(C, 8, scale=0.1)  # (C, d_decay)
            state[f"{att}time_decay_w2"] = rnd(8, A, scale=0.1)  # (d_decay, A)
            state[f"{att}time_faaaa"] = rnd(H, N, scale=0.5)
            state.update(ln(f"{att}ln_x", A))
        else:
            for m in ("k", "v", "r") + (("g",) if version in (5.1, 5.2) else ()):
                state[f"{att}time_mix_{m}"] = mix()
            heads = (A,) if version == 4 else (H,) if version < 5.2 else (H, N)
            state[f"{att}time_decay"] = rnd(*heads, scale=0.5, shift=-1.0 if version != 4 else 0.0)
            state[f"{att}time_faaaa" if version == 5.2 else f"{att}time_first"] = rnd(*heads, scale=0.5)
        for m in ("key", "value", "receptance") + (("gate",) if version >= 5.1 else ()):
            state[f"{att}{m}.weight"] = lin(A, C)
        state[f"{att}output.weight"] = lin(C, A)
        prefix = "time_maa" if version == 6.0 else "time_mix"
        state[f"{ffn}{prefix}_k"], state[f"{ffn}{prefix}_r"] = mix(), mix()
        state[f"{ffn}key.weight"] = lin(Fd, C)
        state[f"{ffn}receptance.weight"] = lin(C, C)
        state[f"{ffn}value.weight"] = lin(C, Fd)
    state.update(ln("ln_out", C))
    state["head.weight"] = lin(vocab_size, C)
    return state


def rwkv_from_state(state: dict[str, torch.Tensor]):
    """The package's `RWKV` ('cpu fp32') on a validated state dict (see the module docstring)."""
    detect_version(state)  # refuses v7 with its reason
    RWKV = _rwkv_model().RWKV
    rescale = os.environ.get("RWKV_RESCALE_LAYER")
    with tempfile.TemporaryDirectory(prefix="archbench-rwkv-") as tmp:
        path = os.path.join(tmp, "model.pth")
        torch.save(dict(state), path)  # only the tensors we checked; the user's pickle is never reread
        os.environ["RWKV_RESCALE_LAYER"] = "0"  # no x/2 every k layers: the stream keeps its scale
        try:
            model = RWKV(path, "cpu fp32", verbose=False)
        finally:
            if rescale is None:
                os.environ.pop("RWKV_RESCALE_LAYER", None)
            else:
                os.environ["RWKV_RESCALE_LAYER"] = rescale
    return model


@dataclass
class ExampleSite(Site):
    """A `StepHookPoint` called once per example as hook(x, b, batch); x is (pos, *features)."""


def attach_per_example(site: ExampleSite, spec: HookSpec, intervention, store):
    """Register the per-example hook (see the module docstring); returns the handle."""
    buffer: list[torch.Tensor] = []

    def hook(module, args, output):
        x, b, n = args[0], int(args[1]), int(args[2])  # (T, *f), example, batch size
        if b == 0:
            buffer[:] = [torch.zeros(n, *x.shape, dtype=x.dtype, device=x.device)]
        canon = buffer[0]  # (B, T, *f): edited rows < b, row b, zeros after
        canon[b] = x
        new = None
        if intervention is not None:
            new = intervention(canon, spec)[b]  # (T, *f): only example b is read back
            canon[b] = new
        if store is not None:
            store[spec.name] = canon
        return new

    return site.module.register_forward_hook(hook, prepend=True)


class RWKVPthModel(nn.Module):
    """The package's RWKV with HookPoints around its per-layer functions (no parameters)."""

    def __init__(self, rwkv):
        super().__init__()
        self.rwkv = rwkv  # an nn.Module with its weights in the dict `rwkv.w`
        n_layer = rwkv.args.n_layer
        self.hook_embed = StepHookPoint()
        self.hook_wkv = nn.ModuleList([StepHookPoint() for _ in range(n_layer)])
        self.hook_ffn = nn.ModuleList([StepHookPoint() for _ in range(n_layer)])
        self.hook_resid = nn.ModuleList([StepHookPoint() for _ in range(n_layer)])
        self.hook_logits = HookPoint()
        self._example = (0, 1)
        # the package calls att_*/ffn_* without the layer index: recognise it by the LayerNorm
        # weight it passes (ln1 to time mixing, ln2 to channel mixing)
        self._layer = {id(rwkv.w[f"blocks.{i}.ln{j}.weight"]): i for i in range(n_layer) for j in (1, 2)}
        for name in dir(type(rwkv)):
            if name.startswith(("att_", "ffn_")):
                setattr(rwkv, name, self._wrap(getattr(rwkv, name), name.startswith("att_")))

    @staticmethod
    def _hooked(hook: nn.Module) -> bool:
        return bool(hook._forward_hooks or hook._forward_pre_hooks)

    def _through(self, hook: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pass one example's (T, C) or single-token (C,) activation through a hook point."""
        if not self._hooked(hook):
            return x
        seq = x if x.dim() == 2 else x[None]  # (T, C)
        new = hook(seq, *self._example)
        return x if new is seq else (new if x.dim() == 2 else new[0])

    def _wrap(self, fn, is_att: bool):
        @functools.wraps(fn)
        def layer(*args):
            x = args[0]  # (T, C) stream entering the sub-layer
            i = next(self._layer[id(a)] for a in args if id(a) in self._layer)
            if is_att and i == 0:
                x = self._through(self.hook_embed, x)
            out = fn(x, *args[1:])
            y = out[0]  # (T, C) = x + sub-layer output
            hook = self.hook_wkv[i] if is_att else self.hook_ffn[i]
            if self._hooked(hook):
                delta = y - x  # (T, C)
                new = self._through(hook, delta)
                y = y if new is delta else x + new
            if not is_att:
                y = self._through(self.hook_resid[i], y)
            return (y, *out[1:])
        return layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = []
        for b, row in enumerate(tokens.tolist()):
            self._example = (b, len(tokens))
            logits, _ = self.rwkv.forward(row, None, full_output=True)  # (T, vocab), or (vocab,) if T = 1
            rows.append(logits if logits.dim() == 2 else logits[None])
        return self.hook_logits(torch.stack(rows))  # (B, T, vocab)


class RWKVPthAdapter(Adapter):
    family = "rwkv_pth"
    capabilities = frozenset({"readout"})  # no "gradients", no "trainable", no "recurrent_state"
    organisms = False  # wraps users' checkpoints; `archbench run --matrix` leaves it out
    default_config = {"version": 4, "d_model": 64, "n_layers": 2, "head_size": 16}

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> RWKVPthModel:
        """A random-init checkpoint of the configured version (the control; see `from_pth`)."""
        state = random_checkpoint(config["version"], config["vocab_size"], config["d_model"],
                                  config["n_layers"], config["head_size"])
        return RWKVPthModel(rwkv_from_state(state))

    @classmethod
    def from_pth(cls, path: str | Path) -> "RWKVPthAdapter":
        """Wrap a raw RWKV v4/v5/v6 `.pth` checkpoint (loaded with weights_only=True)."""
        model = RWKVPthModel(rwkv_from_state(load_checkpoint(path)))
        args = model.rwkv.args
        heads = getattr(args, "n_head", None)  # v5/v6 only
        return cls(model, {"vocab_size": model.rwkv.w["emb.weight"].shape[0], "seq_len": None,
                           "version": model.rwkv.version, "d_model": args.n_embd, "n_layers": args.n_layer,
                           "head_size": args.n_att // heads if heads else None, "source": str(path)})

    def fit(self, task, seed: int, **overrides: Any) -> TrainReport:
        raise NotImplementedError("rwkv_pth runs users' RWKV .pth checkpoints for inference only (the "
                                  "rwkv package has no training path); to train RWKV use the 'rwkv' "
                                  "adapter (Hugging Face RWKV-4)")

    def save(self, path, meta=None) -> None:
        raise NotImplementedError("rwkv_pth does not save organisms: the .pth checkpoint is the "
                                  "organism; reload it with RWKVPthAdapter.from_pth")

    @classmethod
    def load(cls, path) -> "RWKVPthAdapter":
        raise NotImplementedError("rwkv_pth has no saved organisms: use RWKVPthAdapter.from_pth(path)")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        w = self.model.rwkv.w
        x = F.layer_norm(stream, (stream.shape[-1],), weight=w["ln_out.weight"], bias=w["ln_out.bias"])
        return x @ w["head.weight"]  # (B, T, vocab); the package stores head.weight transposed

    def _attach(self, site, spec, intervention, store, grad):
        if isinstance(site, ExampleSite):
            return attach_per_example(site, spec, intervention, store)
        return super()._attach(site, spec, intervention, store, grad)

    def hooks(self) -> list[Hook]:
        m = self.model
        out = [hook("embed", "embed", D, 0, ExampleSite(m.hook_embed))]
        for i in range(self.config["n_layers"]):
            out += [hook(f"blocks.{i}.wkv.out", "mixer", D, i, ExampleSite(m.hook_wkv[i])),
                    hook(f"blocks.{i}.ffn.out", "mlp", D, i, ExampleSite(m.hook_ffn[i])),
                    hook(f"blocks.{i}.resid_post", "stream", D, i + 1, ExampleSite(m.hook_resid[i]))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), self.config["n_layers"] + 1,
                           Site(m.hook_logits))]
