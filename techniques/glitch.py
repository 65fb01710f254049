"""Glitch search: does the model's answer survive edits that the task's rule says cannot change it?

A behaviour-level invariance test. It is modelled on the invariance tests (INV) of Ribeiro
et al. 2020, "Beyond Accuracy: Behavioral Testing of NLP Models with CheckList": apply
perturbations that should leave the label alone and count the predictions that change.
CheckList certifies its perturbations by construction (a name swapped for another name);
here the task's own rule certifies each one, so no edit is a guess. The bounded search
for such an edit that breaks the model follows the adversarial-example view of Jia & Liang
2017, "Adversarial Examples for Evaluating Reading Comprehension Systems": a model that
relies on a spurious cue fails on inputs whose answer a correct reader would not change.
Jia & Liang add distracting sentences; on fixed-length synthetic inputs the edit is a token
substitution instead, which is why CheckList's invariance test is the model and Jia & Liang
only the motivation.

The search. For each test example the model answers correctly (`answer_prediction`: the
answer token with the highest logit at the last position), substitute tokens at its
*irrelevant* positions (`Examples.relevant` False). A replacement token must be one the
task puts at that position: the candidates at position p are the tokens seen at p in the
task's own samples (a train-split sample and the test examples), so a filler is replaced by
a filler, a bit by a bit. An edit is kept only if the edited sequence is one the task's generator can draw
(`task.in_distribution`: recall's and mqar's keys distinct, mqar's answered queries followed
by their own values) and the task's rule gives it
the original answer and the same relevance mask (`task.rule(edited) == task.rule(original)`,
`task.relevance(edited) == task.relevance(original)`; a sequence the rule refuses to parse
is dropped): count's b <-> c at a non-`a` position, facts' filler, parity's non-secret bits.
Per example, every valid single substitution is tried if there are at most `max_singles`,
else a fixed random sample of `max_singles` of them (drawn from `seed`). Examples with no
single glitch then try pairs of valid substitutions at two distinct positions (the pair
rechecked against the rule), all of them or a sample of `max_pairs`. A *glitch* is an edit
that changes the model's answer. Per example: glitched (1) or not (0), and the minimal
number of edits that glitched it (1 or 2; metric `min_edits`, aligned with `per_example`).

Score and chance level. An example is *robust by the rule* when no irrelevant edit glitched
it and some single substitution that changes the rule's answer (any position, the same token
pools) moves the model's answer too: the model ignores what the rule ignores *and* reads
what the rule reads. per_example is 1 for such an example and 0 otherwise, over the
correctly answered examples that have at least one valid edit; the score is their mean. It is
1 for the rule itself; 0 for a model whose answer is an arbitrary function of every token (it
glitches almost always: each of ~10 edits keeps a C-way answer with probability ~1/C) and 0
for a model that ignores its whole input (nothing glitches it, but nothing moves it either).
Plain robustness, 1 - glitch rate, cannot tell the rule from a constant model: random-init
controls that answer one token whatever the input scored 1 on it (measured below), so a
trained − control effect on it would read a perfect model as "fails". It is kept as a metric
(`robustness`, `glitch_rate`), beside `rule_change_sensitivity`, the share of rule-changing
substitutions after which the model's answer changes (0 for a constant model, 1 for the rule).

Measured on random-init controls (seed 0 unless said): the matrix's transformer (d_model
64, 2 layers) scores 0.00 on facts (seeds 0-2) and 0.60, 0.48, 0.35 on count (seeds 0-2;
sensitivity 0.16, 0.06, 0.35), 0.82 on parity seed 1 with sensitivity 0.00; on count
rwkv 0.82, diffusion, gru and program 1.00, each with sensitivity 0.00 and
sensitive_robustness 0.00: those controls answer one token whatever the input. The same
transformer trained 300 steps scores 1.00 on facts and count (sensitivity 1.00). So a
control's score is a floor to read the trained score against, and a high one is a
near-constant model (its sensitivity says so), not a model that follows the rule.

Details: one row per input position {position, glitch_rate (share of the single
substitutions tried at that position that flipped the answer; None where none was tried),
n_tried, relevant (the position is relevant in every test example, so it is never edited),
relevant_share}. `report_tables` (`techniques/glitch_tables.py`) compares these rates with
the per-position weight that attribution and patching give the same positions.

What it cannot detect. Glitches that need an edit at a relevant position (a model wrong on
rare relevant tokens), more than two edits, or a substitution beyond the budget; inputs off
the task's distribution (they are never tried: before `in_distribution` filtered them, recall
edits that repeated a key made trained organisms that pass the gate "glitch" at rates of
0.46-0.73, off the task rather than against its rule); edits that insert or delete tokens. A task with no
irrelevant position whose token varies (modadd: only a and b vary, both relevant; the `=`
is constant) is not applicable.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import answer_prediction


def position_tokens(task, tokens: torch.Tensor, n_vocab: int, seed: int) -> list[torch.Tensor]:
    """The tokens the task puts at each input position: sorted (V_p,) per position, from a
    train-split sample of `n_vocab` sequences and `tokens` (n, T)."""
    seen = torch.cat([task.sample(n_vocab, seed, "train").tokens, tokens]) if n_vocab else tokens  # (N, T)
    return [torch.unique(seen[:, p]) for p in range(tokens.shape[1])]


def rule_keeps(task, edited: torch.Tensor, answer: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the rule gives `edited` (N, T) the answer `answer` (N,) and the relevance
    mask `relevant` (N, T). A sequence the rule refuses (it raises) is False; a batch that
    raises is split in halves until the refused rows are isolated."""
    if len(edited) == 0:
        return torch.zeros(0, dtype=torch.bool)
    try:
        return ((task.rule(edited) == answer) & (task.relevance(edited) == relevant).all(1)
                & task.in_distribution(edited))  # (N,)
    except (ValueError, IndexError, KeyError):
        if len(edited) == 1:
            return torch.zeros(1, dtype=torch.bool)
        h = len(edited) // 2
        return torch.cat([rule_keeps(task, edited[:h], answer[:h], relevant[:h]),
                          rule_keeps(task, edited[h:], answer[h:], relevant[h:])])


