"""Modular addition: `a b =` -> (a + b) mod p.

The model system of Nanda et al. 2023, "Progress measures for grokking via mechanistic
interpretability" (ICLR 2023), where a one-layer transformer was shown to add by rotating
Fourier features of a and b. Token ids 0..p-1 are the numbers themselves, id p is "=", and
the answer token id is the residue itself.

All p^2 inputs exist, so the split is over (a, b) pairs: the content hash of `Task` puts
about 20% of the pairs (`test_fraction`) in the test split, and a model that passes the
held-out gate has generalised to sums it never saw. The constructor checks that both
splits are nonempty, which tiny p could violate.

Primary variable `sum`; the counterfactual source changes `a` (b unchanged), so the
expected answer is `(a' + b) mod p`, which always differs from the base answer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.base import Task


class ModAdd(Task):
    """`a b =` with a, b in [0, p); answer (a + b) mod p at the "=" position.

    Knobs: p (modulus, default 23; vocab_size = p + 1, seq_len = 3).
    """

    name: ClassVar[str] = "modadd"
    primary: ClassVar[str] = "sum"
    description: ClassVar[str] = "a b = -> (a+b) mod p (Nanda et al. 2023)"

    def __init__(self, p: int = 23):
        if p < 2:
            raise ValueError(f"modadd needs p >= 2, got p={p}")
        self.p = int(p)
        splits = set(self.split_of(self.all_inputs()).tolist())  # codes present among the p*p pairs
        if len(splits) < 3:
            raise ValueError(f"modadd with p={p} leaves a train, val or test split empty; use a larger p")

    @property
    def vocab_size(self) -> int:
        return self.p + 1

    @property
    def seq_len(self) -> int:
        return 3

    def all_inputs(self) -> np.ndarray:
        """Every input sequence, (p*p, 3), a-major."""
        a, b = np.divmod(np.arange(self.p * self.p), self.p)  # (p*p,), (p*p,)
        eq = np.full_like(a, self.p)  # (p*p,)
        return np.stack([a, b, eq], axis=1)  # (p*p, 3)

    def answer_tokens(self) -> torch.Tensor:
        return torch.arange(self.p)  # (p,) residues

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens[:, 0] + tokens[:, 1]) % self.p  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ab = rng.integers(0, self.p, size=(n, 2))  # (n, 2)
        eq = np.full((n, 1), self.p)  # (n, 1)
        return np.concatenate([ab, eq], axis=1)  # (n, 3)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": tokens[:, 0].clone(),  # (n,)
                "b": tokens[:, 1].clone(),  # (n,)
                "sum": self.rule(tokens)}  # (n,)

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, 3)
        mask[:, :2] = True
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        source = base.copy()  # (n, 3)
        shift = rng.integers(1, self.p, size=len(base))  # (n,) never 0, so a' != a
        source[:, 0] = (base[:, 0] + shift) % self.p
        return source
