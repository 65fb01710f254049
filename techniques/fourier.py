"""Fourier features: does the model represent the residues of modular addition with a few key frequencies?

Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability" (ICLR
2023): a transformer trained on `a b = -> (a + b) mod p` embeds each residue r as cos and
sin of 2*pi*k*r/p for a handful of *key frequencies* k, so the embedding matrix restricted to
the residue tokens, W_E (p, d), projected onto the discrete Fourier basis over residues,
has its power on those few k; the unembedding columns of the residue answers do too, and
projecting the embedding onto the key frequencies (plus the constant) keeps the accuracy.

Where the matrices come from, the same way in every family (no per-family branch):
- W_E: the `embed` hook point of the residue tokens run through the adapter, read at the
  position of `a` (position 0 of `a b =`): row r is what the model's first layer sees for
  residue r there. A family whose `embed` hook point is the one-hot token itself (its
  feature axis is `vocab`: KAN, reservoir, NVAR, program) has no learnt embedding and is not
  applicable.
- W_U (metrics only, families with the `readout` capability): `adapter.decode` of the probe
  directions +s e_i and -s e_i of the readout's input (the deepest `stream` site), s the
  mean norm of that site at the answer position on the test inputs, central difference
  (decode(+s e_i) - decode(-s e_i)) / 2s restricted to the residue answer tokens: column i
  is W_U's direction i over residues (for an RMSNorm-then-linear readout exactly the
  unembedding column times the norm's weight, a LayerNorm also subtracting the mean column;
  biases cancel). Without a readout the unembedding metrics are None.

Score (embedding only, so that it means the same on every family). The orthonormal Fourier
basis over residues (constant; cos and sin of frequency k = 1..p//2, cos alone at k = p/2
for even p) gives the power of frequency k in embedding dimension j, P_kj = |F_cos,k,j|^2 +
|F_sin,k,j|^2, and its pooled share s_k = sum_j P_kj / sum_{k>=1, j} P_kj (the constant k = 0,
the mean embedding, excluded). The key set is the top-K shares (K = `n_key`), and

    score = (sum of s_k over the key set - K/n) / (1 - K/n),     n = p//2 frequencies,

0 for power spread evenly over the frequencies, 1 for all power in K frequencies. The
unembedding is not part of the score, so that the score means the same on families with and
without a readout, and because the output side need not be Fourier-sparse in a model with a
residual stream and an MLP (Nanda et al.'s clean output side is the neuron-logit map of a
one-layer model): measured on the trained transformers here (p = 23, seeds 0-2), the
embedding's top 5 frequencies hold 0.90-0.97 of its power while W_U's hold 0.50-0.54, about
what a random matrix gives.
`per_example` holds one value per embedding dimension j, its power-weighted share of that
concentration: u_j = (E_j / mean E) * (key_j / E_j - K/n) / (1 - K/n), E_j = sum_k P_kj,
key_j = sum over the key set of P_kj, so mean_j u_j is exactly the score before clipping;
a dimension whose power avoids the key frequencies is negative. (The key set is chosen on
all dimensions, so the per-dimension values are not independent of it.)

Chance level (score 0): an evenly spread spectrum. A random embedding's frequency powers
are chi-square with 2d degrees of freedom each, so its top-K share keeps a small positive
floor above K/n that the random-init control cell measures (`control_floor`).

Secondary metrics: `key_frequencies`, `key_share` (raw top-K share), `key_share_unembed`,
`key_frequencies_unembed`, `overlap_embed_unembed` (fraction of the K embedding key
frequencies among the unembedding's top K), `base_accuracy` and `ablated_accuracy` (on
every test-split pair, deciding among the residues, with the residue embeddings at the
positions of a and b replaced, by an intervention at the `embed` hook point, with their
projection onto the constant + key frequencies), `accuracy_kept` = ablated / base; `details`
holds one row per frequency with its embedding and unembedding shares (the spectrum).

What it cannot detect: Fourier features that appear only after the embedding (a model that
computes them in a later layer from an arbitrary embedding scores ~0); the *use* of the
frequencies beyond the embedding ablation (the rotation algorithm itself is not checked);
a key frequency count other than K (more key frequencies than K cap the score below 1);
any task but modadd (n/a).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from archbench.technique import Result, Technique
from archbench.technique_helpers import answer_prediction, deepest_site

A_POSITION, B_POSITION = 0, 1  # modadd's `a b =` layout


def fourier_basis(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthonormal Fourier basis over residues 0..p-1 and each column's frequency.

    Returns (basis (p, p) float64, columns [constant, cos 1, sin 1, cos 2, sin 2, ...], cos only
    at k = p/2 for even p; frequency (p,) long, 0 for the constant).
    """
    r = torch.arange(p, dtype=torch.float64)  # (p,)
    columns, frequency = [torch.full((p,), 1 / math.sqrt(p), dtype=torch.float64)], [0]
    for k in range(1, p // 2 + 1):
        angle = 2 * math.pi * k * r / p  # (p,)
        parts = [torch.cos(angle)] if 2 * k == p else [torch.cos(angle), torch.sin(angle)]
        for part in parts:
            columns.append(part / part.norm())
            frequency.append(k)
    return torch.stack(columns, 1), torch.tensor(frequency)  # (p, p), (p,)


def frequency_power(matrix: torch.Tensor) -> torch.Tensor:
    """(p, d) rows per residue -> (p//2, d) power of frequencies 1..p//2 in each dimension."""
    p = matrix.shape[0]
    basis, frequency = fourier_basis(p)
    coefficients = basis.T @ matrix.double()  # (p, d) Fourier coefficients
    power = torch.zeros(p // 2 + 1, matrix.shape[1], dtype=torch.float64)  # (p//2 + 1, d)
    power.index_add_(0, frequency, coefficients ** 2)
    return power[1:]  # (p//2, d) the constant excluded


def concentration(power: torch.Tensor, n_key: int) -> dict:
    """Top-`n_key` concentration of a (n_freq, d) power spectrum: key set, shares, score, per dimension."""
    n_freq = power.shape[0]
    total = power.sum()
    shares = (power.sum(1) / total.clamp_min(1e-300)).numpy()  # (n_freq,)
    key = np.argsort(-shares, kind="stable")[:n_key]  # frequency indices (k - 1), strongest first
    floor = n_key / n_freq
    key_share = float(shares[key].sum())
    per_dim_total = power.sum(0)  # (d,)
    per_dim_key = power[torch.as_tensor(key)].sum(0)  # (d,)
    mean_total = per_dim_total.mean().clamp_min(1e-300)
    per_dim = ((per_dim_key - floor * per_dim_total) / ((1 - floor) * mean_total)).numpy()  # (d,)
    return {"shares": shares, "key": [int(i) + 1 for i in key], "key_share": key_share,
            "score": (key_share - floor) / (1 - floor), "per_dim": per_dim}


class Fourier(Technique):
    name = "fourier"
    roles = frozenset({"embed"})
    # n_key: Nanda et al. found 5 key frequencies (of 56) at p = 113. The count is set by the
    # model, not by p, and at modadd's default p = 23 (11 frequencies) the trained transformers
    # use as many: measured on seeds 0-2, the top 5 hold 0.97, 0.91, 0.90 of the embedding's
    # power (top 3: 0.76, 0.59, 0.58) and projecting onto them keeps 1.01, 1.02, 0.99 of the
    # accuracy (top 3: 0.70, 0.79, 0.93). A smaller K would score the trained models' own
    # spectrum as spread; the chance share K/n (5/11) is what the score corrects for.
    default_config = {"n_key": 5}
    control_floor = ("a random embedding's frequency powers fluctuate (chi-square with 2d degrees of freedom "
                     "each), so its top-K share sits a little above K/n: the random-init control measures "
                     "that floor (transformer, p = 23, K = 5: top-5 share 0.51-0.52 against 5/11 = 0.455, "
                     "score 0.11-0.12 on seeds 0-2)")

    def why_not(self, adapter, task) -> str | None:
        if task.name != "modadd":
            return f"fourier analyses the residues of modular addition; task {task.name} has none"
        reason = super().why_not(adapter, task)
        if reason:
            return reason
        embed = adapter.specs[adapter.names("embed")[0]]
        if "vocab" in embed.axes:
            return f"{adapter.family}'s embed hook point is the one-hot token: no learnt embedding to analyse"
        n_freq = task.p // 2
        if not 0 < self.config["n_key"] < n_freq:
            return f"fourier needs 0 < n_key < {n_freq} frequencies at p={task.p}, got n_key={self.config['n_key']}"
        return None

    @torch.no_grad()
    def run(self, adapter, task, seed: int) -> Result:
        p, n_key = task.p, self.config["n_key"]
        embed = adapter.names("embed")[0]
        residues = task.answer_tokens()  # (p,) token id r is residue r
        probe_inputs = torch.stack([residues, residues, torch.full_like(residues, p)], 1)  # (p, 3) `r r =`
        per_position = adapter.run(probe_inputs, cache=[embed]).cache[embed].flatten(2)  # (p, L, d)
        embedding = per_position[:, A_POSITION]  # (p, d) W_E at the position of a
        embed_fit = concentration(frequency_power(embedding), n_key)

        test = torch.as_tensor(task.all_inputs()[task.in_test_split(task.all_inputs())])  # (n_test, 3)
        answer = task.rule(test)  # (n_test,)
        streams = adapter.names("stream")
        readout_site = deepest_site(adapter, streams) if streams else None
        out = adapter.run(test, cache=[readout_site] if readout_site else None)
        base_accuracy = float((answer_prediction(out.logits[:, -1], task) == answer).float().mean())

        # the embedding of a and b projected onto the constant + key frequencies, as an edit at `embed`
        basis, frequency = fourier_basis(p)
        kept = basis[:, (frequency == 0) | torch.isin(frequency, torch.tensor(embed_fit["key"]))]  # (p, 1 + 2K)
        projector = kept @ kept.T  # (p, p) onto the kept frequencies, over residues
        removed = {j: (per_position[:, j].double() - projector @ per_position[:, j].double()).float()
                   for j in (A_POSITION, B_POSITION)}  # position -> (p, d) non-key part per residue

        def keep_key_frequencies(act: torch.Tensor, spec) -> torch.Tensor:
            act = act.clone()  # (n_test, L, *features)
            for j, part in removed.items():
                act[:, j] -= part[test[:, j]].view_as(act[:, j])
            return act

        ablated = adapter.run(test, interventions={embed: keep_key_frequencies}).logits[:, -1]  # (n_test, V)
        ablated_accuracy = float((answer_prediction(ablated, task) == answer).float().mean())

        unembed_fit = None
        if "readout" in adapter.capabilities and readout_site:
            readout_input = out.cache[readout_site]  # (n_test, L, *shape)
            at_answer = readout_input[:, adapter.answer_position(test.shape[1])]  # (n_test, *shape)
            scale = float(at_answer.flatten(1).norm(dim=1).mean())
            width = at_answer[0].numel()
            probes = scale * torch.eye(width).view(width, 1, *at_answer.shape[1:])  # (width, 1, *shape)
            central = (adapter.decode(probes) - adapter.decode(-probes))[:, 0] / (2 * scale)  # (width, V)
            unembedding = central[:, residues].T  # (p, width) W_U over the residue answers
            unembed_fit = concentration(frequency_power(unembedding), n_key)

        details = [{"frequency": k, "share_embed": float(embed_fit["shares"][k - 1]),
                    "key_embed": k in embed_fit["key"],
                    "share_unembed": None if unembed_fit is None else float(unembed_fit["shares"][k - 1]),
                    "key_unembed": None if unembed_fit is None else k in unembed_fit["key"]}
                   for k in range(1, p // 2 + 1)]
        metrics = {"key_frequencies": embed_fit["key"], "key_share": embed_fit["key_share"],
                   "chance_share": n_key / (p // 2), "n_key": n_key,
                   "key_frequencies_unembed": None if unembed_fit is None else unembed_fit["key"],
                   "key_share_unembed": None if unembed_fit is None else unembed_fit["key_share"],
                   "score_unembed": None if unembed_fit is None else unembed_fit["score"],
                   "overlap_embed_unembed": None if unembed_fit is None
                   else len(set(embed_fit["key"]) & set(unembed_fit["key"])) / n_key,
                   "base_accuracy": base_accuracy, "ablated_accuracy": ablated_accuracy,
                   "accuracy_kept": ablated_accuracy / base_accuracy if base_accuracy > 0 else None,
                   "n_test": len(test), "embed_site": embed}
        return Result.from_per_example(embed_fit["per_dim"], metrics=metrics, details=details)
