"""Local Hugging Face checkpoints: strict loading, and which archbench adapter wraps one.

`PreTrainedModel.from_pretrained` loads whatever matches and initialises the rest at random,
with a log warning: pointed at a GPT-NeoX directory, `LlamaForCausalLM.from_pretrained`
returns a random Llama. `load_strict` refuses that: a checkpoint of another `model_type`,
or one whose weights transformers reports missing, unexpected or of another shape
(`output_loading_info=True`), raises a one-line ValueError naming the directory and the
problem. Every adapter's `from_pretrained` loads through it (transformers' own model
classes, `local_files_only=True`: archbench never reaches a model hub).

`family_for` maps a checkpoint's `model_type` (its `config.json`, or a GGUF file's
`general.architecture` read by transformers' GGUF loader, which needs the `gguf` package)
to the adapter that loads that class, and refuses types no adapter loads correctly.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any, ClassVar, Mapping

# model_type -> archbench adapter name. Only classes an adapter loads as they are: mistral
# (sliding window) has a class of its own, not Llama's.
FAMILIES = {"llama": "transformer", "gpt2": "gpt2", "gpt_neox": "gpt_neox", "qwen2": "qwen2", "mixtral": "moe",
            "mamba": "mamba", "mamba2": "mamba2", "rwkv": "rwkv", "xlstm": "xlstm",
            "bamba": "hybrid", "qwen3_next": "deltanet",
            "recurrent_gemma": "griffin"}


def _names(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _model_type(path: Path) -> str | None:
    config = path / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("model_type")


@contextlib.contextmanager
def quiet_gguf_loading():
    """Load GGUF files without transformers' own progress bar.

    transformers' GGUF loader draws a tqdm bar ("Converting and de-quantizing GGUF
    tensors...") from a module-level `tqdm` and ignores
    `transformers.utils.logging.disable_progress_bar()`; in a matrix run it would write over
    archbench's progress display, so that name is swapped for a disabled bar while a GGUF
    file loads, and restored after.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    drawn = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = drawn


def load_strict(model_class, path: str | Path, **kwargs: Any):
    """`model_class.from_pretrained(path, local_files_only=True, **kwargs)`, refusing a
    checkpoint of another model type or with missing, unexpected or reshaped weights."""
    path = Path(path)
    expected = model_class.config_class.model_type
    found = _model_type(path)
    if found is not None and found != expected:
        raise ValueError(f"checkpoint {path}: model_type {found!r}, not {expected!r} "
                         f"({model_class.__name__}); archbench loads it with the "
                         f"{FAMILIES.get(found, 'no')!s} adapter")
    with quiet_gguf_loading() if kwargs.get("gguf_file") else contextlib.nullcontext():
        model, info = model_class.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                  **kwargs)
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of another shape")):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(key) or ()]
        if keys:
            problems.append(f"{len(keys)} weight{'s' if len(keys) != 1 else ''} {what} ({_names(keys)})")
    if problems:
        raise ValueError(f"checkpoint {path}: {'; '.join(problems)}")
    return model


def family_for(path_or_config: str | Path | Mapping[str, Any] | Any, gguf_file: str | None = None) -> str:
    """The archbench adapter name for a local checkpoint directory (its `config.json`), a
    config (a transformers config or its dict), or a GGUF file (`gguf_file=`, a name inside
    the directory or a path)."""
    if gguf_file is not None:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        file = Path(gguf_file)
        if not file.is_absolute() and path_or_config is not None and not file.exists():
            file = Path(path_or_config) / file
        model_type = load_gguf_checkpoint(str(file), return_tensors=False)["config"].get("model_type")
        where = str(file)
    elif isinstance(path_or_config, Mapping):
        model_type, where = path_or_config.get("model_type"), "config"
    elif hasattr(path_or_config, "model_type"):
        model_type, where = path_or_config.model_type, "config"
    else:
        path = Path(path_or_config)
        if not (path / "config.json").is_file():
            raise ValueError(f"checkpoint {path}: no config.json (a GGUF file: pass gguf_file=)")
        model_type, where = _model_type(path), str(path)
    if model_type not in FAMILIES:
        raise ValueError(f"checkpoint {where}: model_type {model_type!r} has no archbench adapter; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


class FromPretrained:
    """Mixin: `from_pretrained` for an adapter that wraps one transformers class.

    Loads a local `save_pretrained` directory strictly (`load_strict`: no hub access; another
    model type, or missing, unexpected or misshapen weights raise one line; `kwargs` such as
    `dtype`, `device_map`, `gguf_file` go to transformers), then applies the family's
    `_prepare` and records `config_of(model.config)` with the source path.
    """

    hf_model_class: ClassVar[type]
    hf_load_kwargs: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any):
        model = cls._prepare(load_strict(cls.hf_model_class, path, **{**cls.hf_load_kwargs, **kwargs}))
        return cls(model, {**cls.config_of(model.config), "source": str(path)})
