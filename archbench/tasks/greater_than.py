"""Greater-than: "The war lasted from the year 1732 to the year 17" -> a year after 1732.

Hanna et al. 2023 ("How does GPT-2 compute greater-than?") prompt GPT-2, whose tokenizer
writes 1732 as "17" "32", to continue an end year: the model's two-digit answer ZZ should
exceed the start year's YY. Nouns (a subset of theirs) are kept if one token with a
leading space; centuries run 11-17.

Tokenizers such as SmolLM2's write numbers one digit per token, so the answer unit adapts:
with two-digit tokens (`digits = 2`, Hanna's case) the prompt ends at the century and the
answer is a token 00-99 with threshold YY in 02-98; with single digits (`digits = 1`) the
end year shares the start year's decade, "from the year 1732 to the year 173", and the
answer is one digit with threshold Y in 0-8. `digits=None` picks 2 when the tokenizer
splits years that way, else 1.

Many answers are right (every unit above the threshold), but the suite scores one answer id
per example (`Examples.answer`, compared with the argmax over `answer_tokens()`). `rule`
therefore gives the smallest right answer, threshold + 1 (the next year), and `accepts`
gives the faithful verdict: the predicted unit exceeds the threshold. The primary variable
is `threshold`; the counterfactual source changes it (only the threshold token), so the
expected answer is the next year after the source's threshold.

Measured with SmolLM2-135M-Instruct (archbench.smollm2), which splits years into digits
(digits = 1): 30 of 30 nouns, 2100 prompts of 18 tokens. On 200 test examples: the argmax
over the ten digits is accepted (above the threshold) on 0.995 (full-vocabulary argmax:
0.995; chance 0.49) and is the next year on 0.775 (both argmaxes; chance 0.1);
Hanna et al.'s probability difference (mass above minus at-or-below, over the digits) 0.885.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.tokenized import TokenizedTask, encode, too_few

NOUNS = ["war", "expedition", "siege", "voyage", "campaign", "dynasty", "occupation", "conflict",
         "reign", "pilgrimage", "journey", "treaty", "rivalry", "invasion", "plague", "epidemic",
         "marriage", "trial", "tour", "project", "kingdom", "rule", "alliance", "revolt", "crisis",
         "famine", "drought", "strike", "dispute", "study"]
CENTURIES = range(11, 18)
MIN_NOUNS = 2


def _digits_of(tokenizer) -> int:
    """2 if " 1732" is " 17" then "32" under the tokenizer, else 1."""
    pair = encode(tokenizer, "32")
    return 2 if len(pair) == 1 and encode(tokenizer, " 1732") == encode(tokenizer, " 17") + pair else 1


class GreaterThan(TokenizedTask):
    """From the year .. to the year ..; answer = the smallest unit above the threshold.

    Args: tokenizer (a `transformers` tokenizer or a path), digits (1, 2 or None: detect).
    """

    name: ClassVar[str] = "greater_than"
    primary: ClassVar[str] = "threshold"
    description: ClassVar[str] = "The war lasted from the year 1732 to the year 17 -> > 32 (greater-than)"

    def __init__(self, tokenizer, digits: int | None = None):
        self._init_tokenizer(tokenizer)
        self.digits = int(_digits_of(self._tokenizer) if digits is None else digits)
        if self.digits not in (1, 2):
            raise ValueError(f"greater_than: digits must be 1 or 2, got {self.digits}")
        units = [f"{v:0{self.digits}d}" for v in range(10 ** self.digits)]
        unit_ids = [encode(self._tokenizer, u) for u in units]
        if any(len(ids) != 1 for ids in unit_ids):
            raise ValueError(f"greater_than: the {self.digits}-digit numbers are not single tokens")
        self._unit = np.array([ids[0] for ids in unit_ids])  # (10**digits,) id of each value
        self._lo, self._hi = (2, 98) if self.digits == 2 else (0, 8)
        nouns = [n for n in NOUNS if len(encode(self._tokenizer, " " + n)) == 1]
        self.n_nouns = len(nouns)
        if self.n_nouns < MIN_NOUNS:
            raise too_few(self.name, "nouns", self.n_nouns, MIN_NOUNS)
        self._build_frames(nouns)

    def _build_frames(self, nouns: list[str]) -> None:
        """Every prompt with the threshold at a known position, kept if of the usual length."""
        frames, where = [], []
        for noun in nouns:
            for c in CENTURIES:
                for d in ([""] if self.digits == 2 else [str(d) for d in range(10)]):
                    head = f"The {noun} lasted from the year {c}{d}"
                    y = f"{5:0{self.digits}d}"
                    upto = encode(self._tokenizer, head + y)
                    full = encode(self._tokenizer, head + y + f" to the year {c}{d}")
                    if upto[-1] != self._unit[5] or full[:len(upto)] != upto:
                        continue
                    frames.append(full)
                    where.append(len(upto) - 1)
        length = Counter(len(f) for f in frames).most_common(1)[0][0]
        keep = [i for i, f in enumerate(frames) if len(f) == length]
        self.n_frames = len(keep)
        self._frames = np.array([frames[i] for i in keep])  # (K, T) threshold slot holds "5"
        self._where = np.array([where[i] for i in keep])  # (K,) threshold position
        if len(set(self._where.tolist())) != 1:
            raise ValueError("greater_than: the threshold is not at one position in every prompt")
        self.length = int(length)

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def threshold_position(self) -> int:
        return int(self._where[0])

    def answer_tokens(self) -> torch.Tensor:
        return torch.as_tensor(np.sort(self._unit))  # (10**digits,) sorted

    def value_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The number each unit token stands for, -1 for any other token: (n,) -> (n,)."""
        table = torch.full((self.vocab_size,), -1, dtype=torch.long)  # (V,)
        table[torch.as_tensor(self._unit)] = torch.arange(len(self._unit))
        return table[ids]

    def accepts(self, predicted: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the predicted token is a unit above the threshold (Hanna et al.'s verdict)."""
        return self.value_of(predicted) > self.latents(tokens)["threshold"]

    # --- the task contract ---------------------------------------------------------------
    def _threshold(self, tokens: torch.Tensor) -> torch.Tensor:
        value = self.value_of(tokens[:, self.threshold_position])  # (n,)
        if bool(((value < self._lo) | (value > self._hi)).any()):
            raise ValueError("greater_than: a threshold is outside the task's range")
        return value

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._unit)[self._threshold(tokens) + 1]  # (n,) the next year

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        tokens = self._frames[rng.integers(0, len(self._frames), size=n)].copy()  # (n, T)
        tokens[:, self.threshold_position] = self._unit[rng.integers(self._lo, self._hi + 1, size=n)]
        return tokens

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"threshold": self._threshold(tokens),  # (n,) YY (or Y) of the start year
                "next_year": self.rule(tokens)}  # (n,) id of threshold + 1

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, T)
        mask[:, self.threshold_position] = True
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        old = self._threshold(torch.as_tensor(base)).numpy()  # (n,)
        span = self._hi - self._lo + 1
        new = self._lo + (old - self._lo + rng.integers(1, span, size=len(base))) % span  # (n,) != old
        source = base.copy()  # (n, T)
        source[:, self.threshold_position] = self._unit[new]
        return source
