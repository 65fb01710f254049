"""Researchers' own checkpoints as matrix rows: `--model hf --model-args pretrained=DIR,...`.

The convention is lm-evaluation-harness's (`--model hf --model-args pretrained=...`): a comma-
separated list of `key=value` pairs. Keys: `pretrained` (a local directory, never a hub id),
`gguf_file` (a GGUF file inside it), `dtype` (float32, bfloat16, float16), `device` (cpu,
cuda, cuda:N), `name` (the row's label; default the file or directory name) and
`trust_remote_code` (off unless given as true).

A checkpoint becomes an adapter class of its family (`config.model_type` mapped by
`archbench.hf_checkpoint.family_for`) registered under `hf:NAME`, so the runner, the zoo and
the report treat it like any architecture: its "organism" is the checkpoint itself (loaded
strictly, never trained; its gate is its own accuracy on the task), and its random-init
control is the same config initialised by the family's own init with the cell's seed. The
checkpoint's description travels to worker processes in the environment variable
`ARCHBENCH_CHECKPOINTS` (JSON), so every process resolves `hf:NAME` the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV = "ARCHBENCH_CHECKPOINTS"
KEYS = ("pretrained", "gguf_file", "dtype", "device", "name", "blocks", "trust_remote_code")
DTYPES = ("float32", "bfloat16", "float16")
PREFIX = "hf:"


class CheckpointError(ValueError):
    """A checkpoint or model argument archbench cannot use; the message is one line."""


@dataclass(frozen=True)
class Checkpoint:
    pretrained: str
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    name: str = ""
    trust_remote_code: bool = False
    blocks: int | None = None  # how many evenly spaced blocks expose hook points (None: all)

    @property
    def arch(self) -> str:
        return PREFIX + self.name

    @property
    def path(self) -> Path:
        return Path(self.pretrained)

    def load_kwargs(self) -> dict[str, Any]:
        import torch

        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.dtype)}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return kwargs


@contextlib.contextmanager
def quiet():
    """transformers' progress bars and load report off while archbench loads a checkpoint:
    archbench checks the load itself and says what is wrong in one line."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def parse_model_args(text: str) -> Checkpoint:
    """`pretrained=DIR,gguf_file=F,...` -> a checked Checkpoint (CheckpointError otherwise)."""
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise CheckpointError(f"--model-args: {part!r} is not key=value (keys: {', '.join(KEYS)})")
        if key not in KEYS:
            raise CheckpointError(f"--model-args: unknown key {key!r} (keys: {', '.join(KEYS)})")
        if key in fields:
            raise CheckpointError(f"--model-args: {key} is given twice")
        fields[key] = value.strip()
    if "pretrained" not in fields:
        raise CheckpointError("--model-args needs pretrained=DIR (a local checkpoint directory)")
    path = Path(fields["pretrained"]).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"--model-args: pretrained={fields['pretrained']} is not a directory "
                              f"(archbench loads local checkpoints only, never from a hub)")
    gguf = fields.get("gguf_file")
    if gguf and not (path / gguf).is_file():
        raise CheckpointError(f"--model-args: gguf_file={gguf} is not a file in {path}")
    if not gguf and not (path / "config.json").is_file():
        raise CheckpointError(f"--model-args: {path} has no config.json (a save_pretrained directory), "
                              f"and no gguf_file= was given")
    dtype = fields.get("dtype", "float32")
    if dtype not in DTYPES:
        raise CheckpointError(f"--model-args: dtype={dtype} (dtypes: {', '.join(DTYPES)})")
    device = fields.get("device", "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise CheckpointError(f"--model-args: device={device} (devices: cpu, cuda, cuda:N)")
    remote = fields.get("trust_remote_code", "false").lower()
    if remote not in ("true", "false"):
        raise CheckpointError(f"--model-args: trust_remote_code={remote} (true or false)")
    blocks = fields.get("blocks")
    if blocks is not None and not (blocks.isdigit() and int(blocks) >= 2):
        raise CheckpointError(f"--model-args: blocks={blocks} (a number of blocks, at least 2: the first and the last)")
    name = fields.get("name") or (Path(gguf).stem if gguf else path.resolve().name)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"
    return Checkpoint(str(path.resolve()), gguf, dtype, device, name, remote == "true",
                      int(blocks) if blocks is not None else None)


def spaced_blocks(n_blocks: int, wanted: int | None) -> list[int]:
    """`wanted` evenly spaced block indices of `n_blocks`, the first and the last included
    (every block when `wanted` is None or at least `n_blocks`)."""
    if wanted is None or wanted >= n_blocks:
        return list(range(n_blocks))
    return sorted({round(i * (n_blocks - 1) / (wanted - 1)) for i in range(wanted)})


def weights_digest(ck: Checkpoint) -> str:
    """sha256 over the checkpoint's weight files (names, sizes and bytes): its identity."""
    files = [ck.path / ck.gguf_file] if ck.gguf_file else sorted(
        p for p in ck.path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".gguf"))
    if not files:
        raise CheckpointError(f"{ck.path} holds no weight files (.safetensors, .bin, .pth, .gguf)")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def describe(ck: Checkpoint) -> dict[str, Any]:
    """What a worker needs to rebuild the adapter class without reading the checkpoint again:
    the arguments, the family, the transformers config and the weights' digest."""
    from transformers import AutoConfig

    from archbench import hf_checkpoint

    kwargs = {"gguf_file": ck.gguf_file} if ck.gguf_file else {}
    try:
        with quiet():
            config = AutoConfig.from_pretrained(ck.pretrained, local_files_only=True,
                                                trust_remote_code=ck.trust_remote_code, **kwargs)
        family = hf_checkpoint.family_for(config)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(str(exc).splitlines()[0]) from None
    return {"args": asdict(ck), "family": family, "hf_config": config.to_dict(),
            "digest": weights_digest(ck)}


