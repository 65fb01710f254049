"""Causal tracing: which hidden states at the subject's tokens carry a fact to the answer?

After Meng et al. 2022 ("Locating and editing factual associations in GPT", NeurIPS 2022,
section 2.1; ROME), as Sen Sharma et al. 2024 ("Locating and editing factual associations in
Mamba", COLM 2024) ran it on Mamba. Three runs per test example of a task that names its
subject positions (`task.subject_positions`: facts, facts_long):
- the clean run;
- the corrupted run: Gaussian noise added to the input representation (the `embed` hook
  point, through an intervention) at the subject positions only, with standard deviation
  `noise_scale` (3, Meng's choice) times the empirical standard deviation of the embeddings
  at the subject positions of the traced examples (ROME's `collect_embedding_std` over its
  subjects: one scalar over every token and feature); `n_noise` (10) noise samples per example;
- restored runs: the corrupted run (the same noise samples) with ONE (site, position) set to
  its clean value, for every `stream` hook point (the hidden state after each block, the
  role Meng restores) and every activation position up to the answer's.
P(correct) is the probability of the clean answer token under a softmax over the task's
answer tokens only (the answer decides among them, `answer_prediction`), at the last position.
Per example and cell, the indirect effect IE = mean over noise samples of P_restored(correct)
minus that of P_corrupted(correct); the total effect TE = P_clean - mean P_corrupted.

Examples counted: those the model answers correctly clean (its top answer token is the task's
answer) and whose corruption drops P(correct) by at least `min_total_effect` (0.1): TE >= 0.1.
The others are dropped (their counts are in `metrics`); with none left the score is 0 with a
0 per example (`nothing_to_trace`), as a model that answers nothing right has nothing to trace.

Score: each kept example's IE is normalised by its TE (1: the restored state alone recovers
the clean probability; it may exceed 1 or fall below 0). The score is the mean over examples
of that normalised IE at the best cell (highest mean) among the stream sites at the SUBJECT
positions; `per_example` is that cell's normalised IE per example, so its mean is the score
before clipping. The embedding is reported but never scored (`trivial`): the noise is added
there, so restoring it at the subject positions undoes the corruption by construction; the
deepest stream site at the answer position is the readout's own input (IE = TE there for every
causal family) and is marked trivial too (it is no subject position in any case).
Chance level (score 0): restoring any single non-trivial state at a subject position recovers
nothing of the effect, as in a model where no one state at the subject holds what the answer
needs (one that reads the subject straight into the last position before the first stream
site). 1: one state at one subject position recovers the whole effect. A random-init control
is not at 0 by construction (`control_floor`): a recurrence folds the earlier subject tokens
into the last subject token's state whether or not it was trained.

Metrics for a findings table ("recall peaks at the last subject token in middle layers"):
the IE grid as `details` rows {site, role, layer (HookSpec depth: 0 embedding, i after block i),
position, position_kind ('subject_first', 'subject_middle', 'subject_last', 'context',
'last_token': the answer position), ie (mean normalised IE), ie_raw (mean IE), subject_ie (ie
at a scored subject cell, else None: what the depth figure draws), trivial}; `peak_subject_layer`,
`peak_subject_site`, `peak_subject_position`, `peak_subject_position_kind`, `peak_subject_ie`;
`last_subject_vs_other_subject` (best IE at the last subject token minus best IE at the other
subject tokens); `last_token_peak_layer` and `last_token_peak_ie` (the best non-trivial stream
cell at the answer position); `n_layers` (stream sites) and `early_site_fraction` (the peak's
depth among the stream sites: 0 at the first block's output, 1 at the last, i.e. block index /
(n_layers - 1)); `ie_by_layer_kind` ({layer, position_kind, ie}: the best ie over the positions
of each kind, context having several); the noise std, mean P_clean, P_corrupted and TE.

What it cannot detect: a fact spread over several subject positions or states (one state is
restored at a time: if the subject is resolved only jointly, every cell scores low); which
component of a block (MLP or mixer: Meng's severed-path variants are not run) does the work;
whether the restored state *encodes* the fact or only something that lets later blocks
recompute it from the clean state (a shallow state at the last subject token whose block has
read every subject token recovers as much as a state holding the attribute). The best cell
is chosen on the same examples it is scored on (max over 2-3 subject positions x stream
sites), a small upward bias at chance. Each site costs one batched forward per chunk of
positions: positions and noise samples are stacked with a per-row restore mask.
"""

from __future__ import annotations

import torch

from archbench.hooks import Patch
from archbench.technique import Result, Technique
from archbench.technique_helpers import class_index, deepest_site

KINDS = ("subject_first", "subject_middle", "subject_last", "context", "last_token")


