"""Associative recall: `k1 v1 ... kn vn q` -> the value bound to q.

Associative recall goes back to fast-weights memories (Ba et al. 2016, "Using fast weights
to attend to the recent past"); in transformers it is solved by induction heads (Olsson et
al. 2022, "In-context learning and induction heads"), and Arora et al. 2023 ("Zoology:
measuring and improving recall in efficient language models") use it (multi-query AR) to
separate attention from gated-convolution and state-space architectures, which is why it
belongs in a cross-architecture benchmark.

Keys are ids 0..n_keys-1, distinct within a sequence; values are ids
n_keys..n_keys+n_values-1 and may repeat; the query is one of the sequence's keys. The
answer token is the value that follows the matching key.

Primary variable `value` (the retrieved token); `match_pos` is the index of the matching
key. Relevant positions: the matching key, its value, and the query (the last position),
since the query selects which pair is read: changing it changes the answer. The counterfactual source replaces the matching value by a different value token, so
the expected answer always differs from the base answer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.base import Task


class Recall(Task):
    """n_pairs key-value pairs then a query key; answer = the value bound to the query.

    Knobs: n_pairs (default 4), n_keys (default 8), n_values (default 8).
    vocab_size = n_keys + n_values, seq_len = 2 * n_pairs + 1.
    """

    name: ClassVar[str] = "recall"
    primary: ClassVar[str] = "value"
    description: ClassVar[str] = "k1 v1 ... kn vn q -> value of q (associative recall)"

    def __init__(self, n_pairs: int = 4, n_keys: int = 8, n_values: int = 8):
        if n_pairs < 1 or n_keys < n_pairs:
            raise ValueError(f"recall needs 1 <= n_pairs <= n_keys, got n_pairs={n_pairs}, "
                             f"n_keys={n_keys}")
        if n_values < 2:
            raise ValueError(f"recall needs n_values >= 2, got {n_values}")
        self.n_pairs = int(n_pairs)
        self.n_keys = int(n_keys)
        self.n_values = int(n_values)

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        return 2 * self.n_pairs + 1

    def answer_tokens(self) -> torch.Tensor:
        return torch.arange(self.n_keys, self.n_keys + self.n_values)  # (n_values,) value ids

    def _match(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) index of the first pair whose key equals the query."""
        keys = tokens[:, 0:-1:2]  # (n, n_pairs)
        hit = keys == tokens[:, -1:]  # (n, n_pairs)
        if not bool(hit.any(dim=1).all()):
            raise ValueError("recall: a query key does not occur in its sequence")
        return hit.int().argmax(dim=1)  # (n,) first match

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        pair = self._match(tokens)  # (n,)
        return tokens[torch.arange(len(tokens)), 2 * pair + 1]  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # distinct keys per row: the first n_pairs of a random permutation of the key ids
        keys = np.argsort(rng.random((n, self.n_keys)), axis=1)[:, :self.n_pairs]  # (n, P)
        values = rng.integers(self.n_keys, self.n_keys + self.n_values,
                              size=(n, self.n_pairs))  # (n, P)
        query = keys[np.arange(n), rng.integers(0, self.n_pairs, size=n)]  # (n,)
        tokens = np.empty((n, self.seq_len), dtype=np.int64)  # (n, 2P + 1)
        tokens[:, 0:-1:2] = keys
        tokens[:, 1:-1:2] = values
        tokens[:, -1] = query
        return tokens

    def in_distribution(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the keys are distinct within the sequence (the generator's constraint)."""
        return _distinct(tokens[:, 0:2 * self.n_pairs:2])

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"value": self.rule(tokens),  # (n,) answer token id
                "match_pos": 2 * self._match(tokens)}  # (n,) position of the matching key

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        key_pos = 2 * self._match(tokens)  # (n,)
        rows = torch.arange(len(tokens))  # (n,)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, T)
        mask[rows, key_pos] = True
        mask[rows, key_pos + 1] = True
        mask[:, -1] = True  # the query decides which pair is read
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        source = base.copy()  # (n, T)
        rows = np.arange(len(base))  # (n,)
        value_pos = 2 * self._match(torch.as_tensor(base)).numpy() + 1  # (n,)
        old = base[rows, value_pos] - self.n_keys  # (n,) value index
        shift = rng.integers(1, self.n_values, size=len(base))  # (n,) never 0
        source[rows, value_pos] = self.n_keys + (old + shift) % self.n_values
        return source


def _distinct(rows: torch.Tensor) -> torch.Tensor:
    """(n,) bool: no token repeats within a row of (n, k)."""
    ordered = rows.sort(dim=1).values  # (n, k)
    return (ordered[:, 1:] != ordered[:, :-1]).all(dim=1)