def adapter_class(description: dict[str, Any]):
    """The adapter class of one checkpoint: its family's adapter, its config and loader."""
    import torch

    from archbench import registry

    from transformers import CONFIG_MAPPING

    ck = Checkpoint(**description["args"])
    base = registry.adapter(description["family"])
    hf = description["hf_config"]
    config = {**base.config_of(CONFIG_MAPPING[hf["model_type"]].from_dict(hf)),
              "source": ck.pretrained, "weights_sha256": description["digest"]}
    if ck.blocks is not None:
        config["hooked_blocks"] = spaced_blocks(config["n_layers"], ck.blocks)
    hooked = config.get("hooked_blocks")
    block_of = re.compile(r"blocks\.(\d+)\.")  # the block a hook point belongs to

    class CheckpointAdapter(base):
        checkpoint = ck
        organisms = False
        default_config = config

        @classmethod
        def check_task(cls, task) -> None:
            vocab = cls.default_config["vocab_size"]
            if task.vocab_size > vocab:
                raise CheckpointError(f"{ck.arch}: task {task.name} needs a vocabulary of {task.vocab_size} "
                                      f"tokens; the checkpoint has {vocab}")

        @classmethod
        def for_task(cls, task, seed: int, **overrides: Any):
            """The random-init control: this checkpoint's config, the family's init, `seed`."""
            cls.check_task(task)
            torch.manual_seed(seed)
            adapter = cls(cls.build_model(cls.default_config), cls.default_config)
            return adapter.to_device(ck.device, ck.dtype)

        @classmethod
        def pretrained(cls):
            """The checkpoint's own weights, loaded strictly."""
            with quiet():
                adapter = base.from_pretrained(ck.path, **ck.load_kwargs())
            adapter.__class__ = cls  # the family's adapter of these weights, under this row's name
            adapter.config, adapter._specs = dict(cls.default_config), None
            return adapter.to_device(ck.device, ck.dtype)

        def hooks(self):
            """The family's hook points, less those of the blocks `blocks=` leaves out."""
            every = super().hooks()
            if hooked is None:
                return every
            keep = set(hooked)
            return [h for h in every
                    if not (m := block_of.match(h.spec.name)) or int(m.group(1)) in keep]

        def to_device(self, device: str, dtype: str):
            self.model.to(device=device, dtype=getattr(torch, dtype))
            return self

    CheckpointAdapter.__name__ = CheckpointAdapter.__qualname__ = f"Checkpoint[{ck.name}]"
    return CheckpointAdapter


