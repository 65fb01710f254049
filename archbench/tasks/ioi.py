"""Indirect object identification: "When Mary and John went to the store, John gave a drink to" -> " Mary".

The task of Wang et al. 2022 ("Interpretability in the wild: a circuit for indirect object
identification in GPT-2 small"), with the causal variables of the MIB benchmark (Mueller
et al. 2025, "MIB: a mechanistic interpretability benchmark"): the output token (the
indirect object, IO, the name that is not repeated) and the output position (which of the
two name positions holds the IO: 0 the first, 1 the second; ABBA vs BABA templates).

Templates, names, places and objects ship in ioi.json. Names, places and objects are kept
if they are one token with a leading space under the tokenizer; templates are grouped by
token length and an instance uses one group (by default the largest), so every sequence
has one length. Tokens are assembled from separately encoded template pieces, and a
template whose pieces do not concatenate to its whole encoding is dropped.

Primary variable `output_token`. Relevant positions: both names and the repeated subject
(S2). The counterfactual source replaces the IO name by another name (neither IO nor S),
so the expected answer is the new name. `counterfactuals(..., variable="output_position")`
gives MIB's second variable: the source swaps the two first-clause names (ABBA <-> BABA),
so it has the same IO and S with the IO at the other name position, and the expected answer
with the source's output position is the base's name there, its subject.

Measured with SmolLM2-135M-Instruct (archbench.smollm2), default config: 132 of 156 names,
19 of 20 places, 20 of 20 objects are single tokens; length group 15 keeps 6 of its 7 templates.
On 200 test examples: accuracy (argmax over the names) 0.975, full-vocabulary
argmax 0.865; logit difference IO - S mean 5.07, positive on 97.5% of prompts.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import ClassVar

import numpy as np
import torch

from archbench.tasks.tokenized import (TokenizedTask, encode, package_data, single_token_ids,
                                       too_few)

SLOT = re.compile(r" \{(A|B|S|PLACE|OBJECT)\}")
MIN_NAMES, MIN_FILLERS = 8, 2


class IOI(TokenizedTask):
    """IOI prompts under a pretrained tokenizer; answer = the indirect object's name token.

    Args: tokenizer (a `transformers` tokenizer or a path), length (the template group's
    token length; None picks the group with the most templates).
    """

    name: ClassVar[str] = "ioi"
    primary: ClassVar[str] = "output_token"
    description: ClassVar[str] = "When A and B went to the store, B gave a drink to -> A (IOI)"

    def __init__(self, tokenizer, length: int | None = None):
        self._init_tokenizer(tokenizer)
        data = package_data("ioi.json")
        names = single_token_ids(self._tokenizer, list(dict.fromkeys(data["names"])))
        places = single_token_ids(self._tokenizer, data["places"])
        objects = single_token_ids(self._tokenizer, data["objects"])
        self.n_names, self.n_places, self.n_objects = len(names), len(places), len(objects)
        if self.n_names < MIN_NAMES:
            raise too_few(self.name, "names", self.n_names, MIN_NAMES)
        if min(self.n_places, self.n_objects) < MIN_FILLERS:
            raise too_few(self.name, "places or objects", min(self.n_places, self.n_objects), MIN_FILLERS)
        self._names = np.array(sorted(names.values()))  # (N,) name ids
        self._places = np.array(sorted(places.values()))  # (P,)
        self._objects = np.array(sorted(objects.values()))  # (O,)
        pieces = [self._pieces(t, names, places, objects) for t in data["templates"]]
        pieces = [p for p in pieces if p is not None]
        lengths = Counter(len(p[0]) for p in pieces)
        self.length = int(lengths.most_common(1)[0][0] if length is None else length)
        chosen = [p for p in pieces if len(p[0]) == self.length]
        if not chosen:
            raise ValueError(f"ioi: no template has {self.length} tokens; lengths: {dict(lengths)}")
        self.n_templates = len(chosen)
        self._template = np.stack([p[0] for p in chosen])  # (K, T) ids, -1 at slots
        self._slots = [p[1] for p in chosen]  # per template: slot name -> positions

    def _pieces(self, template, names, places, objects):
        """(ids with -1 at the slots, slot -> positions), or None if it does not tokenise cleanly."""
        parts = SLOT.split(template)  # literal, slot, literal, slot, ..., literal
        ids, slots = [], {}
        for i, part in enumerate(parts):
            if i % 2:
                slots.setdefault(part, []).append(len(ids))
                ids.append(-1)
            elif part:
                ids.extend(encode(self._tokenizer, part))
        a, b = list(names)[:2]
        fill = {"A": a, "B": b, "S": b, "PLACE": next(iter(places)), "OBJECT": next(iter(objects))}
        full = encode(self._tokenizer, template.format(**fill))
        ids_filled = list(ids)
        table = {"A": names[a], "B": names[b], "S": names[b], "PLACE": places[fill["PLACE"]],
                 "OBJECT": objects[fill["OBJECT"]]}
        for slot, positions in slots.items():
            for p in positions:
                ids_filled[p] = table[slot]
        if full != ids_filled or set(slots) != {"A", "B", "S", "PLACE", "OBJECT"}:
            return None
        return np.array(ids), slots

    @property
    def seq_len(self) -> int:
        return self.length

    def answer_tokens(self) -> torch.Tensor:
        return torch.as_tensor(self._names)  # (N,) name ids, sorted

    # --- reading a sequence --------------------------------------------------------------
    def _template_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) index of each sequence's template."""
        t = torch.as_tensor(self._template)  # (K, T)
        fixed = t >= 0  # (K, T)
        match = ((tokens[:, None, :] == t[None]) | ~fixed[None]).all(dim=2)  # (n, K)
        if not bool(match.any(dim=1).all()):
            raise ValueError("ioi: a sequence does not follow any template of this instance")
        return match.int().argmax(dim=1)  # (n,)

    def _positions(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """(n,) position of A, B and S in each sequence."""
        k = self._template_of(tokens)  # (n,)
        return {slot: torch.as_tensor([self._slots[i][slot][0] for i in k.tolist()], dtype=torch.long)
                for slot in ("A", "B", "S")}

    def _parse(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pos = self._positions(tokens)
        rows = torch.arange(len(tokens))  # (n,)
        a, b, s = (tokens[rows, pos[k]] for k in ("A", "B", "S"))  # (n,) each
        if bool(((a == b) | ((s != a) & (s != b))).any()):
            raise ValueError("ioi: the two names must differ and the subject must repeat one")
        io_second = s == a  # (n,) the IO is the second name
        return {"io": torch.where(io_second, b, a), "s": s, "io_second": io_second.long(),
                "io_pos": torch.where(io_second, pos["B"], pos["A"]), **{f"pos_{k}": v for k, v in pos.items()}}

    # --- the task contract ---------------------------------------------------------------
    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._parse(tokens)["io"]  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = rng.integers(0, len(self._template), size=n)  # (n,) template
        pair = np.argsort(rng.random((n, len(self._names))), axis=1)[:, :2]  # (n, 2) distinct
        io, s = self._names[pair[:, 0]], self._names[pair[:, 1]]  # (n,), (n,)
        io_second = rng.integers(0, 2, size=n).astype(bool)  # (n,)
        fill = {"A": np.where(io_second, s, io), "B": np.where(io_second, io, s), "S": s,
                "PLACE": self._places[rng.integers(0, len(self._places), size=n)],
                "OBJECT": self._objects[rng.integers(0, len(self._objects), size=n)]}
        tokens = self._template[k].copy()  # (n, T)
        for i in range(n):
            for slot, positions in self._slots[k[i]].items():
                tokens[i, positions] = fill[slot][i]
        return tokens

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self._parse(tokens)
        return {"output_token": p["io"],  # (n,) IO name id
                "output_position": p["io_second"],  # (n,) 0: IO is the first name, 1: the second
                "subject": p["s"],  # (n,) S name id
                "template": self._template_of(tokens)}  # (n,) template index

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self._parse(tokens)
        rows = torch.arange(len(tokens))  # (n,)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)  # (n, T)
        for k in ("pos_A", "pos_B", "pos_S"):
            mask[rows, p[k]] = True
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        p = self._parse(torch.as_tensor(base))
        io, s, io_pos = p["io"].numpy(), p["s"].numpy(), p["io_pos"].numpy()  # (n,) each
        score = rng.random((len(base), len(self._names)))  # (n, N)
        score[self._names[None] == io[:, None]] = -1.0
        score[self._names[None] == s[:, None]] = -1.0
        source = base.copy()  # (n, T)
        source[np.arange(len(base)), io_pos] = self._names[score.argmax(axis=1)]
        return source

    # --- the output-position variable (MIB) ----------------------------------------------
    def other_counterfactuals(self):
        return {"output_position": (self._position_source, self._position_interchange)}

    def _position_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        """The base with its two first-clause names swapped (ABBA <-> BABA): the same IO and S,
        the IO at the other name position."""
        p = self._parse(torch.as_tensor(base))
        rows, a, b = np.arange(len(base)), p["pos_A"].numpy(), p["pos_B"].numpy()  # (n,) each
        source = base.copy()  # (n, T)
        source[rows, a], source[rows, b] = base[rows, b], base[rows, a]
        return source

    def _position_interchange(self, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """The answer base would give with the source's output position: base's name at the
        position that holds the IO in the source (with swapped names, base's subject): (n,)."""
        at = self._parse(source)["io_pos"]  # (n,)
        return base[torch.arange(len(base)), at]


def logit_difference(logits: torch.Tensor, task: IOI, tokens: torch.Tensor) -> torch.Tensor:
    """(n,) logit of the IO name minus that of the subject at the last position: (n, V) -> (n,)."""
    lat = task.latents(tokens)
    rows = torch.arange(len(tokens))  # (n,)
    return logits[rows, lat["output_token"]] - logits[rows, lat["subject"]]
