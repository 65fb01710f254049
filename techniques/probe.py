"""Linear probing with a control task: is the primary latent decodable *selectively*?

What it measures. A ridge-regularised linear classifier (Alain & Bengio 2016,
"Understanding intermediate layers using linear classifier probes"; Belinkov 2022, "Probing
classifiers: promises, shortcomings, and advances") is fitted at every representation site
(`stream` and `state` hook points minus the raw embedding and the deepest `stream` site, the
readout's input: `representation_sites`), read at the answer position
(`adapter.answer_position`) for a per-example latent, or at every input position for a
per-position latent. The same probe, at the same site and penalty, is also fitted on a
Hewitt–Liang control task (Hewitt & Liang 2019, "Designing and interpreting probes with
control tasks"): labels that are a fixed random function of the input tokens that define the
variable. The score is *selectivity*: normalised accuracy on the real variable minus
normalised accuracy on the control labels, at the best site.

The probe. Features are standardised (float64: RWKV states hold -1e38 sentinels), projected
onto principal components when wider than `width` (`Projection`, recorded in
`metrics["projection"]`: the principal components of `width` seeded train rows; exact, the
same ridge fit as at full width, whenever the train rows number at most `width`), and
fitted in closed form as a one-hot least-squares (ridge) classifier for each penalty of `ridges` (relative to the train rows'
total feature variance), all targets of one site sharing one eigendecomposition. Per site,
the penalty is the largest whose validation accuracy on the real variable
(`task.sample(n_val, seed, "val")`) is within `tolerance` of the best (capacity is bounded
by preferring the stronger penalty when it costs nothing; the control labels never choose
it), and the control probe uses that same penalty. As Hewitt & Liang found, the strong end
of the grid is what makes a probe selective: on a trained 2-layer transformer on facts the
grid up to 1 gave selectivity 0.03 (the control decoded at 0.97), up to 10 it gives 0.75
(variable 1.00, control 0.25) against 0.04 on the random-init control. The grid stops at 10:
at 100 the shrunk scores of a balanced task fall below the train split's class imbalance,
so decisions follow the intercept and the penalty's choice turns on sampling luck. The
scored site is the one with the highest validation selectivity; the reported numbers are
on the test split, which neither choice saw.

Projection and cost, measured on random-init Mamba states (2048 features): on parity
(1024 train rows) the score is identical at width 256 and at full width (0.126 both; 5.6 s
against 14.9 s per cell); on count's per-position rows (2 state sites of 9216 x 2048) it
moves by 0.005 (0.153 against 0.149; one site's value moves by 0.05, not the best one's),
the cell takes 16.5 s against 52.7 s, and the fits alone 6.4 s against 27 s (102 s for the
former L-BFGS logistic probe; all timings on a shared 2-core machine). The least-squares classifier is weaker than logistic
regression in raw accuracy on such states (count: 0.79 against 0.88 at full width), which
the control task shares.

The control labels. Each row's key is the input with every position that is not relevant
(`examples.relevant`) masked out, positions included (for a per-position latent at position
t, only relevant positions <= t). Every distinct key gets a class per control map: the keys
holding one value of the real variable are dealt the C classes round-robin in a seeded
random order (`control_labels`), so a control task has the variable's number of classes and
is a fixed random function of the relevant inputs that the variable itself does not predict
(a plain random map of few keys, such as parity's 8, would often agree with the variable by
chance). The control term is the mean over `n_controls` maps. The maps depend on the seed and
the sampled keys only, so the trained organism and its random-init control share them.

Scoring and chance. Normalised accuracy is (a - b) / (1 - b) with b the test share of the
most frequent train label (a test label the train split never shows counts as wrong); it is
0 at chance for either task. Selectivity is 0 in expectation for a representation that
carries nothing about the input, and near 0 for one that makes *every* function of the
relevant inputs linearly decodable (a lookup table; random high-dimensional features): the
probe then decodes the control about as well as the variable (a random-init Mamba's
layer-0 state on parity: variable 1.00, control 0.87, selectivity 0.13, where the former
probe scored 1.00). It is high only where the variable is decodable and an arbitrary
function of the same inputs is not.
`per_example` holds, per test example, (correct - b) / (1 - b) on the real variable minus
the mean over control maps of the same quantity (averaged over positions for a per-position
latent); its mean is the score before clipping to [0, 1]. Metrics also report the real
variable's normalised accuracy alone (`normalised_accuracy`) and the control's.

What it cannot detect. A variable held nonlinearly (the probe is linear), or only at the
excluded sites (the embedding, the readout's input): those cells score 0. Where the relevant
tokens determine the whole varying input (modadd: a and b), no test input shares its key
with a train input, so the control cannot be memorised, sits at chance, and selectivity
equals normalised accuracy. When the distinct keys of the train split number no more
than the site's width (facts: 32 subject-relation keys), any labelling of them is linearly
separable, so a weakly penalised probe decodes the control perfectly; only the penalty
keeps selectivity informative there (`metrics["control_keys"]` reports the count).
Selectivity is not causal use (patching asks that). With few
keys (parity's 8) a control map can equal a simpler function of the inputs (one input bit,
linearly decodable where the variable is not), which lowers selectivity, even below 0 at a
site; `n_controls` maps average that out, and the trained - control effect cancels what
the two share.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import (REPRESENTATION_ROLES, class_index, no_representation_site,
                                         representation_names, representation_sites)


def _features(act: torch.Tensor, latent: torch.Tensor, position: int) -> torch.Tensor:
    """(n, T, *features) -> (rows, F): one row per example, or per (example, position)."""
    if latent.dim() == 1:
        return act[:, position].flatten(1)  # (n, F)
    return act[:, :latent.shape[1]].flatten(2).flatten(0, 1)  # (n*T, F): input positions


class Projection:
    """Standardise, then (when wider than `width`) project onto principal components.

    Fitted on train rows: per-feature mean and std (float64; constant features stay 0). A
    site wider than `width` is projected onto the principal components of at most `width`
    train rows (a seeded subsample when there are more; `fit_rows`, default `width`), the
    top `width` of them, computed exactly from their (rows x rows) Gram. When all train rows
    fit and no component is dropped (`exact`), the basis spans the train rows,
    and a ridge fit in it equals the full-width ridge fit on every input (its weights lie in
    that span); with more rows it is the top-`width` PCA of the subsample. Apply with
    `__call__` to rows of the same site: (N, F) -> (N, out_width) float64.
    """

    def __init__(self, x: torch.Tensor, width: int | None, seed: int, standardise: bool = True,
                 fit_rows: int | None = None):
        x = x.double()
        self.mean = x.mean(0)  # (F,)
        std = x.std(0) if standardise and len(x) > 1 else torch.ones_like(self.mean)
        self.std = torch.where(std > 1e-6, std, torch.ones_like(std))  # (F,)
        self.in_width, self.basis, self.fit_rows, dropped = x.shape[1], None, len(x), False
        z = ((x - self.mean) / self.std).nan_to_num(0.0, 0.0, 0.0)  # (N, F)
        # the penalty scale: the mean per-feature variance of the full-width train rows
        self.feature_var = float(z.pow(2).sum() / (len(z) * max(z.shape[1], 1)))
        if width is not None and x.shape[1] > width:
            fit_rows = width if fit_rows is None else fit_rows
            if len(z) > fit_rows:
                gen = torch.Generator().manual_seed(seed)
                z = z[torch.randperm(len(z), generator=gen)[:fit_rows]]  # (fit_rows, F)
            zc = z - z.mean(0)
            s, u = torch.linalg.eigh(zc @ zc.T)  # (r,), (r, r) ascending
            keep = s > s.max().clamp_min(1e-30) * 1e-10
            dropped = int(keep.sum()) > width
            s, u = s[keep].flip(0)[:width], u[:, keep].flip(1)[:, :width]  # descending, nonzero
            self.basis = zc.T @ u / s.sqrt()  # (F, r) orthonormal principal directions
            self.fit_rows = len(z)
        self.exact = self.basis is None or (self.fit_rows == len(x) and not dropped)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x.double() - self.mean) / self.std).nan_to_num(0.0, 0.0, 0.0)  # (N, F)
        return z if self.basis is None else z @ self.basis  # (N, out_width)

    def inverse(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Put projected rows z back into x's features, keeping x outside the basis: (N, F)."""
        zx = ((x.double() - self.mean) / self.std).nan_to_num(0.0, 0.0, 0.0)  # (N, F)
        full = z if self.basis is None else zx - (zx @ self.basis) @ self.basis.T + z @ self.basis.T
        return full * self.std + self.mean

    def describe(self) -> dict:
        return {"method": "pca" if self.basis is not None else "none", "in_width": self.in_width,
                "out_width": self.in_width if self.basis is None else self.basis.shape[1],
                "fit_rows": self.fit_rows, "exact": self.exact}