def register(ck: Checkpoint) -> str:
    """Register the checkpoint as `hf:NAME` here and (through the environment) in workers."""
    from archbench import registry

    known = json.loads(os.environ.get(ENV, "{}"))
    description = known.get(ck.arch) if known.get(ck.arch, {}).get("args") == asdict(ck) else None
    description = description or describe(ck)
    registry.register("adapters", ck.arch, adapter_class(description))
    os.environ[ENV] = json.dumps({**known, ck.arch: description})
    return ck.arch


def register_from_environment() -> None:
    """Register every checkpoint the driver described in `ARCHBENCH_CHECKPOINTS`."""
    from archbench import registry

    for arch, description in json.loads(os.environ.get(ENV, "{}")).items():
        registry.register("adapters", arch, adapter_class(description))


def is_checkpoint(arch: str) -> bool:
    return arch.startswith(PREFIX)


# ---- tasks under a checkpoint's tokenizer ----------------------------------------------------

_tokenizers: dict[str, Any] = {}
_tasks: dict[tuple[str, str], Any] = {}
_loaded: dict[str, Any] = {}


def loaded(arch: str):
    """The checkpoint's own weights as an adapter, loaded once in this process (the driver
    loads them before any work, so a broken checkpoint stops the run with one line)."""
    if arch not in _loaded:
        from archbench import registry

        try:
            _loaded[arch] = registry.adapter(arch).pretrained()
        except (OSError, ValueError) as exc:  # load_strict's one line, or transformers' own
            raise CheckpointError(str(exc).splitlines()[0]) from None
    return _loaded[arch]


def natural(task_name: str) -> bool:
    from archbench.tasks import NATURAL_TASKS

    return task_name in NATURAL_TASKS


def tokenizer(arch: str):
    """The checkpoint's own tokenizer, loaded once per process. One read out of a GGUF file
    takes half a minute, so it is saved under the checkpoint's cache directory once and
    loaded from there (in a second) afterwards."""
    if arch not in _tokenizers:
        from transformers import AutoTokenizer

        from archbench import registry

        ck = registry.adapter(arch).checkpoint
        saved = cache_dir(arch) / "tokenizer"
        try:
            with quiet():
                if (saved / "tokenizer_config.json").is_file():
                    tok = AutoTokenizer.from_pretrained(saved, local_files_only=True)
                else:
                    kwargs = {"gguf_file": ck.gguf_file} if ck.gguf_file else {}
                    tok = AutoTokenizer.from_pretrained(ck.pretrained, local_files_only=True,
                                                        trust_remote_code=ck.trust_remote_code, **kwargs)
                    tok.save_pretrained(saved)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{ck.path}: no tokenizer archbench can load for the natural-text tasks "
                                  f"({str(exc).splitlines()[0][:160]})") from None
        tok.name_or_path = ck.name  # a stable name: task configs must not hold machine paths
        _tokenizers[arch] = tok
    return _tokenizers[arch]


def cache_dir(arch: str) -> Path:
    """Where archbench keeps what it derived from a checkpoint (the facts it knows)."""
    from archbench import registry, zoo

    cls = registry.adapter(arch)
    return zoo.cache_root() / "checkpoints" / f"{cls.checkpoint.name}-{cls.default_config['weights_sha256'][:12]}"


def task(arch: str, task_name: str):
    """The task instance of one matrix row: a built-in task, or a natural-text task under the
    row's checkpoint tokenizer (facts_nl restricted to the facts the checkpoint knows)."""
    from archbench import registry
    from archbench.tasks import natural_task

    if not natural(task_name):
        return registry.task(task_name)
    if not is_checkpoint(arch):
        raise CheckpointError(f"task {task_name} is natural text: it runs on a checkpoint's tokenizer "
                              f"(--model hf --model-args pretrained=DIR), not on {arch}")
    key = (arch, task_name)
    if key not in _tasks:
        instance = natural_task(task_name, tokenizer(arch))
        if task_name == "facts_nl":
            instance = _known_facts(arch, instance)
        _tasks[key] = instance
    return _tasks[key]


def _known_facts(arch: str, facts):
    """facts_nl restricted to what the checkpoint answers right, computed once and kept."""
    from archbench.results_dir import write_atomic

    path = cache_dir(arch) / "facts_nl_known.json"
    label = arch
    if path.exists():
        only = json.loads(path.read_text())["only"]
        return type(facts)(facts._tokenizer, pad=facts.pad, only=tuple(only), known_model=label)
    known = facts.known_by(loaded(arch), label=label)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"only": list(known.only)}))
    return known