def rule_changes(task, edited: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the rule parses `edited` (N, T) and gives it an answer other than `answer` (N,)."""
    if len(edited) == 0:
        return torch.zeros(0, dtype=torch.bool)
    try:
        return (task.rule(edited) != answer) & task.in_distribution(edited)  # (N,)
    except (ValueError, IndexError, KeyError):
        if len(edited) == 1:
            return torch.zeros(1, dtype=torch.bool)
        h = len(edited) // 2
        return torch.cat([rule_changes(task, edited[:h], answer[:h]), rule_changes(task, edited[h:], answer[h:])])


def substitutions(tokens: torch.Tensor, allowed: torch.Tensor, pools: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every single substitution of a token by another of its position's pool, at the
    positions `allowed` (n, T) bool: (example, position, new token), each (M,)."""
    rows, cols, new = [], [], []
    for p, pool in enumerate(pools):
        if len(pool) < 2:
            continue
        at = allowed[:, p].nonzero()[:, 0]  # (n_p,) examples that may be edited at p
        if not len(at):
            continue
        cand = pool[None].expand(len(at), -1)  # (n_p, V_p)
        keep = cand != tokens[at, p][:, None]  # (n_p, V_p) a different token
        r, k = keep.nonzero(as_tuple=True)
        rows.append(at[r])
        cols.append(torch.full((len(r),), p))
        new.append(cand[r, k])
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    return torch.cat(rows), torch.cat(cols), torch.cat(new)


def cap_per_example(example: torch.Tensor, limit: int, rng: np.random.Generator) -> torch.Tensor:
    """Indices into `example` (M,) keeping every row of an example with at most `limit` rows,
    else a random `limit` of them; sorted."""
    keep = []
    for i in torch.unique(example).tolist():
        idx = (example == i).nonzero()[:, 0].numpy()  # rows of example i
        keep.append(idx if len(idx) <= limit else rng.choice(idx, limit, replace=False))
    return torch.as_tensor(np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64))