def position_kinds(subject_positions: list[int], answer_position: int, n_positions: int) -> list[str]:
    """The kind of each activation position 0..n_positions-1 (one of KINDS)."""
    kinds = []
    for p in range(n_positions):
        if p in subject_positions:
            kinds.append("subject_last" if p == max(subject_positions)
                         else "subject_first" if p == min(subject_positions) else "subject_middle")
        else:
            kinds.append("last_token" if p == answer_position else "context")
    return kinds


class CausalTracing(Technique):
    name = "causal_tracing"
    roles = frozenset({"stream"})
    control_floor = ("a random-init model answers few examples right and its P(correct) barely moves under the "
                     "noise, so few pass the total-effect rule (none on a random transformer); but a recurrence "
                     "mixes every earlier token into the last subject token's state by construction, so on the "
                     "3-7 of 128 examples a random-init 4-block Mamba passes, restoring that one state recovers "
                     "much of the effect (facts_long: 0.31, 0.74 and 0.40 on seeds 0-2).")
    default_config = {"n_examples": 128, "n_noise": 10, "noise_scale": 3.0, "min_total_effect": 0.1,
                      "max_rows": 8192}
    depth_value = "subject_ie"

    def why_not(self, adapter, task) -> str | None:
        reason = super().why_not(adapter, task)
        if reason:
            return reason
        if not getattr(task, "subject_positions", None):
            return f"{task.name} names no subject positions (causal tracing corrupts the subject's tokens)"
        if not adapter.names("embed"):
            return f"{adapter.family} has no embed hook point to add the noise to"
        return None

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        subject = sorted(task.subject_positions)
        ex = task.sample(cfg["n_examples"], seed, "test")
        tokens = ex.tokens  # (n, T)
        embed = adapter.names("embed")[0]
        streams = adapter.names("stream")
        clean = adapter.run(tokens, cache=[embed, *streams])
        emb = clean.cache[embed]  # (n, L_e, *f)
        T = adapter.answer_position(tokens.shape[1]) + 1  # activation positions up to the answer's
        if emb.shape[1] < tokens.shape[1] or not emb.is_floating_point():
            return Result.not_applicable(f"{adapter.family}: the embed site holds no float per-position "
                                         "input representation to add noise to")
        answers = task.answer_tokens()  # (C,)
        target = class_index(ex.answer, answers)  # (n,) index of the clean answer among the answer tokens

        def p_correct(logits: torch.Tensor, rows_target: torch.Tensor) -> torch.Tensor:
            probs = logits[:, -1, answers].float().softmax(-1)  # (rows, C)
            return probs.gather(1, rows_target[:, None])[:, 0]  # (rows,)

        p_clean = p_correct(clean.logits, target)  # (n,)
        noise_std = cfg["noise_scale"] * float(emb[:, subject].float().std())
        K = cfg["n_noise"]
        gen = torch.Generator().manual_seed(seed)
        noise = torch.zeros(len(tokens), K, *emb.shape[1:])  # (n, K, L_e, *f)
        noise[:, :, subject] = noise_std * torch.randn(len(tokens), K, len(subject), *emb.shape[2:], generator=gen)

        def corrupted_runs(rows_tokens, rows_noise, rows_target, site=None, source=None, mask=None):
            """P(correct) of corrupted runs, with `site` restored to `source` where `mask` (rows, L)."""
            ivs = {embed: lambda act, spec: act + rows_noise.to(act)}
            if site is not None:
                ivs[site] = Patch(source, positions=mask)
            return p_correct(adapter.run(rows_tokens, interventions=ivs).logits, rows_target)  # (rows,)

        p_corr = corrupted_runs(tokens.repeat_interleave(K, 0), noise.flatten(0, 1),
                                target.repeat_interleave(K)).view(-1, K)  # (n, K)
        total = p_clean - p_corr.mean(1)  # (n,) TE
        correct = clean.logits[:, -1, answers].argmax(-1) == target  # (n,) the top answer token is the clean answer
        keep = correct & (total >= cfg["min_total_effect"]) & (total > 0)  # (n,) TE > 0: it normalises
        n_streams = len(streams)
        counts = {"n_examples": len(tokens), "n_examples_used": int(keep.sum()),
                  "n_dropped_wrong": int((~correct).sum()),
                  "n_dropped_no_effect": int((correct & ~keep).sum()),
                  "noise_std": noise_std, "n_noise": K, "n_layers": n_streams,
                  "p_clean": float(p_clean[keep].mean()) if keep.any() else None,
                  "p_corrupted": float(p_corr[keep].mean()) if keep.any() else None,
                  "total_effect": float(total[keep].mean()) if keep.any() else None}
        empty = {"peak_subject_layer": None, "peak_subject_site": None, "peak_subject_position": None,
                 "peak_subject_position_kind": None, "peak_subject_ie": None,
                 "last_subject_vs_other_subject": None, "last_token_peak_layer": None,
                 "last_token_peak_ie": None, "early_site_fraction": None, "ie_by_layer_kind": []}
        if not bool(keep.any()):
            return Result.from_per_example([0.0] * len(tokens), metrics={**counts, **empty, "nothing_to_trace": True})

        m = int(keep.sum())
        tok_k, noise_k = tokens[keep], noise[keep]  # (m, T), (m, K, L_e, *f)
        base_p = p_corr[keep].mean(1)  # (m,)
        te = total[keep]  # (m,)
        kinds = position_kinds(subject, T - 1, T)
        deepest = deepest_site(adapter, streams) if streams else None
        chunk = max(1, cfg["max_rows"] // (m * K))  # positions per forward
        ie = {}  # name -> (T, m) raw IE per position and example
        for name in [embed, *streams]:
            act = clean.cache[name][keep]  # (m, L, *f)
            L = act.shape[1]
            rows = []
            for start in range(0, T, chunk):
                ps = list(range(start, min(T, start + chunk)))
                P = len(ps)
                rows_tokens = tok_k.repeat_interleave(K, 0).repeat(P, 1)  # (P*m*K, T)
                rows_target = target[keep].repeat_interleave(K).repeat(P)  # (P*m*K,)
                rows_noise = noise_k.flatten(0, 1).repeat(P, *([1] * (noise_k.dim() - 2)))  # (P*m*K, L_e, *f)
                if name == embed:  # restoring the embedding at p = no noise at p
                    rows_noise = rows_noise.view(P, m * K, *noise_k.shape[2:]).clone()
                    rows_noise[torch.arange(P), :, torch.tensor(ps)] = 0.0
                    p_rest = corrupted_runs(rows_tokens, rows_noise.flatten(0, 1), rows_target)
                else:
                    mask = torch.zeros(P, m * K, L, dtype=torch.bool)  # (P, m*K, L) restore mask per row
                    mask[torch.arange(P), :, torch.tensor(ps)] = True
                    source = act.repeat_interleave(K, 0).repeat(P, *([1] * (act.dim() - 1)))  # (P*m*K, L, *f)
                    p_rest = corrupted_runs(rows_tokens, rows_noise, rows_target, name, source, mask.flatten(0, 1))
                rows.append(p_rest.view(P, m, K).mean(2) - base_p)  # (P, m) IE
            ie[name] = torch.cat(rows)  # (T, m)

        details = []
        for name in [embed, *streams]:
            spec = adapter.specs[name]
            for p in range(T):
                why = ("input embedding" if name == embed
                       else "readout input" if name == deepest and p == T - 1 else "")
                value = float((ie[name][p] / te).mean())
                details.append({"site": name, "role": spec.role, "layer": spec.layer, "position": p,
                                "position_kind": kinds[p], "ie": value, "ie_raw": float(ie[name][p].mean()),
                                "subject_ie": value if p in subject and not why else None,
                                "trivial": bool(why), "trivial_reason": why})
        scored = [d for d in details if d["subject_ie"] is not None]
        if not scored:
            return Result.not_applicable(f"{adapter.family} has no stream site to restore")
        best = max(scored, key=lambda d: d["ie"])  # first of ties: shallowest, earliest position
        per_example = ie[best["site"]][best["position"]] / te  # (m,)
        last_subject = max(d["ie"] for d in scored if d["position_kind"] == "subject_last")
        others = [d["ie"] for d in scored if d["position_kind"] != "subject_last"]
        at_last = [d for d in details if d["position_kind"] == "last_token" and d["role"] == "stream"
                   and not d["trivial"]]
        last_peak = max(at_last, key=lambda d: d["ie"]) if at_last else None
        grid = {}
        for d in details:
            if not d["trivial"] and d["role"] == "stream":
                key = (d["layer"], d["position_kind"])
                grid[key] = max(grid.get(key, float("-inf")), d["ie"])
        depth = streams.index(best["site"])
        metrics = {**counts,
                   "peak_subject_layer": best["layer"], "peak_subject_site": best["site"],
                   "peak_subject_position": best["position"], "peak_subject_position_kind": best["position_kind"],
                   "peak_subject_ie": best["ie"],
                   "last_subject_vs_other_subject": last_subject - max(others) if others else None,
                   "last_token_peak_layer": last_peak["layer"] if last_peak else None,
                   "last_token_peak_ie": last_peak["ie"] if last_peak else None,
                   "early_site_fraction": depth / (n_streams - 1) if n_streams > 1 else None,
                   "ie_by_layer_kind": [{"layer": layer, "position_kind": kind, "ie": value}
                                        for (layer, kind), value in sorted(grid.items(), key=lambda kv: (
                                            kv[0][0], KINDS.index(kv[0][1])))]}
        return Result.from_per_example(per_example.numpy(), details=details, metrics=metrics)
