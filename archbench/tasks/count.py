"""Counting: how many `a` tokens, mod m.

Counting is the canonical example of RASP's `selector_width` (Weiss et al. 2021,
"Thinking like transformers", ICML 2021): the number of positions a query attends to. The
input is `length` tokens from {a, b, c} (ids 0, 1, 2) followed by a query token (id 3); the
answer is the number of `a` tokens mod m, encoded as token id 4 + count (ids 4..4+m-1).

Primary variable `count`, per position: the running count of `a` up to and including each
position, mod m; at the query position it equals the answer's count. `count_total` is the
raw number of `a` tokens per example (not reduced mod m).

Counterfactual: change one `a` (into b or c, chosen at random). A base with no `a` has one
of its b/c tokens changed into `a` instead. Either way the count moves by one, so with
m >= 2 the expected answer always differs from the base answer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.base import Task


class Count(Task):
    """`length` tokens from {a, b, c} then a query; answer = #a mod m as token 4 + count.

    Knobs: length (default 8), m (modulus, default 4).
    vocab_size = 4 + m, seq_len = length + 1.
    """

    name: ClassVar[str] = "count"
    primary: ClassVar[str] = "count"
    description: ClassVar[str] = "count of a mod m (Weiss et al. 2021, RASP selector_width)"

    A: ClassVar[int] = 0
    QUERY: ClassVar[int] = 3
    ANSWER0: ClassVar[int] = 4  # token id of count 0

    def __init__(self, length: int = 8, m: int = 4):
        if length < 1 or m < 2:
            raise ValueError(f"count needs length >= 1 and m >= 2, got length={length}, m={m}")
        self.length = int(length)
        self.m = int(m)

    @property
    def vocab_size(self) -> int:
        return self.ANSWER0 + self.m

    @property
    def seq_len(self) -> int:
        return self.length + 1

    def answer_tokens(self) -> torch.Tensor:
        return self.ANSWER0 + torch.arange(self.m)  # (m,) counts 0..m-1

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        n_a = (tokens[:, :-1] == self.A).sum(dim=1)  # (n,)
        return self.ANSWER0 + n_a % self.m  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        abc = rng.integers(0, 3, size=(n, self.length))  # (n, length)
        query = np.full((n, 1), self.QUERY)  # (n, 1)
        return np.concatenate([abc, query], axis=1)  # (n, length + 1)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        is_a = (tokens == self.A).long()  # (n, T)
        return {"count": is_a.cumsum(dim=1) % self.m,  # (n, T) running count mod m
                "count_total": is_a.sum(dim=1)}  # (n,) raw count

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens == self.A  # (n, T)

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        source = base.copy()  # (n, T)
        rows = np.arange(len(base))  # (n,)
        body = base[:, :-1]  # (n, length)
        is_a = body == self.A  # (n, length)
        has_a = is_a.any(axis=1)  # (n,)
        # pick a random `a` where there is one, else a random position (all b/c there)
        score = rng.random(body.shape)  # (n, length)
        score[has_a[:, None] & ~is_a] = -1.0
        pos = score.argmax(axis=1)  # (n,)
        to_bc = rng.integers(1, 3, size=len(base))  # (n,) b or c
        source[rows, pos] = np.where(has_a, to_bc, self.A)
        return source
