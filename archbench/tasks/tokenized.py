"""The shared plumbing of the natural-text tasks: a pretrained checkpoint's own tokenizer.

A natural-text task (ioi, induction, facts_nl, greater_than) takes a `transformers`
tokenizer, or a path `AutoTokenizer.from_pretrained` reads, and keeps only the items
(names, words, objects, digits) that are one token under it, recording how many remain.
`config()` holds the tokenizer's name and a hash of its vocabulary instead of the object,
so a task's identity survives a reload and differs between tokenizers.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

from archbench.tasks.base import Task


def load_tokenizer(tokenizer):
    """The tokenizer itself, or `AutoTokenizer.from_pretrained` of a path or hub name."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def vocab_hash(tokenizer) -> str:
    """A short stable hash of the token -> id table."""
    table = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(table.encode()).hexdigest()[:16]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text, without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def single_token_ids(tokenizer, items: list[str], prefix: str = " ") -> dict[str, int]:
    """item -> id for the items that `prefix + item` encodes to exactly one token."""
    out = {}
    for item in items:
        ids = encode(tokenizer, prefix + item)
        if len(ids) == 1:
            out[item] = ids[0]
    return out


def package_data(name: str):
    """A JSON file shipped beside the tasks (archbench/tasks/<name>)."""
    return json.loads(resources.files("archbench.tasks").joinpath(name).read_text(encoding="utf-8"))


def too_few(task: str, what: str, have: int, need: int) -> ValueError:
    return ValueError(f"{task}: only {have} {what} are single tokens under this tokenizer "
                      f"(need {need})")


class TokenizedTask(Task):
    """A task over a pretrained tokenizer's ids; subclasses call `_init_tokenizer` first."""

    def _init_tokenizer(self, tokenizer) -> None:
        self._tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = str(getattr(self._tokenizer, "name_or_path", "") or type(self._tokenizer).__name__)
        self.tokenizer_vocab = vocab_hash(self._tokenizer)
        self.vocab_size = len(self._tokenizer)

    def decode(self, ids) -> list[str]:
        """Each id as text."""
        return [self._tokenizer.decode([int(i)]) for i in ids]

    def text(self, tokens) -> list[str]:
        """Each sequence (n, T) as one string."""
        return [self._tokenizer.decode([int(i) for i in row]) for row in tokens]