def ridge_paths(z_train: torch.Tensor, y_train: torch.Tensor, ridges, *evals: torch.Tensor,
                scale: float | None = None):
    """Closed-form ridge regression for every penalty: -> [[pred (M, K) per eval] per ridge].

    z_train (N, w) float64, y_train (N, K) targets; the intercept is unpenalised (centring).
    Each penalty is lam * scale, scale defaulting to N times the mean feature variance, so
    that a penalty means the same at full width and after a projection that keeps the
    train rows' span (pass the full width's `Projection.feature_var * N`).
    """
    mu, ybar = z_train.mean(0), y_train.mean(0)  # (w,), (K,)
    zc = z_train - mu  # (N, w)
    s, v = torch.linalg.eigh(zc.T @ zc)  # (w,), (w, w)
    s = s.clamp_min(0.0)
    b = v.T @ (zc.T @ (y_train - ybar))  # (w, K)
    if scale is None:
        scale = float(zc.pow(2).sum()) / max(zc.shape[1], 1)
    scale = max(scale, 1e-12)
    evs = [(e - mu) @ v for e in evals]  # (M, w) each, in the eigenbasis
    return [[e @ (b / (s + lam * scale)[:, None]) + ybar for e in evs] for lam in ridges]


def control_keys(examples, latent: torch.Tensor) -> np.ndarray:
    """(rows, T) int64: the input with non-relevant positions masked (-1), one row per probe row.

    For a per-position latent, row (i, t) also masks positions after t (-2): the key is the
    relevant input up to t.
    """
    masked = torch.where(examples.relevant, examples.tokens, -1)  # (n, T)
    if latent.dim() == 1:
        return masked.numpy().astype(np.int64)
    T = latent.shape[1]
    after = torch.arange(masked.shape[1])[None, :] > torch.arange(T)[:, None]  # (T, T_in)
    rows = torch.where(after[None], -2, masked[:, None, :])  # (n, T, T_in)
    return rows.flatten(0, 1).numpy().astype(np.int64)  # (n*T, T_in)


