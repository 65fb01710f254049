"""Sparse autoencoder: do a TopK SAE's latents line up with the task's primary variable?

What it measures. A TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"; Bricken et al. 2023, "Towards monosemanticity") is trained full-batch
with Adam on one site's activations at the answer position (`adapter.answer_position`):
train split, centred, projected onto the top `width` principal components when wider
(`probe.Projection` without per-feature scaling, exact PCA of the train rows; recorded in
`metrics["projection"]`), scaled to unit mean square; decoder rows kept at unit norm; encoder
initialised as the decoder's transpose. It is trained at every representation site
(`representation_sites`: no raw embedding, no deepest `stream` site, the readout's input)
with `n_sae_seeds` seeds of its own, 1000 + 10 * seed + i, never the task seed, so the SAE's
initialisation noise is averaged rather than confounded with the task sample.

Scoring: the ground-truth features are the one-hot indicators of each value of the primary
variable (and, with `latents="all"`, of every per-example latent, each latent weighted
equally). For each feature the best-matching SAE latent is chosen on the train split; its
Pearson correlation r_f with the feature is measured on the test split. A site's score is
the mean over SAE seeds of the weighted mean of |r_f|; the scored site is the one whose
mean over seeds is highest *on the train split* (so the choice of site is not a maximum
over test noise), and the score is that site's test value: the best site's mean over SAE
seeds. Since r = mean_i(z_x,i * z_y,i) for population z-scores, `per_example` holds the mean
over seeds of sum_f w_f * sign(r_f) * z_f,i * z_latent,i, whose mean is the score. Metrics:
the site's variance explained on the test split, each site's score and its SD over SAE
seeds, and accuracy with the reconstruction spliced into the site at the answer position
(the first SAE seed; the part of the activation outside the projection is kept) against the
clean accuracy.

Projection and cost, measured on a random-init Mamba on parity (2048-feature states, 3 SAE
seeds per site): one SAE trains in 5.1 s at width 256 against 36.6 s at full width, and the
score is 0.20 at width 256 against 0.25 at full width (0.14 at 128): on such states the
projection lowers the chance floor (fewer directions to match by chance) rather than
keeping the score within 0.01, so compare cells only at one `width`. The SD of a site's
score over SAE seeds is recorded (0.02-0.09 there; 0.05 on a trained transformer on facts).

Chance level. Not 0: with m latents and N test rows, the best of m latents chosen on train
keeps a positive |r| by chance, and any representation that carries the inputs (a random-init
model's) yields latents correlated with value indicators. The random-init control cell
measures that floor; read the trained - control effect, not the raw score.

What it cannot detect. A variable held only at the excluded sites (embedding, readout
input) scores at the floor; a variable spread over many latents (dense, or polysemantic
latents) scores low although it is linearly present (the probe detects that); the score is
correlational (splicing is the only causal metric here).
"""

from __future__ import annotations

import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import (REPRESENTATION_ROLES, latent_at, no_representation_site, one_hot,
                                         representation_names, representation_sites)
from archbench.techniques.probe import Projection


def _zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std(0, unbiased=False)  # (F,)
    return torch.where(std > 1e-8, (x - x.mean(0)) / std.clamp_min(1e-8), torch.zeros_like(x))


