"""Sparse parity: n bits -> XOR of k secret bits.

The (n, k)-sparse parity problem of Barak et al. 2022, "Hidden progress in deep learning:
SGD learns parities near the computational limit" (NeurIPS 2022): the label is the parity
of k fixed, unknown positions among n uniformly random bits. Here the bits are tokens 0/1,
followed by a query token (id 2) at which the answer (token 0 or 1) is read.

The secret positions are drawn once from `secret_seed` (sorted, stored as the tuple
`secret`, so `config()` records them and `Parity(**task.config())` rebuilds the task).
The primary variable is `partial_xor`, the XOR of the first two secret bits: an
intermediate a model must hold that is not readable from any single input token.

Counterfactual: flip one secret bit. The flipped bit is one of the first two secret bits
(chosen at random), because only those feed `partial_xor`; flipping the others would change
the answer without changing the primary variable, which breaks the interchange contract
(`expected = rule(source)`). Every flip changes the answer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.base import Task


class Parity(Task):
    """n_bits random bits then a query token; answer = XOR of the k secret bits.

    Knobs: n_bits (default 10), k (secret size, default 3), secret_seed (default 0);
    `secret` may be given explicitly instead of derived from secret_seed.
    vocab_size = 3 (0, 1, query), seq_len = n_bits + 1.
    """

    name: ClassVar[str] = "parity"
    primary: ClassVar[str] = "partial_xor"
    description: ClassVar[str] = "XOR of k secret bits among n (Barak et al. 2022)"

    QUERY: ClassVar[int] = 2

    def __init__(self, n_bits: int = 10, k: int = 3, secret_seed: int = 0,
                 secret: tuple[int, ...] | None = None):
        if not 2 <= k <= n_bits:
            raise ValueError(f"parity needs 2 <= k <= n_bits, got k={k}, n_bits={n_bits}")
        self.n_bits = int(n_bits)
        self.k = int(k)
        self.secret_seed = int(secret_seed)
        if secret is None:
            chosen = np.random.default_rng(self.secret_seed).choice(self.n_bits, self.k,
                                                                    replace=False)
        else:
            chosen = np.asarray(secret)
            if (len(chosen) != self.k or len(set(chosen.tolist())) != self.k
                    or chosen.min() < 0 or chosen.max() >= self.n_bits):
                raise ValueError(f"secret must be {k} distinct positions in [0, {n_bits}), "
                                 f"got {secret}")
        self.secret = tuple(sorted(int(i) for i in chosen))

    @property
    def vocab_size(self) -> int:
        return 3

    @property
    def seq_len(self) -> int:
        return self.n_bits + 1

    def answer_tokens(self) -> torch.Tensor:
        return torch.tensor([0, 1])

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, list(self.secret)].sum(dim=1) % 2  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        bits = rng.integers(0, 2, size=(n, self.n_bits))  # (n, n_bits)
        query = np.full((n, 1), self.QUERY)  # (n, 1)
        return np.concatenate([bits, query], axis=1)  # (n, n_bits + 1)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        i, j = self.secret[:2]
        return {"partial_xor": tokens[:, i] ^ tokens[:, j],  # (n,)
                "parity": self.rule(tokens)}  # (n,)

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, T)
        mask[:, list(self.secret)] = True
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        source = base.copy()  # (n, T)
        rows = np.arange(len(base))  # (n,)
        pos = np.asarray(self.secret[:2])[rng.integers(0, 2, size=len(base))]  # (n,)
        source[rows, pos] = 1 - base[rows, pos]
        return source
