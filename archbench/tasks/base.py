"""The task contract: generators of examples whose mechanism-relevant variables are known.

A task yields token sequences whose answer sits at the last position, the named latent
variables the mechanism must compute, a relevance mask over input positions, and
counterfactual pairs (base, source, the answer expected if the primary variable of source
were placed into base). Everything is deterministic given a seed, and the train and test
splits never share an input sequence. See docs/architecture.md, "Tasks".
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch


@dataclass(frozen=True)
class Examples:
    """A batch of task examples. The answer is read from the logits at the last position."""

    tokens: torch.Tensor  # (n, T) long
    answer: torch.Tensor  # (n,) long, a token id of the task's vocabulary
    latents: dict[str, torch.Tensor]  # name -> (n,) or (n, T) long: per example or per position
    relevant: torch.Tensor  # (n, T) bool: input positions the answer depends on

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass(frozen=True)
class Counterfactuals:
    """Interchange pairs: put `variable` of `source` into `base`, expect `expected`."""

    base: torch.Tensor  # (n, T) long
    source: torch.Tensor  # (n, T) long
    base_answer: torch.Tensor  # (n,) long
    expected: torch.Tensor  # (n,) long: answer of base with source's value of `variable`
    variable: str
    changed_positions: torch.Tensor = field(default=None)  # (n, T) bool: where base != source

    def __len__(self) -> int:
        return self.base.shape[0]


SPLITS = ("train", "val", "test")
MAX_DRAWS = 1000  # rounds of rejection sampling before a split is declared empty


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return SPLITS.index(split)


class Task(abc.ABC):
    """A model system with known ground truth.

    Subclasses set `name`, `primary` (the latent the model must compute to answer),
    `vocab_size`, `seq_len`, and implement `rule`, `_random_inputs`, `latents`,
    `relevance` and `_counterfactual_source`.
    """

    name: ClassVar[str]
    primary: ClassVar[str]
    description: ClassVar[str] = ""
    test_fraction: ClassVar[float] = 0.2
    val_fraction: ClassVar[float] = 0.1
    # False for tasks that test one published finding (archbench/findings.py names their
    # cells): the default matrix leaves them out; `--task NAME` or `--findings` runs them.
    in_matrix: ClassVar[bool] = True

    vocab_size: int
    seq_len: int

    # --- the ground truth -------------------------------------------------------------
    @abc.abstractmethod
    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        """The answer the task's rule gives for each sequence: (n, T) -> (n,)."""

    @abc.abstractmethod
    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n input sequences drawn from the task's distribution: (n, T) int."""

    @abc.abstractmethod
    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named latent variables computed from the inputs by the task's rule."""

    @abc.abstractmethod
    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, T) bool mask of the input positions the answer depends on."""

    @abc.abstractmethod
    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        """A source sequence per base that differs in the primary variable: (n, T) int."""

    # --- shared machinery --------------------------------------------------------------
    def split_of(self, tokens: np.ndarray) -> np.ndarray:
        """(n,) split codes (0 train, 1 val, 2 test): a pure function of content (a stable hash).

        The hash is uniform on [0, 1): below `test_fraction` is test, the next
        `val_fraction` is val (early stopping reads it, so a memorising model cannot stop
        early), the rest is train.
        """
        u = np.empty(len(tokens))
        for i, row in enumerate(np.asarray(tokens, dtype=np.int64)):
            digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
            u[i] = int.from_bytes(digest, "little") / 2**64
        return np.where(u < self.test_fraction, 2, np.where(u < self.test_fraction + self.val_fraction, 1, 0))

    def in_test_split(self, tokens: np.ndarray) -> np.ndarray:
        """(n,) bool: the sequence is in the test split."""
        return self.split_of(tokens) == 2

    def _draw(self, rng: np.random.Generator, n: int, split: str) -> np.ndarray:
        code = _split_code(split)
        rows: list[np.ndarray] = []
        have = 0
        for _ in range(MAX_DRAWS):
            if have >= n:
                return np.concatenate(rows)[:n]
            batch = self._random_inputs(rng, max(64, 2 * (n - have)))
            keep = batch[self.split_of(batch) == code]
            rows.append(keep)
            have += len(keep)
        if have >= n:
            return np.concatenate(rows)[:n]
        raise ValueError(f"{self.name}: the {split} split is (nearly) empty for this config "
                         f"({have} of {n} examples after {MAX_DRAWS} draws); enlarge the task")

    def sample(self, n: int, seed: int, split: str = "train") -> Examples:
        """n examples of one split, deterministic in (task config, seed, split)."""
        stream = (0, 4, 1)[_split_code(split)]  # train and test keep their original streams
        rng = np.random.default_rng([seed, stream])
        tokens = torch.as_tensor(self._draw(rng, n, split), dtype=torch.long)  # (n, T)
        return Examples(tokens=tokens, answer=self.rule(tokens), latents=self.latents(tokens),
                        relevant=self.relevance(tokens))

    def other_counterfactuals(self) -> dict[str, tuple[Callable, Callable]]:
        """Variables besides the primary one with counterfactual pairs of their own:
        name -> (source maker (rng, base (n, T)) -> (n, T), interchange (base, source) -> (n,)).
        None by default; IOI has its output position (MIB's second causal variable)."""
        return {}

    def counterfactuals(self, n: int, seed: int, split: str = "test", variable: str | None = None) -> Counterfactuals:
        """n interchange pairs on the primary variable (or on `variable`, one of
        `other_counterfactuals`); base and source both in `split`."""
        code = _split_code(split)
        variable = self.primary if variable is None else variable
        others = self.other_counterfactuals()
        if variable == self.primary:
            make_source, interchange = self._counterfactual_source, self.interchange
            rng = np.random.default_rng([seed, (2, 5, 3)[code]])
        elif variable in others:
            make_source, interchange = others[variable]
            rng = np.random.default_rng([seed, (2, 5, 3)[code], 1 + sorted(others).index(variable)])
        else:
            raise ValueError(f"{self.name}: no counterfactual pairs on {variable!r}; variables with pairs: "
                             f"{', '.join([self.primary, *sorted(others)])}")
        bases, sources = [], []
        have = 0
        for _ in range(MAX_DRAWS):
            if have >= n:
                break
            base = self._draw(rng, n - have, split)
            source = make_source(rng, base)
            keep = self.split_of(source) == code
            bases.append(base[keep])
            sources.append(source[keep])
            have += int(keep.sum())
        if have < n:
            raise ValueError(f"{self.name}: too few counterfactual sources in the {split} split "
                             f"({have} of {n}); enlarge the task")
        base_t = torch.as_tensor(np.concatenate(bases)[:n], dtype=torch.long)
        source_t = torch.as_tensor(np.concatenate(sources)[:n], dtype=torch.long)
        return Counterfactuals(base=base_t, source=source_t, base_answer=self.rule(base_t),
                               expected=interchange(base_t, source_t),
                               variable=variable, changed_positions=base_t != source_t)

    def interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The answer base would have with source's value of the primary variable: (n,).

        Every built-in source differs from its base only in inputs that feed the primary
        variable, so this is the rule applied to the source; a task whose sources differ
        elsewhere overrides it.
        """
        return self.rule(source)

    def in_distribution(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) bool: each sequence is one the task's own generator can draw (a joint
        constraint beyond each position's tokens, such as recall's distinct keys). Every
        sequence by default; an edit that leaves the distribution (the glitch search's) is
        not a test of the rule."""
        return torch.ones(len(tokens), dtype=torch.bool)

    @abc.abstractmethod
    def answer_tokens(self) -> torch.Tensor:
        """(C,) long, sorted: every token the task's answer can be.

        Behavioural scores decide among these tokens only (never the whole vocabulary), so
        their chance level is a property of the task, not of the vocabulary size.
        """

    def for_seed(self, seed: int) -> "Task":
        """The task instance an organism of this seed is trained and scored on.

        Tasks whose ground truth is drawn per seed (parity's secret positions) return a
        copy with it drawn; every other task is the same for all seeds.
        """
        return self

    @property
    def primary_position(self) -> int:
        """Where the primary variable is needed: the answer position."""
        return self.seq_len - 1

    def to_dataset(self, n: int, seed: int, split: str = "train"):
        """The examples as a `datasets.Dataset` (one row per example)."""
        import datasets

        ex = self.sample(n, seed, split)
        columns = {"tokens": ex.tokens.tolist(), "answer": ex.answer.tolist(),
                   "relevant": ex.relevant.tolist()}
        columns.update({f"latent_{k}": v.tolist() for k, v in ex.latents.items()})
        return datasets.Dataset.from_dict(columns)

    def config(self) -> dict:
        """The knobs that define this task instance (part of every organism's identity)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
