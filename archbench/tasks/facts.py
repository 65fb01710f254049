"""Factual recall: `x s1 s2 r` -> the attribute of subject (s1 s2) under relation r.

A toy of the factual associations that Meng et al. 2022 ("Locating and editing factual
associations in GPT", NeurIPS 2022; ROME) traced to mid-layer MLPs at the last subject
token. A knowledge base is drawn from `kb_seed`: n_subjects subjects, each named by two
tokens (a first name and a last name, a distinct pair per subject, every name token shared
by at least two subjects, so only the pair identifies the subject, as with multi-token
names in ROME), and for each subject and relation an attribute token. Within a relation the
attributes are balanced (each used n_subjects / n_attributes times, up to rounding).

The first token x is a filler drawn from n_fillers filler tokens. It carries no
information; it is the context that varies, so that the train and test splits can hold
different sequences of the same fact. The facts task therefore tests held-out *contexts*
of memorised facts, not new facts: the constructor checks that every (subject, relation)
pair occurs in at least one train sequence.

Token ids, in order: fillers, first names, last names, relations, attributes.
Primary variable `attribute`. The counterfactual source swaps the subject for a different
subject (both name positions rewritten with the other subject's tokens; one of the two may
coincide) whose attribute under the same relation differs, so the expected answer always
differs from the base answer.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.base import Task


class Facts(Task):
    """A seeded knowledge base of (subject, relation) -> attribute; input `x s1 s2 r`.

    Knobs: n_subjects (16), n_first (first-name tokens, 4), n_last (last-name tokens, 4),
    n_relations (2), n_attributes (8), n_fillers (8), kb_seed (0).
    Defaults give vocab_size = 8 + 4 + 4 + 2 + 8 = 26 and seq_len = 4.
    """

    name: ClassVar[str] = "facts"
    primary: ClassVar[str] = "attribute"
    description: ClassVar[str] = "x s1 s2 r -> attribute (a seeded knowledge base, after ROME)"
    subject_positions: ClassVar[tuple[int, ...]] = (1, 2)  # the subject's name tokens (causal tracing corrupts them)

    def __init__(self, n_subjects: int = 16, n_first: int = 4, n_last: int = 4,
                 n_relations: int = 2, n_attributes: int = 8, n_fillers: int = 8,
                 kb_seed: int = 0):
        self._set_knobs({"n_first": n_first, "n_last": n_last}, n_subjects, n_relations, n_attributes,
                        n_fillers, kb_seed)

    def _set_knobs(self, name_tokens: dict[str, int], n_subjects: int, n_relations: int, n_attributes: int,
                   n_fillers: int, kb_seed: int) -> None:
        """Check and set the knobs (`name_tokens`: the token count of each name part, in
        order), then draw the knowledge base and check the train split covers every fact."""
        parts = " x ".join(name_tokens)
        if n_subjects > int(np.prod(list(name_tokens.values()))):
            raise ValueError(f"{self.name}: {n_subjects} subjects need {parts.replace(' x ', ' * ')} >= "
                             f"{n_subjects}, got {' x '.join(map(str, name_tokens.values()))}")
        if n_subjects < 2 * max(name_tokens.values()):
            raise ValueError(f"{self.name}: every name token must be shared by two subjects, so "
                             f"n_subjects >= 2 * max({', '.join(name_tokens)}) = "
                             f"{2 * max(name_tokens.values())}, got {n_subjects}")
        if n_relations < 1 or n_attributes < 2 or n_fillers < 1:
            raise ValueError(f"{self.name} needs n_relations >= 1, n_attributes >= 2, n_fillers >= 1")
        self.n_subjects = int(n_subjects)
        for knob, count in name_tokens.items():
            setattr(self, knob, int(count))
        self.n_relations = int(n_relations)
        self.n_attributes = int(n_attributes)
        self.n_fillers = int(n_fillers)
        self.kb_seed = int(kb_seed)
        self._build_kb()
        self._check_train_covers_facts()

    # --- token layout ------------------------------------------------------------------
    @property
    def first0(self) -> int:
        return self.n_fillers

    @property
    def last0(self) -> int:
        return self.first0 + self.n_first

    @property
    def relation0(self) -> int:
        return self.last0 + self.n_last

    @property
    def attribute0(self) -> int:
        return self.relation0 + self.n_relations

    @property
    def vocab_size(self) -> int:
        return self.attribute0 + self.n_attributes

    @property
    def seq_len(self) -> int:
        return 4

    # --- the knowledge base ------------------------------------------------------------
    def _build_kb(self) -> None:
        rng = np.random.default_rng(self.kb_seed)
        grid = self.n_first * self.n_last
        for _ in range(1000):  # redraw until every name token is shared by two subjects
            combo = rng.permutation(grid)[:self.n_subjects]  # (S,) index into the name grid
            first, last = np.divmod(combo, self.n_last)  # (S,), (S,)
            if (np.bincount(first, minlength=self.n_first).min() >= 2
                    and np.bincount(last, minlength=self.n_last).min() >= 2):
                break
        else:
            raise ValueError("facts: could not draw subject names sharing every token; "
                             "use more subjects or fewer name tokens")
        self._first = first  # (S,) first-name index of each subject
        self._last = last  # (S,) last-name index of each subject
        self._subject_of = np.full((self.n_first, self.n_last), -1)  # (n_first, n_last)
        self._subject_of[first, last] = np.arange(self.n_subjects)
        balanced = np.resize(np.arange(self.n_attributes), self.n_subjects)  # (S,)
        self._attribute = np.stack([rng.permutation(balanced) for _ in range(self.n_relations)],
                                   axis=1)  # (S, R) attribute index

    def kb(self) -> dict[str, np.ndarray]:
        """The knowledge base as token ids: names (S, 2) and attribute (S, R)."""
        names = np.stack([self.first0 + self._first, self.last0 + self._last], axis=1)  # (S, 2)
        return {"names": names, "attribute": self.attribute0 + self._attribute}

    def all_inputs(self) -> np.ndarray:
        """Every input sequence, (n_fillers * S * R, 4), filler-major then subject, relation."""
        x, s, r = np.meshgrid(np.arange(self.n_fillers), np.arange(self.n_subjects),
                              np.arange(self.n_relations), indexing="ij")  # (F, S, R) each
        x, s, r = x.ravel(), s.ravel(), r.ravel()  # (F*S*R,)
        return np.stack([x, self.first0 + self._first[s], self.last0 + self._last[s],
                         self.relation0 + r], axis=1)  # (F*S*R, 4)

    def _check_train_covers_facts(self) -> None:
        held_out = self.split_of(self.all_inputs()) != 0  # (F*S*R,) val or test
        held_out = held_out.reshape(self.n_fillers, self.n_subjects * self.n_relations)
        if held_out.all(axis=0).any():
            raise ValueError("facts: some (subject, relation) pair has no train context; "
                             "use more fillers or another kb_seed")

    # --- the task contract -------------------------------------------------------------
    def _subjects(self, tokens: torch.Tensor) -> torch.Tensor:
        first = tokens[:, 1] - self.first0  # (n,)
        last = tokens[:, 2] - self.last0  # (n,)
        ok = (first >= 0) & (first < self.n_first) & (last >= 0) & (last < self.n_last)
        subject = torch.full_like(first, -1)  # (n,)
        table = torch.as_tensor(self._subject_of)  # (n_first, n_last)
        subject[ok] = table[first[ok], last[ok]]
        if bool((subject < 0).any()):
            raise ValueError("facts: a sequence does not name a subject of the knowledge base")
        return subject

    def answer_tokens(self) -> torch.Tensor:
        return self.attribute0 + torch.arange(self.n_attributes)  # (n_attributes,)

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        subject = self._subjects(tokens)  # (n,)
        relation = tokens[:, 3] - self.relation0  # (n,)
        return self.attribute0 + torch.as_tensor(self._attribute)[subject, relation]  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.integers(0, self.n_fillers, size=n)  # (n,)
        s = rng.integers(0, self.n_subjects, size=n)  # (n,)
        r = rng.integers(0, self.n_relations, size=n)  # (n,)
        return np.stack([x, self.first0 + self._first[s], self.last0 + self._last[s],
                         self.relation0 + r], axis=1)  # (n, 4)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"subject": self._subjects(tokens),  # (n,) subject index
                "attribute": self.rule(tokens),  # (n,) attribute token id
                "relation": tokens[:, 3] - self.relation0}  # (n,) relation index

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, 4)
        mask[:, 1:] = True  # both subject tokens and the relation
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        base_t = torch.as_tensor(base)
        relation = base[:, 3] - self.relation0  # (n,)
        attr = self._attribute[:, relation].T  # (n, S) attribute of every subject, base's r
        base_attr = self.rule(base_t).numpy() - self.attribute0  # (n,)
        score = rng.random(attr.shape)  # (n, S)
        score[attr == base_attr[:, None]] = -1.0  # only subjects with another attribute
        new = score.argmax(axis=1)  # (n,) balanced attributes: a candidate always exists
        source = base.copy()  # (n, 4)
        source[:, 1] = self.first0 + self._first[new]
        source[:, 2] = self.last0 + self._last[new]
        return source
