"""Sparse autoencoder: does a TopK SAE find latents that match the task's primary variable?

A TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders";
Bricken et al. 2023, "Towards monosemanticity") is trained full-batch with Adam on one
site's activations at the answer position (`adapter.answer_position`) (train split, centred and scaled to unit
mean square per feature; decoder rows kept at unit norm; encoder initialised as the decoder's
transpose). The site is the `stream` or `state` site (the deepest excluded when there is
another: it is the readout's input) where a closed-form ridge probe of the primary variable
is most accurate, so the score asks whether the SAE's latents line up with a variable
that is there, not where the model computes it (the probe technique answers that).

Scoring: the ground-truth features are the one-hot indicators of each value of the primary
variable (and, with `latents="all"`, of every per-example latent, each latent weighted
equally). For each feature the best-matching SAE latent is chosen on the train split; its
Pearson correlation r_f with the feature is measured on the test split. The score is the
weighted mean of |r_f|. Since r = mean_i(z_x,i * z_y,i) for population z-scores,
`per_example` holds sum_f w_f * sign(r_f) * z_f,i * z_latent,i, whose mean is the score.
Metrics: variance explained on the test split, and accuracy with the reconstruction spliced
into the site at the primary position (against the clean accuracy).
"""

from __future__ import annotations

import torch

from archbench.technique import Result, Technique
from archbench.techniques.tuned_lens import apply_affine, fit_affine

SITE_ROLES = ("stream", "state")


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
            recon = torch.einsum("nk,nkf->nf", vals, w_dec[idx]) + b_dec  # (N, F) sparse decode
            loss = (recon - x).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (lambda a: encode(a).detach()), (lambda z: decode(z).detach())


class SAE(Technique):
    name = "sae"
    representation = True
    roles = frozenset(SITE_ROLES)
    default_config = {"n_train": 1024, "n_test": 512, "expansion": 4, "max_latents": 512, "k": 8,
                      "steps": 100, "lr": 3e-3, "latents": "primary"}

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        cfg, pos = self.config, task.primary_position
        at = adapter.answer_position(task.seq_len)  # activation position of the answer
        train, test = task.sample(cfg["n_train"], seed, "train"), task.sample(cfg["n_test"], seed, "test")
        names = adapter.names(list(SITE_ROLES))
        tr, te = adapter.run(train.tokens, cache=names), adapter.run(test.tokens, cache=names)
        deepest = max(names, key=lambda nm: adapter.specs[nm].layer or 0)
        candidates = [nm for nm in names if nm != deepest] or names

        def value(ex, key):
            lat = ex.latents[key]
            return lat if lat.dim() == 1 else lat[:, pos]

        y_tr, y_te = value(train, task.primary), value(test, task.primary)  # (N,), (M,)
        classes = torch.unique(y_tr)  # (C,)
        onehot = lambda y: (y[:, None] == classes[None]).double()  # (n, C)
        probe = {}
        for nm in candidates:
            w = fit_affine(tr.cache[nm][:, at].flatten(1).double(), onehot(y_tr), 1e-3)  # (F+1, C)
            pred = classes[apply_affine(te.cache[nm][:, at].flatten(1).double(), w).argmax(-1)]
            probe[nm] = float((pred == y_te).float().mean())
        site = max(candidates, key=lambda nm: probe[nm])

        a_tr = tr.cache[site][:, at].flatten(1).float()  # (N, F)
        a_te = te.cache[site][:, at].flatten(1).float()  # (M, F)
        center, scale = a_tr.mean(0), a_tr.sub(a_tr.mean(0)).pow(2).mean().sqrt().clamp_min(1e-8)
        x_tr, x_te = (a_tr - center) / scale, (a_te - center) / scale  # (N, F), (M, F)
        m = min(cfg["expansion"] * x_tr.shape[1], cfg["max_latents"])
        encode, decode = train_topk_sae(x_tr, m, min(cfg["k"], m), cfg["steps"], cfg["lr"], seed)
        z_tr, z_te = encode(x_tr), encode(x_te)  # (N, m), (M, m)
        recon = decode(z_te)  # (M, F)
        var_explained = 1 - float((recon - x_te).pow(2).sum() / (x_te - x_te.mean(0)).pow(2).sum())

        keys = [task.primary] if cfg["latents"] == "primary" else \
            [key for key in train.latents if train.latents[key].dim() == 1 or key == task.primary]
        per_example, by_latent = torch.zeros(len(test), dtype=torch.float64), {}
        for key in keys:
            vals = torch.unique(value(train, key))
            g_tr = (value(train, key)[:, None] == vals).double()  # (N, G)
            g_te = (value(test, key)[:, None] == vals).double()  # (M, G)
            best = (_zscore(g_tr).T @ _zscore(z_tr.double())).abs().argmax(1)  # (G,) chosen on train
            prod = _zscore(g_te) * _zscore(z_te.double())[:, best]  # (M, G) z-products on test
            r = prod.mean(0)  # (G,) Pearson r on test
            per_example += (prod * r.sign()).mean(1) / len(keys)
            by_latent[key] = float(r.abs().mean())

        full = (recon * scale + center).view(len(test), *te.cache[site].shape[2:])  # (M, *f)

        def splice(act, spec):
            act = act.clone()
            act[:, at] = full.to(act)
            return act

        spliced = adapter.run(test.tokens, interventions={site: splice}).logits[:, -1].argmax(-1)
        acc_clean = float((te.logits[:, -1].argmax(-1) == test.answer).float().mean())
        return Result.from_per_example(
            per_example.tolist(),
            details=[{"site": nm, "layer": adapter.specs[nm].layer, "probe_accuracy": probe[nm]}
                     for nm in candidates],
            metrics={"site": site, "layer": adapter.specs[site].layer, "n_latents": m,
                     "k": min(cfg["k"], m), "variance_explained": var_explained,
                     "accuracy_clean": acc_clean,
                     "accuracy_spliced": float((spliced == test.answer).float().mean()),
                     "mean_abs_corr_by_latent": by_latent,
                     "dead_latents": int((z_tr.abs().sum(0) == 0).sum()),
                     # few distinct activations (a small task) leave most latents unused:
                     # with D distinct rows, TopK can use at most D * k latents
                     "distinct_activations": int(torch.unique(a_tr.round(decimals=5), dim=0).shape[0])})