def train_topk_sae(x: torch.Tensor, n_latents: int, k: int, steps: int, lr: float, seed: int):
    """x (N, F), already normalised -> encode(x) (.., m), decode(z) (.., F)."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(n_latents, x.shape[1], generator=gen)  # (m, F)
    w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).requires_grad_(True)
    w_enc = w_dec.detach().T.clone().requires_grad_(True)  # (F, m)
    b_enc = torch.zeros(n_latents, requires_grad=True)  # (m,)
    b_dec = torch.zeros(x.shape[1], requires_grad=True)  # (F,)

    def encode_topk(a):
        top = ((a - b_dec) @ w_enc + b_enc).topk(k, dim=-1)  # (N, k) pre-activations and indices
        return top.values.relu(), top.indices

    def encode(a):
        vals, idx = encode_topk(a)
        return torch.zeros(len(a), n_latents).scatter(-1, idx, vals)  # (N, m)

    def decode(z):
        return z @ w_dec + b_dec  # (N, F)

    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            vals, idx = encode_topk(x)  # (N, k), (N, k)
            # dense decode of the scattered codes: on CPU 2-3x faster than gathering w_dec rows
            recon = torch.zeros(len(x), n_latents).scatter(-1, idx, vals) @ w_dec + b_dec  # (N, F)
            loss = (recon - x).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (lambda a: encode(a).detach()), (lambda z: decode(z).detach())


def match_latents(z_tr: torch.Tensor, z_te: torch.Tensor, g_tr: torch.Tensor, g_te: torch.Tensor):
    """Best latent per feature chosen on train: -> test (rows,) z-products, test r (G,), train |r| mean."""
    zl_tr, zl_te = _zscore(z_tr.double()), _zscore(z_te.double())  # (N, m), (M, m)
    corr_tr = (_zscore(g_tr).T @ zl_tr) / len(g_tr)  # (G, m) train Pearson r
    best = corr_tr.abs().argmax(1)  # (G,)
    prod = _zscore(g_te) * zl_te[:, best]  # (M, G) z-products on test
    r = prod.mean(0)  # (G,) Pearson r on test
    train_r = corr_tr.abs().gather(1, best[:, None]).mean()
    return (prod * r.sign()).mean(1), r, float(train_r)


class SAE(Technique):
    name = "sae"
    version = 2
    control_floor = ("the score is a correlation, not chance-corrected: the best of up to 256 latents keeps "
                     "a positive |r| by chance, and a random-init state that carries the input tokens "
                     "already holds latents correlated with a variable that is a simple function of them "
                     "(count's indicators).")
    representation = True
    roles = frozenset(REPRESENTATION_ROLES)
    # width: sites wider than this are projected onto their top principal components;
    # n_sae_seeds: SAEs per site, seeded 1000 + 10 * seed + i (never the task seed)
    # n_train 512 and at most 256 latents: a random-init Mamba parity cell (3 sites x 3 SAEs) takes
    # 18.5 s against 33 s with 1,024 rows and 512 latents on this 2-core machine
    default_config = {"n_train": 512, "n_test": 512, "expansion": 4, "max_latents": 256, "k": 8,
                      "steps": 100, "lr": 3e-3, "latents": "primary", "width": 256, "n_sae_seeds": 3}
    checkpoint_config = {"n_train": 256, "n_test": 128}  # a checkpoint's row

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg, pos = self.config, task.primary_position
        at = adapter.answer_position(task.seq_len)  # activation position of the answer
        train, test = task.sample(cfg["n_train"], seed, "train"), task.sample(cfg["n_test"], seed, "test")
        names = representation_names(adapter)
        candidates = representation_sites(adapter, names)
        if not candidates:
            return Result.not_applicable(no_representation_site(adapter))
        tr, te = adapter.run(train.tokens, cache=candidates), adapter.run(test.tokens, cache=candidates)

        keys = [task.primary] if cfg["latents"] == "primary" else \
            [key for key in train.latents if train.latents[key].dim() == 1 or key == task.primary]
        truth = {}
        for key in keys:
            y_tr, y_te = latent_at(train.latents[key], pos), latent_at(test.latents[key], pos)  # (N,), (M,)
            vals = torch.unique(y_tr)  # (G,)
            truth[key] = (one_hot(y_tr, vals), one_hot(y_te, vals))  # (N, G), (M, G)
        sae_seeds = [1000 + 10 * seed + i for i in range(cfg["n_sae_seeds"])]
        sites = {}
        for nm in candidates:
            a_tr = tr.cache[nm][:, at].flatten(1)  # (N, F)
            a_te = te.cache[nm][:, at].flatten(1)  # (M, F)
            proj = Projection(a_tr, cfg["width"], seed, standardise=False, fit_rows=len(a_tr))
            p_tr, p_te = proj(a_tr), proj(a_te)  # (N, w), (M, w) centred
            scale = p_tr.pow(2).mean().sqrt().clamp_min(1e-8)
            x_tr, x_te = (p_tr / scale).float(), (p_te / scale).float()
            m = min(cfg["expansion"] * x_tr.shape[1], cfg["max_latents"])
            runs = []
            for s_seed in sae_seeds:
                encode, decode = train_topk_sae(x_tr, m, min(cfg["k"], m), cfg["steps"], cfg["lr"], s_seed)
                z_tr, z_te = encode(x_tr), encode(x_te)  # (N, m), (M, m)
                per_ex, train_score, by_latent = torch.zeros(len(test), dtype=torch.float64), 0.0, {}
                for key, (g_tr, g_te) in truth.items():
                    prod, r, tr_r = match_latents(z_tr, z_te, g_tr, g_te)
                    per_ex += prod / len(keys)
                    train_score += tr_r / len(keys)
                    by_latent[key] = float(r.abs().mean())
                recon = decode(z_te)  # (M, w)
                runs.append({"per_example": per_ex, "train": train_score, "by_latent": by_latent,
                             "recon": recon, "dead": int((z_tr.abs().sum(0) == 0).sum()),
                             "var_explained": 1 - float((recon - x_te).pow(2).sum()
                                                        / (x_te - x_te.mean(0)).pow(2).sum())})
            scores = torch.tensor([float(r["per_example"].mean()) for r in runs])
            sites[nm] = {"runs": runs, "proj": proj, "scale": scale, "m": m, "a_tr": a_tr, "a_te": a_te,
                         "train": sum(r["train"] for r in runs) / len(runs),
                         "score": float(scores.mean()), "sd": float(scores.std()) if len(runs) > 1 else 0.0}
        site = max(candidates, key=lambda nm: sites[nm]["train"])
        best, runs = sites[site], sites[site]["runs"]
        per_example = torch.stack([r["per_example"] for r in runs]).mean(0)  # (M,)
        full = best["proj"].inverse(runs[0]["recon"].double() * best["scale"], best["a_te"])  # (M, F)
        full = full.view(len(test), *te.cache[site].shape[2:])  # (M, *f)

        def splice(act, spec):
            act = act.clone()
            act[:, at] = full.to(act)
            return act

        spliced = adapter.run(test.tokens, interventions={site: splice}).logits[:, -1].argmax(-1)
        acc_clean = float((te.logits[:, -1].argmax(-1) == test.answer).float().mean())
        a_tr = best["a_tr"].float()
        return Result.from_per_example(
            per_example.tolist(),
            details=[{"site": nm, "layer": adapter.specs[nm].layer, "score": sites[nm]["score"],
                      "score_sd_over_sae_seeds": sites[nm]["sd"], "train_score": sites[nm]["train"],
                      "projection": sites[nm]["proj"].describe()} for nm in candidates],
            metrics={"site": site, "layer": adapter.specs[site].layer, "n_latents": best["m"],
                     "k": min(cfg["k"], best["m"]), "sae_seeds": sae_seeds,
                     "score_sd_over_sae_seeds": best["sd"],
                     "variance_explained": sum(r["var_explained"] for r in runs) / len(runs),
                     "accuracy_clean": acc_clean,
                     "accuracy_spliced": float((spliced == test.answer).float().mean()),
                     "mean_abs_corr_by_latent": {k: sum(r["by_latent"][k] for r in runs) / len(runs)
                                                 for k in keys},
                     "dead_latents": sum(r["dead"] for r in runs) / len(runs),
                     "projection": best["proj"].describe(),
                     "excluded_sites": sorted(set(names) - set(candidates)),
                     # few distinct activations (a small task) leave most latents unused:
                     # with D distinct rows, TopK can use at most D * k latents
                     "distinct_activations": int(torch.unique(a_tr.round(decimals=5), dim=0).shape[0])})
