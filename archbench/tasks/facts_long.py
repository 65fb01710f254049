"""Long-prompt factual recall: `x s1 s2 s3 c1 c2 r` -> the attribute of subject (s1 s2 s3) under r.

The facts task (`archbench/tasks/facts.py`) with room for the distinction Meng et al. 2022
("Locating and editing factual associations in GPT", NeurIPS 2022, section 2.1) draw in
causal tracing: states at the *last subject token* versus states at the *last token of the
prompt*. In `x s1 s2 r` the last subject token is next to the last token; here the subject
has three tokens (a first, a middle and a last name) and two context tokens stand between it
and the relation, so the subject's first, middle and last token, the intervening context and
the last token (the relation, where the answer is read) are five distinct kinds of position.

Layout (`subject_positions` = (1, 2, 3), `relation_position` = 6): position 0 and the two
context positions 4, 5 each hold one of n_fillers filler tokens, drawn independently; they
carry no information, and they are the contexts that vary between splits, so the task tests
held-out contexts of memorised facts, as facts does (the constructor checks that every
(subject, relation) pair has a train sequence).

The knowledge base keeps facts' invariants: n_subjects subjects, each named by a distinct
triple of name tokens, every name token shared by at least two subjects (so no single
position names the subject); for each relation the attributes are balanced. Token ids, in
order: fillers, first names, middle names, last names, relations, attributes (the layout
properties of facts, with the middle names inserted before the last names). Primary
variable `attribute`. The counterfactual source swaps the whole subject (all three name
positions rewritten with another subject's tokens, some of which may coincide) for one whose
attribute under the same relation differs, so the expected answer always differs.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.facts import Facts


class FactsLong(Facts):
    """A seeded knowledge base of (subject, relation) -> attribute; input `x s1 s2 s3 c1 c2 r`.

    Knobs: n_subjects (16), n_first (4), n_middle (4), n_last (4), n_relations (2),
    n_attributes (8), n_fillers (8), kb_seed (0).
    Defaults give vocab_size = 8 + 4 + 4 + 4 + 2 + 8 = 30 and seq_len = 7.
    """

    name: ClassVar[str] = "facts_long"
    description: ClassVar[str] = ("x s1 s2 s3 c1 c2 r -> attribute (3-token subjects, context before the "
                                  "relation; after ROME's causal tracing)")
    subject_positions: ClassVar[tuple[int, ...]] = (1, 2, 3)
    in_matrix: ClassVar[bool] = False  # Meng's and Sen Sharma's findings (archbench/findings.py)
    context_positions: ClassVar[tuple[int, ...]] = (0, 4, 5)  # filler tokens
    relation_position: ClassVar[int] = 6

    def __init__(self, n_subjects: int = 16, n_first: int = 4, n_middle: int = 4, n_last: int = 4,
                 n_relations: int = 2, n_attributes: int = 8, n_fillers: int = 8, kb_seed: int = 0):
        self._set_knobs({"n_first": n_first, "n_middle": n_middle, "n_last": n_last}, n_subjects, n_relations,
                        n_attributes, n_fillers, kb_seed)

    # --- token layout (facts' first0, relation0, attribute0 and vocab_size follow) ---------
    @property
    def middle0(self) -> int:
        return self.first0 + self.n_first

    @property
    def last0(self) -> int:
        return self.middle0 + self.n_middle

    @property
    def seq_len(self) -> int:
        return 7

    @property
    def _part_sizes(self) -> tuple[int, int, int]:
        return self.n_first, self.n_middle, self.n_last

    @property
    def _part_offsets(self) -> np.ndarray:
        return np.array([self.first0, self.middle0, self.last0])  # (3,) first token id of each name part

    # --- the knowledge base ------------------------------------------------------------
    def _build_kb(self) -> None:
        rng = np.random.default_rng(self.kb_seed)
        sizes = self._part_sizes
        for _ in range(1000):  # redraw until every name token is shared by two subjects
            combo = rng.permutation(int(np.prod(sizes)))[:self.n_subjects]  # (S,) index into the name grid
            parts = np.stack(np.unravel_index(combo, sizes), axis=1)  # (S, 3) name index per part
            if all(np.bincount(parts[:, j], minlength=n).min() >= 2 for j, n in enumerate(sizes)):
                break
        else:
            raise ValueError("facts_long: could not draw subject names sharing every token; "
                             "use more subjects or fewer name tokens")
        self._parts = parts  # (S, 3) first, middle, last name index of each subject
        self._subject_of = np.full(sizes, -1)  # (n_first, n_middle, n_last)
        self._subject_of[tuple(parts.T)] = np.arange(self.n_subjects)
        balanced = np.resize(np.arange(self.n_attributes), self.n_subjects)  # (S,)
        self._attribute = np.stack([rng.permutation(balanced) for _ in range(self.n_relations)],
                                   axis=1)  # (S, R) attribute index

    def kb(self) -> dict[str, np.ndarray]:
        """The knowledge base as token ids: names (S, 3) and attribute (S, R)."""
        return {"names": self._part_offsets + self._parts, "attribute": self.attribute0 + self._attribute}

    def _sequences(self, context: np.ndarray, subject: np.ndarray, relation: np.ndarray) -> np.ndarray:
        """Token sequences (n, 7) from filler indices (n, 3) at positions 0, 4, 5, subjects (n,), relations (n,)."""
        rows = np.empty((len(subject), self.seq_len), dtype=np.int64)  # (n, 7)
        rows[:, list(self.context_positions)] = context
        rows[:, list(self.subject_positions)] = self.kb()["names"][subject]
        rows[:, self.relation_position] = self.relation0 + relation
        return rows

    def all_inputs(self) -> np.ndarray:
        """Every input sequence, (n_fillers**3 * S * R, 7): context-major, then subject, relation."""
        grids = np.meshgrid(*[np.arange(self.n_fillers)] * 3, np.arange(self.n_subjects),
                            np.arange(self.n_relations), indexing="ij")  # 5 x (F, F, F, S, R)
        x, c1, c2, s, r = (g.ravel() for g in grids)  # (F^3*S*R,) each
        return self._sequences(np.stack([x, c1, c2], axis=1), s, r)

    def _check_train_covers_facts(self) -> None:
        held_out = self.split_of(self.all_inputs()) != 0  # (F^3*S*R,) val or test
        held_out = held_out.reshape(-1, self.n_subjects * self.n_relations)  # (contexts, S*R)
        if held_out.all(axis=0).any():
            raise ValueError("facts_long: some (subject, relation) pair has no train context; "
                             "use more fillers or another kb_seed")

    # --- the task contract -------------------------------------------------------------
    def _subjects(self, tokens: torch.Tensor) -> torch.Tensor:
        offsets = torch.as_tensor(self._part_offsets)  # (3,)
        parts = tokens[:, list(self.subject_positions)] - offsets  # (n, 3)
        ok = ((parts >= 0) & (parts < torch.as_tensor(self._part_sizes))).all(1)  # (n,)
        subject = torch.full((len(tokens),), -1, dtype=torch.long)  # (n,)
        table = torch.as_tensor(self._subject_of)  # (n_first, n_middle, n_last)
        subject[ok] = table[parts[ok, 0], parts[ok, 1], parts[ok, 2]]
        if bool((subject < 0).any()):
            raise ValueError("facts_long: a sequence does not name a subject of the knowledge base")
        return subject

    def _relations(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.relation_position] - self.relation0  # (n,)

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attribute0 + torch.as_tensor(self._attribute)[self._subjects(tokens), self._relations(tokens)]

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        context = rng.integers(0, self.n_fillers, size=(n, 3))  # (n, 3)
        s = rng.integers(0, self.n_subjects, size=n)  # (n,)
        r = rng.integers(0, self.n_relations, size=n)  # (n,)
        return self._sequences(context, s, r)  # (n, 7)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"subject": self._subjects(tokens),  # (n,) subject index
                "attribute": self.rule(tokens),  # (n,) attribute token id
                "relation": self._relations(tokens)}  # (n,) relation index

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, 7)
        mask[:, [*self.subject_positions, self.relation_position]] = True  # the subject's tokens and the relation
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        base_t = torch.as_tensor(base)
        relation = self._relations(base_t).numpy()  # (n,)
        attr = self._attribute[:, relation].T  # (n, S) attribute of every subject, base's r
        base_attr = self.rule(base_t).numpy() - self.attribute0  # (n,)
        score = rng.random(attr.shape)  # (n, S)
        score[attr == base_attr[:, None]] = -1.0  # only subjects with another attribute
        new = score.argmax(axis=1)  # (n,) balanced attributes: a candidate always exists
        source = base.copy()  # (n, 7)
        source[:, list(self.subject_positions)] = self.kb()["names"][new]
        return source
