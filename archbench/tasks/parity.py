"""Sparse parity: n bits -> XOR of k secret bits.

The (n, k)-sparse parity problem of Barak et al. 2022, "Hidden progress in deep learning:
SGD learns parities near the computational limit" (NeurIPS 2022): the label is the parity
of k fixed, unknown positions among n uniformly random bits. Here the bits are tokens 0/1,
followed by a query token (id 2) at which the answer (token 0 or 1) is read.

The secret positions are drawn per seed (`for_seed(seed)`: every organism seed gets its own
secret, and its trained model and random-init control share it) and, by default, *spread*
over the sequence: position i of the k is drawn from the first half of the i-th of k equal
segments, so the first and last secret bits lie at least ~n(k-1)/k - n/(2k) steps apart and
a model must carry a bit across most of the sequence. With n = 16 and k = 3 a fixed-memory
echo-state network is at chance, as the memory-nonlinearity trade-off of reservoirs predicts
(Dambre et al. 2012), while a transformer attends to the secret positions directly. The old
local variant (n = 10, secret (5, 6, 9): the last bits just before the query) is
`Parity(n_bits=10, secret=(5, 6, 9))`, or `spread=False` for uniformly drawn positions.
The drawn tuple is stored as `secret`, so `config()` records it and `Parity(**task.config())`
rebuilds the task.
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

    Knobs: n_bits (default 16), k (secret size, default 3), secret_seed (default 0; replaced
    by the organism seed in `for_seed` when per_seed), spread (default True), per_seed
    (default True); `secret` may be given explicitly instead (then it is fixed for all seeds).
    vocab_size = 3 (0, 1, query), seq_len = n_bits + 1.
    """

    name: ClassVar[str] = "parity"
    primary: ClassVar[str] = "partial_xor"
    description: ClassVar[str] = "XOR of k secret bits among n (Barak et al. 2022)"

    QUERY: ClassVar[int] = 2

    def __init__(self, n_bits: int = 16, k: int = 3, secret_seed: int = 0,
                 secret: tuple[int, ...] | None = None, spread: bool = True,
                 per_seed: bool = True):
        if not 2 <= k <= n_bits:
            raise ValueError(f"parity needs 2 <= k <= n_bits, got k={k}, n_bits={n_bits}")
        if spread and n_bits < 2 * k:
            raise ValueError(f"spread parity needs n_bits >= 2k, got k={k}, n_bits={n_bits}")
        self.n_bits = int(n_bits)
        self.k = int(k)
        self.secret_seed = int(secret_seed)
        self.spread = bool(spread)
        self.per_seed = bool(per_seed and secret is None)  # an explicit secret stays fixed
        if secret is None:
            chosen = self._draw_secret(np.random.default_rng(self.secret_seed))
        else:
            chosen = np.asarray(secret)
            if (len(chosen) != self.k or len(set(chosen.tolist())) != self.k
                    or chosen.min() < 0 or chosen.max() >= self.n_bits):
                raise ValueError(f"secret must be {k} distinct positions in [0, {n_bits}), "
                                 f"got {secret}")
        self.secret = tuple(sorted(int(i) for i in chosen))

    def _draw_secret(self, rng: np.random.Generator) -> np.ndarray:
        if not self.spread:
            return rng.choice(self.n_bits, self.k, replace=False)
        width = self.n_bits / self.k  # segment i is [i * width, (i + 1) * width)
        half = max(1, int(width // 2))  # draw from the segment's first half
        return np.array([int(i * width) + rng.integers(0, half) for i in range(self.k)])

    def for_seed(self, seed: int) -> "Parity":
        """This task with its secret drawn from `seed` (itself when the secret is fixed)."""
        if not self.per_seed:
            return self
        drawn = Parity(self.n_bits, self.k, secret_seed=seed, spread=self.spread)
        return Parity(self.n_bits, self.k, secret_seed=seed, secret=drawn.secret,
                      spread=self.spread, per_seed=False)

    def config(self) -> dict:
        """The knobs; the secret only once it is fixed (drawn for a seed, or given)."""
        config = super().config()
        if self.per_seed:
            del config["secret"]  # derived from secret_seed, and redrawn per organism seed
        return config

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
