"""Linear probing: is the task's primary latent linearly decodable, and at what depth?

A multinomial logistic-regression probe (Alain & Bengio 2016, "Understanding intermediate
layers using linear classifier probes"; Belinkov 2022, "Probing classifiers: promises,
shortcomings, and advances") is fitted on the activations of every `embed`, `stream` and
`state` hook point, read at the answer position (`adapter.answer_position`) when the latent is per example, or at
every position when it is per position. Features are flattened and standardised; the probe
is fitted in torch with full-batch L-BFGS and a small L2 penalty, all sites of one feature
width at once.

Scoring: held-out accuracy a on the test split, normalised against the majority-class
baseline b (the most frequent train label, scored on the test labels): (a - b) / (1 - b).
The score is the best site's normalised accuracy, and `per_example` holds
(correct_i - b) / (1 - b) for that site, so its mean is the score before clipping.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.nn import functional as F

from archbench.technique import Result, Technique

SITE_ROLES = ("embed", "stream", "state")


def _features(act: torch.Tensor, latent: torch.Tensor, position: int) -> torch.Tensor:
    """(n, T, *features) -> (rows, F): one row per example, or per (example, position)."""
    if latent.dim() == 1:
        return act[:, position].flatten(1).float()  # (n, F)
    return act[:, :latent.shape[1]].flatten(2).flatten(0, 1).float()  # (n*T, F): input positions


def _fit_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 n_classes: int, steps: int, l2: float) -> torch.Tensor:
    """Fit S independent probes at once: x_train (S, N, F), x_test (S, M, F) -> (S, M) labels."""
    # Standardise in float64: recurrent states can hold huge sentinels (RWKV's running max
    # starts near -1e38), whose float32 sums overflow to inf.
    x_train, x_test = x_train.double(), x_test.double()
    mean = x_train.mean(1, keepdim=True)  # (S, 1, F)
    std = x_train.std(1, keepdim=True)  # (S, 1, F)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features stay ~0
    x_train = ((x_train - mean) / std).float()  # (S, N, F)
    x_test = ((x_test - mean) / std).float().nan_to_num(0.0, 0.0, 0.0)  # (S, M, F)
    n_sites, n_rows, n_feat = x_train.shape
    w = torch.zeros(n_sites, n_feat, n_classes, requires_grad=True)  # (S, F, C)
    b = torch.zeros(n_sites, 1, n_classes, requires_grad=True)  # (S, 1, C)
    target = y_train.repeat(n_sites)  # (S*N,)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.baddbmm(b, x_train, w)  # (S, N, C)
        # the sum over sites of each site's mean cross-entropy plus its L2 penalty
        loss = F.cross_entropy(logits.reshape(-1, n_classes), target) * n_sites + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return torch.baddbmm(b, x_test, w).argmax(-1)  # (S, M)


class Probe(Technique):
    name = "probe"
    representation = True
    roles = frozenset({"stream", "state"})
    default_config = {"n_train": 1024, "n_test": 512, "steps": 100, "l2": 1e-3}

    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        train = task.sample(cfg["n_train"], seed, "train")
        test = task.sample(cfg["n_test"], seed, "test")
        names = adapter.names(list(SITE_ROLES))
        acts_train = adapter.run(train.tokens, cache=names).cache  # name -> (n_train, T, *f)
        acts_test = adapter.run(test.tokens, cache=names).cache  # name -> (n_test, T, *f)

        y_train_raw = train.latents[task.primary].reshape(-1).long()  # (N,)
        y_test_raw = test.latents[task.primary].reshape(-1).long()  # (M,)
        classes = torch.unique(y_train_raw)  # (C,) sorted
        y_train = torch.searchsorted(classes, y_train_raw)  # (N,) in [0, C)
        slot = torch.searchsorted(classes, y_test_raw).clamp_max(len(classes) - 1)  # (M,)
        y_test = torch.where(classes[slot] == y_test_raw, slot, -1)  # (M,) -1: unseen, always wrong
        majority = int(torch.bincount(y_train, minlength=len(classes)).argmax())
        baseline = float((y_test == majority).float().mean())
        denom = max(1.0 - baseline, 1e-9)

        # Group sites by feature width so that each group is one batched fit.
        pos = adapter.answer_position(task.seq_len)  # where per-example latents are read
        groups: dict[int, list[str]] = defaultdict(list)
        x_tr, x_te = {}, {}
        for name in names:
            x_tr[name] = _features(acts_train[name], train.latents[task.primary], pos)  # (N, F)
            x_te[name] = _features(acts_test[name], test.latents[task.primary], pos)  # (M, F)
            groups[x_tr[name].shape[1]].append(name)
        correct = {}
        for group in groups.values():
            pred = _fit_predict(torch.stack([x_tr[n] for n in group]), y_train,
                                torch.stack([x_te[n] for n in group]),
                                len(classes), cfg["steps"], cfg["l2"])  # (S, M)
            for name, p in zip(group, pred):
                correct[name] = (p == y_test).float()  # (M,)

        details = []
        for name in names:
            spec = adapter.specs[name]
            acc = float(correct[name].mean())
            details.append({"site": name, "role": spec.role, "layer": spec.layer,
                            "accuracy": acc, "normalised": (acc - baseline) / denom})
        best = max(details, key=lambda d: d["normalised"])
        per_example = correct[best["site"]].view(len(test), -1).mean(1)  # (n_test,) over positions
        return Result.from_per_example(
            ((per_example - baseline) / denom).tolist(), details=details,
            metrics={"best_site": best["site"], "best_layer": best["layer"],
                     "majority_baseline": baseline, "accuracy": best["accuracy"],
                     "n_classes": len(classes)})
