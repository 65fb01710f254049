"""Each technique's ranking of the candidate components of a known-answer organism.

A known-answer organism (`archbench.known_answer`) holds its task's primary variable in one
designated component at the answer position, and strict IIT has made the other candidates
there causally inert. Each function here scores every candidate the way one technique of
the matrix scores a site, restricted to that position, so `archbench.localisation.rank`
can say whether the technique puts the variable where it is:

- `patching`: interchange accuracy of the candidate patched alone from the source
  (`localisation.patching_scores`; Geiger et al. 2021, Vig et al. 2020).
- `probe`: ridge decoding accuracy of the primary variable (`localisation.probe_scores`).
- `ablation`: held-out accuracy drop when the candidate is replaced by its train-split mean
  (the ablation technique's Mean ablation; Wang et al. 2023).
- `attribution`: attribution patching (Nanda 2023; Syed et al. 2023, "Attribution patching
  outperforms automated circuit discovery"): the first-order estimate
  grad(logit[expected] - logit[base answer]) . (source - base) of what patching the
  candidate would do, mean over pairs. Needs the `gradients` capability.
- `steering`: the steering technique's difference-of-means vector from the base's value to
  the source's, added at the candidate; the fraction of pairs whose answer becomes
  `expected`, less that of a random direction of the same norm (Rimsky et al. 2024).
- `logit_lens`: the model's own readout applied to the candidate's output (a direct logit
  attribution of the component, nostalgebraist 2020; Elhage et al. 2021): accuracy of the
  decoded answer. Needs `readout` and an output shaped like the stream.
- `tuned_lens`: an affine map from the candidate's output to the model's final logits, fit
  on the train split (Belrose et al. 2023), read on the test split: accuracy of the answer.
- `sae`: the SAE technique's TopK SAE trained on the candidate's output; the mean |Pearson r|
  of the best latent (chosen on train) per value of the primary variable, on test.

Causal rankers (patching, ablation, attribution, steering) can tell the designated
component from an inert one that reads the same variable; correlational ones (probe, lenses,
SAE) cannot: a component downstream of the designated one, or one that reads the variable
without being used, decodes it as well and ties it. CKA compares whole representations
between models, not components within one, and ranks nothing here.
"""

from __future__ import annotations

from typing import Callable

import torch

from archbench.hooks import Mean
from archbench.iit import Alignment
from archbench.localisation import patching_scores, probe_scores
from archbench.technique_helpers import answer_prediction, class_index, one_hot, primary_value
from archbench.techniques.sae import match_latents, train_topk_sae
from archbench.techniques.steering import steering_and_random
from archbench.techniques.tuned_lens import apply_affine, fit_affine


def _value(task, tokens: torch.Tensor) -> torch.Tensor:
    """The primary variable of each sequence: (n, T) -> (n,)."""
    return primary_value(task.latents(tokens), task).contiguous()


@torch.no_grad()
def ablation_scores(adapter, task, seed: int, alignment: Alignment, n_train: int = 1024,
                    n_test: int = 512) -> dict[str, float]:
    """Per candidate: test accuracy (among the answer tokens) lost when its output at the
    alignment's position is replaced by its train-split mean there."""
    at, names = alignment.position, list(alignment.candidates)
    train, test = task.sample(n_train, seed, "train"), task.sample(n_test, seed, "test")
    means = adapter.run(train.tokens, cache=names).cache
    clean = float((answer_prediction(adapter.run(test.tokens).logits[:, -1], task) == test.answer).float().mean())
    scores = {}
    for name in names:
        mean = means[name][:, at].mean(0)  # (*f)
        out = adapter.run(test.tokens, interventions={name: Mean(mean, positions=at)})
        acc = float((answer_prediction(out.logits[:, -1], task) == test.answer).float().mean())
        scores[name] = clean - acc
    return scores


