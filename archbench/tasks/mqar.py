"""Multi-query associative recall (MQAR): `k1 v1 … kN vN [pad] q1 a1 … qM` -> the value of qM.

Reproduces the task of Arora et al. 2023 ("Zoology: measuring and improving recall in
efficient language models", ICLR 2024), who use it to show that gated-convolution and
state-space models need a state that grows with the number of key-value pairs to match
attention, the gap this benchmark's families are compared on. It extends single-query
`recall` (archbench/tasks/recall.py), whose lookup, relevance and counterfactual it reuses.

Keys are ids 0..n_keys-1, distinct within a sequence; values are ids
n_keys..n_keys+n_values-1 and may repeat; id n_keys+n_values is a filler. After the
n_pairs pairs come (length - minimal length) fillers, then n_queries queries of distinct
keys of the sequence. archbench reads one answer, at the last position, so every query
but the last is followed by its value (a teacher-forced context standing in for Zoology's
supervision at every query position) and the answer is the value bound to the last query.

Differences from Zoology's generator (zoology/data/associative_recall.py, `_mqar`): there
every key is queried (n_queries = n_pairs), values are distinct, the queries sit at
power-law distributed gaps in the region after the pairs with a filler (not the value)
after each, and the vocabulary is 8,192 tokens; here the padding is one block between the
pairs and the queries, values may repeat, and the default vocabularies are 32 + 32.

Primary variable `value` (the retrieved token); `match_pos` is the position of the
matching key and `query` the last query's key id. Relevant positions: the matching key, its
value and the last query (as in recall: the query selects which pair is read); the earlier
queries and their values are not relevant (the last query's key is never among them). The
counterfactual source replaces the matching value by a different value token, so the
expected answer always differs from the base answer. Chance level is 1 / n_values.
Only the last query is scored: recall at the earlier queries (given in the input) is never
measured, so this is Zoology's accuracy at one query position, the one farthest from the pairs.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks import recall
from archbench.tasks.recall import Recall


class MQAR(Recall):
    """n_pairs key-value pairs, optional filler, then n_queries queries; answer = the value
    bound to the last query.

    Knobs: n_pairs (default 8), n_queries (default 4, 1 <= n_queries <= n_pairs), n_keys
    (default 32), n_values (default 32), length (default None: 2 * n_pairs + 2 * n_queries - 1,
    no filler; a larger length pads with fillers between the pairs and the queries).
    vocab_size = n_keys + n_values + 1 (the filler), seq_len = length.
    """

    name: ClassVar[str] = "mqar"
    primary: ClassVar[str] = "value"
    description: ClassVar[str] = "k1 v1 ... kN vN q1 a1 ... qM -> value of qM (multi-query associative recall)"
    in_matrix: ClassVar[bool] = False  # Zoology's finding (archbench/findings.py), over n_pairs

    def __init__(self, n_pairs: int = 8, n_queries: int = 4, n_keys: int = 32, n_values: int = 32,
                 length: int | None = None):
        super().__init__(n_pairs=n_pairs, n_keys=n_keys, n_values=n_values)
        if not 1 <= n_queries <= n_pairs:
            raise ValueError(f"mqar needs 1 <= n_queries <= n_pairs, got n_queries={n_queries}, "
                             f"n_pairs={n_pairs}")
        self.n_queries = int(n_queries)
        minimal = 2 * self.n_pairs + 2 * self.n_queries - 1
        if length is not None and length < minimal:
            raise ValueError(f"mqar needs length >= 2 * n_pairs + 2 * n_queries - 1 = {minimal}, "
                             f"got {length}")
        # stored resolved, so MQAR(**config()) is the same task whether length was given or derived
        self.length = minimal if length is None else int(length)

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values + 1

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def filler(self) -> int:
        """The padding token between the pairs and the queries."""
        return self.n_keys + self.n_values

    @property
    def first_query_pos(self) -> int:
        """Position of the first query (the pairs and the filler come before it)."""
        return self.length - (2 * self.n_queries - 1)

    def _match(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) index of the pair whose key equals the last query: recall's lookup on the
        pairs followed by that query."""
        pairs_then_query = torch.cat([tokens[:, :2 * self.n_pairs], tokens[:, -1:]], dim=1)  # (n, 2P + 1)
        return super()._match(pairs_then_query)  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        pairs, queries = self.n_pairs, self.n_queries
        # distinct keys per row: the first n_pairs of a random permutation of the key ids
        keys = np.argsort(rng.random((n, self.n_keys)), axis=1)[:, :pairs]  # (n, P)
        values = rng.integers(self.n_keys, self.n_keys + self.n_values, size=(n, pairs))  # (n, P)
        asked = np.argsort(rng.random((n, pairs)), axis=1)[:, :queries]  # (n, M) distinct pair indices
        rows = np.arange(n)[:, None]  # (n, 1)
        tokens = np.full((n, self.seq_len), self.filler, dtype=np.int64)  # (n, T)
        tokens[:, 0:2 * pairs:2] = keys
        tokens[:, 1:2 * pairs:2] = values
        start = self.first_query_pos
        tokens[:, start::2] = keys[rows, asked]  # (n, M) the queries, the last at T - 1
        tokens[:, start + 1::2] = values[rows, asked[:, :-1]]  # (n, M - 1) their values
        return tokens

    def in_distribution(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) bool: distinct keys, distinct queries that are keys of the sequence, each
        answered query followed by its own value, and fillers where the padding is."""
        pairs, start = 2 * self.n_pairs, self.first_query_pos
        keys, values = tokens[:, 0:pairs:2], tokens[:, 1:pairs:2]  # (n, P), (n, P)
        queries, answers = tokens[:, start::2], tokens[:, start + 1::2]  # (n, M), (n, M - 1)
        hit = queries[:, :, None] == keys[:, None, :]  # (n, M, P)
        bound = (hit.float() * values[:, None, :].float()).sum(-1).long()  # (n, M): the value of each query
        return (recall._distinct(keys) & recall._distinct(queries) & hit.any(-1).all(-1)
                & (answers == bound[:, :-1]).all(-1) & (tokens[:, pairs:start] == self.filler).all(-1))

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**super().latents(tokens),  # value (n,), match_pos (n,)
                "query": tokens[:, -1].clone()}  # (n,) the last query's key id