def pair_sample(positions: torch.Tensor, limit: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Pairs (a, b), a < b, of indices into `positions` (m,) at two distinct positions: all of
    them if there are at most `limit`, else `limit` distinct pairs drawn at random."""
    m = len(positions)
    if m * (m - 1) // 2 <= 4 * limit:  # few enough to list
        pairs = [(a, b) for a, b in combinations(range(m), 2) if int(positions[a]) != int(positions[b])]
        if len(pairs) <= limit:
            return pairs
        return [pairs[k] for k in sorted(rng.choice(len(pairs), limit, replace=False))]
    chosen: set[tuple[int, int]] = set()
    for _ in range(50 * limit):  # rejection sampling; many pairs exist, so it ends early
        if len(chosen) == limit:
            break
        a, b = sorted(rng.choice(m, 2, replace=False).tolist())
        if int(positions[a]) != int(positions[b]):
            chosen.add((a, b))
    return sorted(chosen)


class Glitch(Technique):
    name = "glitch"
    version = 2  # 2: edits that leave the task's distribution are not tried
    control_floor = ("a random-init model that reads only some of the input can ignore the irrelevant "
                     "positions and still follow one relevant token (count's `a` tokens move any model "
                     "that mixes embeddings), so it scores above 0 on the examples it gets right by luck.")
    # behaviour only: every family's logits at the last position suffice
    roles = frozenset()
    # n_vocab: train sequences whose tokens make each position's pool; n_candidates: the
    # substitutions drawn per example before the rule checks them (bounds the rule's work
    # on natural-text tasks, whose pools are large); max_rows: sequences per forward
    default_config = {"n_examples": 128, "max_singles": 64, "max_pairs": 64, "n_vocab": 512,
                      "n_candidates": 512, "max_rows": 4096}
    # a checkpoint's row: each edit is a forward of the whole model
    checkpoint_config = {"n_examples": 32, "max_singles": 16, "max_pairs": 16, "n_candidates": 128,
                         "max_rows": 256}

    @classmethod
    def report_tables(cls, cells, reference: str) -> list:
        """Glitch rate against mechanism-level position importance, and glitch rate per
        family (`techniques/glitch_tables.py`)."""
        from archbench.techniques.glitch_tables import glitch_tables

        return glitch_tables(cells, reference)

    def _predict(self, adapter, task, tokens: torch.Tensor) -> torch.Tensor:
        """The model's answer per sequence: (N, T) -> (N,), in chunks of `max_rows`."""
        out = [answer_prediction(adapter.run(tokens[s:s + self.config["max_rows"]]).logits[:, -1], task)
               for s in range(0, len(tokens), self.config["max_rows"])]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        ex = task.sample(cfg["n_examples"], seed, "test")
        tokens, answer, relevant = ex.tokens, ex.answer, ex.relevant  # (n, T), (n,), (n, T)
        n, T = tokens.shape
        pools = position_tokens(task, tokens, cfg["n_vocab"], seed)  # T pools (V_p,)
        varying = torch.tensor([len(pool) > 1 for pool in pools])  # (T,)
        if not bool((~relevant & varying[None]).any()):
            return Result.not_applicable(f"{task.name}: no irrelevant position whose token varies "
                                         "(only the relevant positions change between examples)")
        rng = np.random.default_rng([seed, 11])
        pred = self._predict(adapter, task, tokens)  # (n,)
        correct = pred == answer  # (n,)
        if not bool(correct.any()):
            return Result.not_applicable(f"{adapter.family} answers no test example correctly: nothing to glitch")

        # valid single substitutions at irrelevant positions of correctly answered examples
        row, pos, new = substitutions(tokens, ~relevant & correct[:, None], pools)  # (M,) each
        draw = cap_per_example(row, cfg["n_candidates"], rng)
        row, pos, new = row[draw], pos[draw], new[draw]
        edited = tokens[row].clone()  # (M, T)
        edited[torch.arange(len(row)), pos] = new
        valid = rule_keeps(task, edited, answer[row], relevant[row])  # (M,)
        row, pos, new, edited = row[valid], pos[valid], new[valid], edited[valid]
        tried = cap_per_example(row, cfg["max_singles"], rng)
        t_row, t_pos, t_edit = row[tried], pos[tried], edited[tried]
        flipped = self._predict(adapter, task, t_edit) != pred[t_row]  # (S,) a single glitch

        scored = sorted(set(row.tolist()))  # correct examples with at least one valid edit
        if not scored:
            return Result.not_applicable(f"{task.name}: no correctly answered example has an edit at an "
                                         "irrelevant position that keeps the rule's answer")
        single = set(t_row[flipped].tolist())
        min_edits: dict[int, int] = {i: 1 for i in single}

        # pairs, for the examples no single substitution glitched
        pair_edits, pair_rows = [], []
        for i in scored:
            if i in single:
                continue
            mine = (row == i).nonzero()[:, 0]  # this example's valid single substitutions
            for a, b in pair_sample(pos[mine], cfg["max_pairs"], rng):
                a, b = int(mine[a]), int(mine[b])
                both = edited[a].clone()  # (T,)
                both[pos[b]] = new[b]
                pair_edits.append(both)
                pair_rows.append(i)
        n_pairs_tried = 0
        if pair_edits:
            p_edit, p_row = torch.stack(pair_edits), torch.tensor(pair_rows)  # (Q, T), (Q,)
            ok = rule_keeps(task, p_edit, answer[p_row], relevant[p_row])  # (Q,)
            p_edit, p_row = p_edit[ok], p_row[ok]
            n_pairs_tried = len(p_row)
            p_flip = self._predict(adapter, task, p_edit) != pred[p_row]  # (Q',)
            for i in set(p_row[p_flip].tolist()):
                min_edits[i] = 2

        # sensitivity: single substitutions anywhere that change the rule's answer
        c_row, c_pos, c_new = substitutions(tokens, correct[:, None].expand(n, T), pools)
        draw = cap_per_example(c_row, cfg["n_candidates"], rng)
        c_row, c_pos, c_new = c_row[draw], c_pos[draw], c_new[draw]
        changed = tokens[c_row].clone()  # (M', T)
        changed[torch.arange(len(c_row)), c_pos] = c_new
        moves = rule_changes(task, changed, answer[c_row])  # (M',)
        c_row, changed = c_row[moves], changed[moves]
        keep = cap_per_example(c_row, cfg["max_singles"], rng)
        follows = self._predict(adapter, task, changed[keep]) != pred[c_row[keep]]  # (K,)
        sensitive = set(c_row[keep][follows].tolist())  # examples whose answer some rule change moves

        details = []
        rel_share = relevant.float().mean(0)  # (T,)
        for p in range(T):
            at = t_pos == p
            k = int(at.sum())
            details.append({"position": p, "glitch_rate": float(flipped[at].float().mean()) if k else None,
                            "n_tried": k, "relevant": bool(relevant[:, p].all()),
                            "relevant_share": float(rel_share[p])})
        glitched = [1.0 if i in min_edits else 0.0 for i in scored]
        # robust by the rule: no irrelevant edit glitched it, and a rule-changing edit moves it
        per_example = [1.0 if i not in min_edits and i in sensitive else 0.0 for i in scored]
        found = [min_edits[i] for i in scored if i in min_edits]
        metrics = {"glitch_rate": float(np.mean(glitched)), "robustness": 1.0 - float(np.mean(glitched)),
                   "n_examples_scored": len(scored),
                   "n_examples_correct": int(correct.sum()), "edits_tried": int(len(t_row)) + n_pairs_tried,
                   "singles_tried": int(len(t_row)), "pairs_tried": n_pairs_tried,
                   "mean_min_edits": float(np.mean(found)) if found else None,
                   "min_edits": [min_edits.get(i) for i in scored],
                   "rule_change_sensitivity": float(follows.float().mean()) if len(follows) else None,
                   "edited_positions": [d["position"] for d in details if d["n_tried"]]}
        return Result.from_per_example(per_example, metrics=metrics, details=details)