def attribution_scores(adapter, task, seed: int, alignment: Alignment, n_pairs: int = 256) -> dict[str, float]:
    """Per candidate: attribution patching's estimate of the rise in logit[expected] -
    logit[base answer] when the candidate at the position takes the source's value, mean
    over test pairs. One backward pass per candidate: with every candidate replaced by a
    leaf at once, a gradient would stop at the next replaced one and miss indirect effects."""
    at, names = alignment.position, list(alignment.candidates)
    pairs = task.counterfactuals(n_pairs, seed, "test")
    with torch.no_grad():
        src = adapter.run(pairs.source, cache=names).cache  # name -> (n, T, *f)
    rows = torch.arange(len(pairs))
    scores = {}
    for name in names:
        leaf = {}

        def take(act, spec, leaf=leaf):
            leaf["act"] = act.detach().requires_grad_(True)  # (n, T, *f) the clean value, differentiable
            return leaf["act"]

        logits = adapter.run(pairs.base, interventions={name: take}, grad=True).logits[:, -1]  # (n, V)
        diff = (logits[rows, pairs.expected] - logits[rows, pairs.base_answer]).sum()
        # (n, T, *f); None where the output does not depend on this component at all
        grad = torch.autograd.grad(diff, leaf["act"], allow_unused=True)[0] if diff.requires_grad else None
        if grad is None:
            scores[name] = 0.0
            continue
        delta = src[name][:, at] - leaf["act"].detach()[:, at]  # (n, *f)
        scores[name] = float((grad[:, at] * delta).flatten(1).sum(1).mean())
    return scores


@torch.no_grad()
def steering_scores(adapter, task, seed: int, alignment: Alignment, n_train: int = 1024,
                    n_pairs: int = 256) -> dict[str, float]:
    """Per candidate: steering success (answer becomes `expected`) minus a random direction's,
    on test pairs whose answer the change alters and whose base the model answers correctly."""
    at, names = alignment.position, list(alignment.candidates)
    train = task.sample(n_train, seed, "train")
    train_values = primary_value(train.latents, task).contiguous()  # (N,)
    classes = torch.unique(train_values)  # (C,)
    y = class_index(train_values, classes)  # (N,)
    pairs = task.counterfactuals(n_pairs, seed, "test")
    u, v = class_index(_value(task, pairs.base), classes), class_index(_value(task, pairs.source), classes)
    correct = answer_prediction(adapter.run(pairs.base).logits[:, -1], task) == pairs.base_answer  # (n,)
    keep = (pairs.expected != pairs.base_answer) & (u >= 0) & (v >= 0) & correct
    if not bool(keep.any()):
        return {name: 0.0 for name in names}
    base, expected, u, v = pairs.base[keep], pairs.expected[keep], u[keep], v[keep]
    acts = adapter.run(train.tokens, cache=names).cache
    counts = torch.bincount(y, minlength=len(classes)).clamp_min(1)[:, None].float()  # (C, 1)
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for name in names:
        x = acts[name][:, at].flatten(1).float()  # (N, F)
        both = steering_and_random(x, y, counts, u, v, gen)  # (2n, F)

        def add(act, spec, both=both):
            act = act.clone()
            act[:, at] += both.view(-1, *act.shape[2:]).to(act)
            return act

        pred = answer_prediction(adapter.run(base.repeat(2, 1), interventions={name: add}).logits[:, -1], task)
        hit = (pred.view(2, -1) == expected).float().mean(1)  # (2,) steered, random
        scores[name] = float(hit[0] - hit[1])
    return scores


@torch.no_grad()
def logit_lens_scores(adapter, task, seed: int, alignment: Alignment, n_test: int = 512) -> dict[str, float] | None:
    """Per candidate: accuracy of the answer read by the model's readout from the candidate's
    output at the position; None without a readout or for outputs not shaped like the stream."""
    streams = adapter.names("stream")
    if "readout" not in adapter.capabilities or not streams:
        return None
    at, names = alignment.position, list(alignment.candidates)
    test = task.sample(n_test, seed, "test")
    out = adapter.run(test.tokens, cache=names + streams[-1:])
    shape = out.cache[streams[-1]].shape[2:]
    if any(out.cache[n].shape[2:] != shape for n in names):
        return None
    return {n: float((answer_prediction(adapter.decode(out.cache[n][:, at:at + 1])[:, 0], task)
                      == test.answer).float().mean()) for n in names}