def control_labels(keys: dict[str, np.ndarray], values: dict[str, np.ndarray], n_classes: int,
                   n_maps: int, seed: int) -> dict[str, torch.Tensor]:
    """Control-task labels: split -> (rows, n_maps) class indices in [0, n_classes).

    keys: split -> (rows, T) masked inputs (`control_keys`); values: split -> (rows,) the real
    variable of each row. Every distinct key of all splits gets, per map, a class: the keys
    holding one value of the variable are put in a seeded random order and dealt the classes
    round-robin from a seeded random start, so that every class is (up to rounding) equally
    frequent within every value of the variable. The control is then a fixed random
    function of the relevant inputs that knowing the variable does not predict, even when
    there are few keys. Deterministic in (keys, values, seed).
    """
    splits = list(keys)
    allk = np.concatenate([keys[s] for s in splits])  # (R, T)
    allv = np.concatenate([values[s] for s in splits])  # (R,)
    uniq, first, inverse = np.unique(allk, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    key_value = allv[first]  # (K,) the variable at each key's first row
    salt = np.int64(seed).tobytes()
    label = np.empty((len(uniq), n_maps), dtype=np.int64)  # (K, n_maps)
    for r in range(n_maps):
        tag = salt + np.int64(r).tobytes()
        order = np.array([int.from_bytes(hashlib.blake2b(tag + row.tobytes(), digest_size=8).digest(),
                                         "little") for row in uniq], dtype=np.uint64)  # (K,)
        for v in np.unique(key_value):
            members = np.flatnonzero(key_value == v)
            members = members[np.argsort(order[members], kind="stable")]
            start = int.from_bytes(hashlib.blake2b(tag + np.int64(v).tobytes(), digest_size=8).digest(),
                                   "little") % n_classes
            label[members, r] = (start + np.arange(len(members))) % n_classes
    out, at = {}, 0
    for s in splits:
        out[s] = torch.as_tensor(label[inverse[at:at + len(keys[s])]])
        at += len(keys[s])
    return out


class Probe(Technique):
    name = "probe"
    version = 2
    control_floor = ("a variable that is a sum of token indicators (count) or equals one input token "
                     "(recall's answer) is linear in any state that mixes the token embeddings, as a "
                     "random-init layer does, while an arbitrary function of the same tokens (the control "
                     "task) is not, so selectivity is above 0 before training: a capability present at init.")
    representation = True
    roles = frozenset(REPRESENTATION_ROLES)
    # width: features are projected onto this many principal components when wider;
    # ridges: the penalty grid (relative to the mean Gram eigenvalue), chosen on validation;
    # tolerance: the largest penalty within this of the best validation accuracy is kept;
    # n_controls: independent control-task maps, averaged.
    default_config = {"n_train": 1024, "n_val": 512, "n_test": 512, "width": 256,
                      "ridges": (1e-3, 1e-2, 1e-1, 1.0, 10.0), "tolerance": 0.01, "n_controls": 8}
    checkpoint_config = {"n_train": 512, "n_val": 128, "n_test": 128}  # a checkpoint's row
    depth_value = "selectivity"

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg = self.config
        splits = {s: task.sample(cfg[f"n_{s}"], seed, s) for s in ("train", "val", "test")}
        all_names = representation_names(adapter)
        scored = set(representation_sites(adapter, all_names))
        if not scored:
            return Result.not_applicable(no_representation_site(adapter))
        pos = adapter.answer_position(task.seq_len)
        lat = {s: ex.latents[task.primary] for s, ex in splits.items()}
        classes = torch.unique(lat["train"])  # (C,) sorted
        C, R = len(classes), cfg["n_controls"]
        y = {s: class_index(lat[s].reshape(-1).long(), classes) for s in splits}  # (rows,) each; -1: unseen
        yc = control_labels({s: control_keys(ex, lat[s]) for s, ex in splits.items()},
                            {s: lat[s].reshape(-1).numpy() for s in splits}, C, R, seed)  # (rows, R)
        # one-hot targets: C columns for the variable, then C per control map
        onehot = torch.cat([torch.nn.functional.one_hot(y["train"], C)]
                           + [torch.nn.functional.one_hot(yc["train"][:, r], C) for r in range(R)],
                           1).double()  # (N, C * (1 + R))

        def baseline(labels_train, labels):
            return float((labels == torch.bincount(labels_train.clamp_min(0)).argmax()).double().mean())

        base = {s: [baseline(y["train"], y[s])] + [baseline(yc["train"][:, r], yc[s][:, r])
                                                    for r in range(R)] for s in ("val", "test")}

        def norm_correct(pred, split):
            """(M, C*(1+R)) scores -> (M, 1+R) per-row normalised correctness."""
            out = []
            for j in range(1 + R):
                label = y[split] if j == 0 else yc[split][:, j - 1]
                hit = (pred[:, j * C:(j + 1) * C].argmax(-1) == label).double()
                out.append((hit - base[split][j]) / max(1.0 - base[split][j], 1e-9))
            return torch.stack(out, 1)  # (M, 1 + R)

        names = all_names  # every site is fitted and reported; only `scored` ones can win
        acts = {s: adapter.run(ex.tokens, cache=names).cache for s, ex in splits.items()}
        details, per_site = [], {}
        for name in names:
            feats = {s: _features(acts[s][name], lat[s], pos) for s in splits}  # (rows, F)
            proj = Projection(feats["train"], cfg["width"], seed)
            paths = ridge_paths(proj(feats["train"]), onehot, cfg["ridges"],
                                proj(feats["val"]), proj(feats["test"]),
                                scale=proj.feature_var * len(onehot))
            # the penalty: the largest whose validation accuracy on the real variable is
            # within `tolerance` of the best (the control never chooses it)
            nvs = [norm_correct(p_val, "val") for p_val, _ in paths]  # (M_val, 1 + R) each
            acc_val = [float(nv[:, 0].mean()) for nv in nvs]
            i = max(j for j in range(len(paths)) if acc_val[j] >= max(acc_val) - cfg["tolerance"])
            lam, nv, nt = cfg["ridges"][i], nvs[i], norm_correct(paths[i][1], "test")
            sel_val = float(nv[:, 0].mean() - nv[:, 1:].mean())
            per_row = nt[:, 0] - nt[:, 1:].mean(1)  # (M_test,)
            per_site[name] = per_row.view(len(splits["test"]), -1).mean(1)  # (n_test,)
            spec = adapter.specs[name]
            details.append({"site": name, "role": spec.role, "layer": spec.layer,
                            "scored": name in scored, "ridge": lam,
                            "selectivity": float(per_row.mean()), "selectivity_val": sel_val,
                            "normalised": float(nt[:, 0].mean()),
                            "control_normalised": float(nt[:, 1:].mean()),
                            "accuracy": float(nt[:, 0].mean() * (1 - base["test"][0]) + base["test"][0]),
                            "projection": proj.describe()})
        best = max((d for d in details if d["scored"]), key=lambda d: d["selectivity_val"])
        return Result.from_per_example(
            per_site[best["site"]].tolist(), details=details,
            metrics={"best_site": best["site"], "best_layer": best["layer"], "ridge": best["ridge"],
                     "selectivity": best["selectivity"],
                     "normalised_accuracy": best["normalised"],
                     "control_normalised_accuracy": best["control_normalised"],
                     "accuracy": best["accuracy"], "majority_baseline": base["test"][0],
                     "n_classes": C, "n_controls": R, "projection": best["projection"],
                     "control_keys": int(np.unique(control_keys(splits["train"], lat["train"]), axis=0).shape[0]),
                     "excluded_sites": sorted(set(names) - scored)})
