"""Factual recall in natural text: "The Eiffel Tower is located in the city of" -> " Paris".

The prompts of the factual-association studies of Meng et al. 2022 ("Locating and editing
factual associations in GPT"; ROME), who score only the facts the model knows. A small set
of subject-relation-object facts ships in facts_nl.json (capitals, official languages,
cities of landmarks), each relation with three templates (contexts), so a fact occurs in
several sequences and the content-hash splits can hold different contexts of one fact. A
fact is kept if its object is one token with a leading space. Sequences are left-padded
with a pad token (default a newline) to the longest prompt over every kept fact, so a
restricted instance holds the very sequences its facts were checked on.

`known_by(predict)` returns the instance restricted to the facts whose answer the model's
full-vocabulary argmax gets right in every context; the kept fact keys (`only`) and the
model's label (`known_by`) are knobs of the new instance, hence part of `config()` and of
an organism's identity.

Primary variable `object` (the answer). Relevant positions: the subject's tokens and the
last position (where the relation is read out). The counterfactual source is the same
context with another subject of the same relation and another object, of the same token
length where one exists (so only subject positions change); otherwise the padding shifts.

Measured with SmolLM2-135M-Instruct (archbench.smollm2): 121 of 140 facts have a
single-token object (3 contexts each, 14 tokens). On 200 test examples: accuracy (argmax over
the objects) 0.68, full-vocabulary argmax 0.455; the Eiffel Tower prompt gives " Paris".
Right in all three contexts (full vocabulary): 7 facts, so `known_by` keeps 7 (5 capitals,
2 languages), on which both accuracies are 1.0.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np
import torch

from archbench.tasks.tokenized import TokenizedTask, encode, package_data, too_few

MIN_FACTS = 4


def _prompt(template: str, subject: str) -> tuple[str, str, str]:
    """(text before the subject, the subject as written there, the text after it)."""
    before, after = template.split("{S}")
    if before:
        return before.rstrip(" "), " " + subject, after
    return "", subject[:1].upper() + subject[1:], after


class FactsNL(TokenizedTask):
    """Subject-relation-object prompts; answer = the object's first token.

    Args: tokenizer (a `transformers` tokenizer or a path), pad (the left-padding text, one
    token; default "\\n"), only (fact keys "relation/subject" to keep; None keeps all),
    known_model (a label of the model `only` was measured on).
    """

    name: ClassVar[str] = "facts_nl"
    primary: ClassVar[str] = "object"
    description: ClassVar[str] = "The Eiffel Tower is located in the city of -> Paris (factual recall)"

    def __init__(self, tokenizer, pad: str = "\n", only: tuple[str, ...] | list[str] | None = None,
                 known_model: str = ""):
        self._init_tokenizer(tokenizer)
        self.pad = pad
        pad_ids = encode(self._tokenizer, pad)
        if len(pad_ids) != 1:
            raise ValueError(f"facts_nl: the pad text {pad!r} is {len(pad_ids)} tokens, not one")
        self._pad_id = pad_ids[0]
        prompts, keys, objects, relations = [], [], [], []
        data = package_data("facts_nl.json")["relations"]
        for r, (relation, spec) in enumerate(data.items()):
            for subject, obj in spec["facts"].items():
                obj_ids = encode(self._tokenizer, " " + obj)
                if len(obj_ids) != 1:
                    continue
                rows = [self._encode(t, subject) for t in spec["templates"]]
                if any(row is None for row in rows):
                    continue
                prompts.append(rows)
                keys.append(f"{relation}/{subject}")
                objects.append(obj_ids[0])
                relations.append(r)
        self.n_candidate_facts = len(keys)
        self.length = max(len(ids) for rows in prompts for ids, _ in rows) if prompts else 0
        keep = list(range(len(keys))) if only is None else [i for i, k in enumerate(keys) if k in set(only)]
        self.only = None if only is None else tuple(keys[i] for i in keep)
        self.known_model = known_model
        self.n_facts = len(keep)
        if self.n_facts < MIN_FACTS:
            raise too_few(self.name, "facts", self.n_facts, MIN_FACTS)
        self._keys = [keys[i] for i in keep]
        self._object = np.array([objects[i] for i in keep])  # (F,) object ids
        self._relation = np.array([relations[i] for i in keep])  # (F,)
        self._build_rows([prompts[i] for i in keep])

    def _encode(self, template: str, subject: str):
        """(ids, (subject start, subject end)), or None if the subject does not tokenise apart."""
        before, subj, after = _prompt(template, subject)
        head = encode(self._tokenizer, before) if before else []
        with_subject = encode(self._tokenizer, before + subj)
        full = encode(self._tokenizer, before + subj + after)
        if with_subject[:len(head)] != head or full[:len(with_subject)] != with_subject:
            return None
        return full, (len(head), len(with_subject))

    def _build_rows(self, prompts) -> None:
        n_contexts = len(prompts[0])
        rows, fact, context, span = [], [], [], []
        for f, per_context in enumerate(prompts):
            for c, (ids, (start, end)) in enumerate(per_context):
                shift = self.length - len(ids)
                rows.append([self._pad_id] * shift + ids)
                fact.append(f)
                context.append(c)
                span.append((start + shift, end + shift))
        self.n_contexts = n_contexts
        self._rows = np.array(rows)  # (M, T) every sequence of the instance
        self._fact = np.array(fact)  # (M,) fact index of each row
        self._context = np.array(context)  # (M,)
        self._span = np.array(span)  # (M, 2) subject start, end (exclusive)
        self._row_of = {row.tobytes(): i for i, row in enumerate(self._rows.astype(np.int64))}
        if len(self._row_of) != len(self._rows):
            raise ValueError("facts_nl: two facts share a prompt")

    # --- the restriction to known facts -------------------------------------------------
    def known_by(self, predict: Callable[[torch.Tensor], torch.Tensor], label: str = "") -> "FactsNL":
        """This task restricted to the facts `predict` answers right in every context.

        `predict` maps (n, T) token ids to logits, (n, V) at the last position or (n, T, V);
        an adapter (anything with `.run(tokens).logits`) also works. The argmax is over the
        full vocabulary.
        """
        with torch.no_grad():
            tokens = torch.as_tensor(self._rows, dtype=torch.long)  # (M, T)
            logits = predict.run(tokens).logits if hasattr(predict, "run") else predict(tokens)
        logits = logits[:, -1] if logits.dim() == 3 else logits  # (M, V)
        right = (logits.argmax(-1).cpu().numpy() == self._object[self._fact])  # (M,)
        known = [k for f, k in enumerate(self._keys) if right[self._fact == f].all()]
        return FactsNL(self._tokenizer, pad=self.pad, only=tuple(known), known_model=label)

    def config(self) -> dict:
        config = super().config()
        config["only"] = None if self.only is None else list(self.only)
        return config

    def all_inputs(self) -> np.ndarray:
        """Every sequence of the instance, (n_facts * n_contexts, T), fact-major."""
        return self._rows.copy()

    # --- the task contract ---------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.length

    def answer_tokens(self) -> torch.Tensor:
        return torch.as_tensor(np.unique(self._object))  # (C,) sorted object ids

    def _rows_of(self, tokens: torch.Tensor) -> np.ndarray:
        try:
            return np.array([self._row_of[row.tobytes()] for row in tokens.numpy().astype(np.int64)])
        except KeyError:
            raise ValueError("facts_nl: a sequence is not a prompt of this instance") from None

    def rule(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self._object[self._fact[self._rows_of(tokens)]])  # (n,)

    def _random_inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self._rows[rng.integers(0, len(self._rows), size=n)]  # (n, T)

    def latents(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        i = self._rows_of(tokens)  # (n,)
        return {"object": torch.as_tensor(self._object[self._fact[i]]),  # (n,) answer id
                "fact": torch.as_tensor(self._fact[i]),  # (n,) fact index
                "relation": torch.as_tensor(self._relation[self._fact[i]]),  # (n,)
                "context": torch.as_tensor(self._context[i]),  # (n,) template index
                "subject_last": torch.as_tensor(self._span[i, 1] - 1)}  # (n,) last subject position

    def relevance(self, tokens: torch.Tensor) -> torch.Tensor:
        i = self._rows_of(tokens)  # (n,)
        pos = torch.arange(self.length)  # (T,)
        start, end = torch.as_tensor(self._span[i, 0]), torch.as_tensor(self._span[i, 1])  # (n,)
        mask = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])  # (n, T)
        mask[:, -1] = True
        return mask

    def _counterfactual_source(self, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
        i = self._rows_of(torch.as_tensor(base))  # (n,)
        f = self._fact  # (M,)
        same = ((self._context[None] == self._context[i][:, None])
                & (self._relation[f][None] == self._relation[f[i]][:, None])
                & (self._object[f][None] != self._object[f[i]][:, None]))  # (n, M) candidates
        aligned = same & (self._span[None, :, 0] == self._span[i, 0][:, None])  # (n, M) same length
        score = rng.random(same.shape) + aligned  # (n, M) same-length candidates first
        score[~same] = -1.0
        # A base whose relation has one object among the kept facts (a checkpoint that knows
        # one capital) has no subject that changes the answer: it is its own source, a pair
        # with expected == base answer, which the techniques drop as unable to show an effect.
        alone = ~same.any(axis=1)  # (n,)
        return np.where(alone[:, None], base, self._rows[score.argmax(axis=1)])  # (n, T)