@torch.no_grad()
def tuned_lens_scores(adapter, task, seed: int, alignment: Alignment, n_train: int = 2048, n_test: int = 512,
                      ridge: float = 1e-3) -> dict[str, float]:
    """Per candidate: accuracy of the answer read through an affine map (ridge, train split)
    from the candidate's output at the position to the model's final logits there."""
    at, names = alignment.position, list(alignment.candidates)
    train, test = task.sample(n_train, seed, "train"), task.sample(n_test, seed, "test")
    tr, te = adapter.run(train.tokens, cache=names), adapter.run(test.tokens, cache=names)
    target = tr.logits[:, -1].double()  # (N, V)
    scores = {}
    for n in names:
        w = fit_affine(tr.cache[n][:, at].flatten(1).double(), target, ridge)  # (F+1, V)
        logits = apply_affine(te.cache[n][:, at].flatten(1).double(), w)  # (M, V)
        scores[n] = float((answer_prediction(logits, task) == test.answer).float().mean())
    return scores


@torch.no_grad()
def sae_scores(adapter, task, seed: int, alignment: Alignment, n_train: int = 512, n_test: int = 512,
               expansion: int = 4, max_latents: int = 256, k: int = 8, steps: int = 100,
               lr: float = 3e-3) -> dict[str, float]:
    """Per candidate: mean |r| on test of the best TopK-SAE latent (chosen on train) per value
    of the primary variable, the SAE trained on the candidate's centred, rescaled output."""
    at, names = alignment.position, list(alignment.candidates)
    train, test = task.sample(n_train, seed, "train"), task.sample(n_test, seed, "test")
    tr, te = adapter.run(train.tokens, cache=names), adapter.run(test.tokens, cache=names)
    y_tr, y_te = primary_value(train.latents, task), primary_value(test.latents, task)
    vals = torch.unique(y_tr)
    g_tr, g_te = one_hot(y_tr, vals), one_hot(y_te, vals)  # (N, G), (M, G)
    scores = {}
    for n in names:
        a_tr, a_te = tr.cache[n][:, at].flatten(1).float(), te.cache[n][:, at].flatten(1).float()  # (N, F)
        mu = a_tr.mean(0)
        scale = (a_tr - mu).pow(2).mean().sqrt().clamp_min(1e-8)
        x_tr, x_te = (a_tr - mu) / scale, (a_te - mu) / scale
        m = min(expansion * x_tr.shape[1], max_latents)
        encode, _ = train_topk_sae(x_tr, m, min(k, m), steps, lr, 1000 + 10 * seed)
        _, r, _ = match_latents(encode(x_tr), encode(x_te), g_tr, g_te)
        scores[n] = float(r.abs().mean())
    return scores


# technique -> (component ranker, capability it needs or None); the known-answer table's columns
RANKERS: dict[str, tuple[Callable, str | None]] = {
    "patching": (patching_scores, None),
    "ablation": (ablation_scores, None),
    "attribution": (attribution_scores, "gradients"),
    "steering": (steering_scores, None),
    "probe": (probe_scores, None),
    "logit_lens": (logit_lens_scores, "readout"),
    "tuned_lens": (tuned_lens_scores, None),
    "sae": (sae_scores, None),
}


def component_scores(technique: str, adapter, task, seed: int, alignment: Alignment) -> dict[str, float] | None:
    """One technique's scores of the alignment's candidates; None where it does not apply."""
    ranker, needs = RANKERS[technique]
    if needs and needs not in adapter.capabilities:
        return None
    return ranker(adapter, task, seed, alignment)
