"""Induction on repeated random tokens: `w1 ... wL w1 ... w(L-1)` -> wL.

Olsson et al. 2022 ("In-context learning and induction heads") find induction heads by
repeating a random token sequence: on the repeat, the next token is predictable only by
finding the current token's earlier occurrence and copying the token that followed it.
Here the first half is L distinct words drawn from a fixed list of ordinary English words
(induction_words.json, kept if one token with a leading space), the second half repeats
its first L - 1 words, and the answer at the last position is the word that followed the
last word's first occurrence, the L-th word. seq_len = 2L - 1.

Primary variable `next_token` (the answer); `match_pos` is the position of the current
token's first occurrence (L - 2). Relevant positions: that occurrence, the token after it
and the last position. The counterfactual source replaces the L-th word by another word
not in the sequence, so the expected answer is that word.

Measured with SmolLM2-135M-Instruct (archbench.smollm2), default config: all 253 distinct
words are single tokens. On 200 test examples: accuracy (argmax over the words)
0.95, full-vocabulary argmax 0.95.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.tokenized import TokenizedTask, package_data, single_token_ids, too_few


class Induction(TokenizedTask):
    """Repeated random words; answer = the word after the last word's first occurrence.

    Args: tokenizer (a `transformers` tokenizer or a path), length (L, the words in the
    first half; default 12).
    """

    name: ClassVar[str] = "induction"
    primary: ClassVar[str] = "next_token"
    description: ClassVar[str] = "w1 .. wL w1 .. w(L-1) -> wL (induction on repeated words)"

    def __init__(self, tokenizer, length: int = 12):
        self._init_tokenizer(tokenizer)
        if length < 2:
            raise ValueError(f"induction needs length >= 2, got {length}")
        self.length = int(length)
        words = single_token_ids(self._tokenizer, list(dict.fromkeys(package_data("induction_words.json")["words"])))
        self._words = np.array(sorted(set(words.values())))  # (W,) word ids
        self.n_words = len(self._words)
        if self.n_words < self.length + 2:
            raise too_few(self.name, "words", self.n_words, self.length + 2)

    @property
    def seq_len(self) -> int:
        return 2 * self.length - 1

    def answer_tokens(self) -> torch.Tensor:
        return torch.as_tensor(self._words)  # (W,) sorted

    def _check(self, tokens: torch.Tensor) -> None:
        first, repeat = tokens[:, :self.length], tokens[:, self.length:]  # (n, L), (n, L-1)
        distinct = (first[:, :, None] != first[:, None, :]).sum(dim=(1, 2)) == self.length * (self.length - 1)
        if not bool((torch.equal(first[:, :-1], repeat) and distinct.all())):
            raise ValueError("induction: a sequence is not L distinct words followed by their repeat")

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check(tokens)
        return tokens[:, self.length - 1]  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        pick = np.argsort(rng.random((n, self.n_words)), axis=1)[:, :self.length]  # (n, L) distinct
        first = self._words[pick]  # (n, L)
        return np.concatenate([first, first[:, :-1]], axis=1)  # (n, 2L - 1)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"next_token": self.rule(tokens),  # (n,) answer id
                "match_pos": torch.full((len(tokens),), self.length - 2, dtype=torch.long)}  # (n,)

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, T)
        mask[:, [self.length - 2, self.length - 1, -1]] = True
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        used = (self._words[None, :, None] == base[:, None, :]).any(axis=2)  # (n, W)
        score = rng.random(used.shape)  # (n, W)
        score[used] = -1.0
        source = base.copy()  # (n, T)
        source[:, self.length - 1] = self._words[score.argmax(axis=1)]
        return source
