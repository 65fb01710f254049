"""The Fourier-features technique (techniques/fourier.py) on planted and random-init models.

Planted: a tiny transformer for modadd (p = 23, 11 frequencies) whose residue embedding rows
are a pure 2-frequency Fourier embedding (k = 3 and 7, mixed into the model's width by a
random matrix) and whose residue unembedding rows are a pure embedding of k = 4 and 9: the
technique must name exactly those frequencies on each side and score ~1, and projecting
out a non-key frequency planted on top of the embedding must give the accuracy of the pure
model. Control: the random-init transformer scores near 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from archbench import registry
from archbench.techniques.fourier import Fourier, fourier_basis

torch.set_num_threads(1)
P = 23  # modadd's default modulus


def _pure(p: int, frequencies: tuple[int, ...], width: int, seed: int) -> torch.Tensor:
    """(p, width): cos and sin of each frequency over residues, mixed by a seeded random matrix."""
    r = torch.arange(p, dtype=torch.float64)  # (p,)
    waves = torch.stack([f(2 * math.pi * k * r / p) for k in frequencies for f in (torch.cos, torch.sin)], 1)  # (p, 2F)
    mix = torch.randn(waves.shape[1], width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (waves @ mix).float() * 0.05  # (p, width)


def _planted(task, embed_freqs=(3, 7), unembed_freqs=(4, 9), extra_freq=None):
    adapter = registry.adapter("transformer").for_task(task, seed=0)
    d = adapter.config["d_model"]
    with torch.no_grad():
        embedding = _pure(P, embed_freqs, d, seed=1)  # (p, d)
        if extra_freq is not None:
            embedding += 0.5 * _pure(P, (extra_freq,), d, seed=2)  # power off the key frequencies
        adapter.model.model.embed_tokens.weight[:P] = embedding
        adapter.model.lm_head.weight[:P] = _pure(P, unembed_freqs, d, seed=3)
    return adapter


def test_fourier_basis_is_orthonormal_with_each_frequency_twice():
    for p in (7, 8, 23):
        basis, frequency = fourier_basis(p)
        assert torch.allclose(basis.T @ basis, torch.eye(p, dtype=torch.float64), atol=1e-10)
        counts = torch.bincount(frequency).tolist()
        assert counts[0] == 1 and all(c == 2 for c in counts[1:p // 2 + (p % 2)])
        if p % 2 == 0:
            assert counts[p // 2] == 1  # the Nyquist frequency has a cosine only


def test_planted_two_frequency_embedding_is_found_exactly():
    task = registry.task("modadd")
    result = Fourier(n_key=2)(_planted(task), task, seed=0)
    assert result.applicable
    assert sorted(result.metrics["key_frequencies"]) == [3, 7]
    assert result.score > 0.9, result.score
    assert np.mean(result.per_example) == pytest.approx(result.score, abs=1e-9)  # the Result invariant
    assert len(result.per_example) == 64  # one value per embedding dimension
    assert sorted(result.metrics["key_frequencies_unembed"]) == [4, 9]
    assert result.metrics["score_unembed"] > 0.9
    assert result.metrics["overlap_embed_unembed"] == 0.0
    shares = {row["frequency"]: row["share_embed"] for row in result.details}
    assert sorted(shares) == list(range(1, P // 2 + 1))
    assert shares[3] + shares[7] == pytest.approx(1.0, abs=1e-6)
    # nothing off the key frequencies to project out: the ablated model is the model
    assert result.metrics["ablated_accuracy"] == result.metrics["base_accuracy"]


def test_projecting_out_a_non_key_frequency_gives_the_pure_models_accuracy():
    task = registry.task("modadd")
    noisy = Fourier(n_key=2)(_planted(task, extra_freq=5), task, seed=0)
    pure = Fourier(n_key=2)(_planted(task), task, seed=0)
    assert sorted(noisy.metrics["key_frequencies"]) == [3, 7]
    assert 0.5 < noisy.score < pure.score  # the planted k = 5 holds a share off the key set
    assert noisy.metrics["ablated_accuracy"] == pure.metrics["base_accuracy"]
    assert noisy.metrics["base_accuracy"] != pure.metrics["base_accuracy"]  # the k = 5 part mattered


def test_random_init_control_scores_near_zero():
    task = registry.task("modadd")
    for seed in (0, 1):
        result = Fourier()(registry.adapter("transformer").for_task(task, seed), task, seed)
        assert result.applicable
        assert result.score < 0.2, result.score  # measured 0.121 (seed 0), 0.108 (seed 1)
        assert result.metrics["key_share"] < 0.6  # the chance share is 5/11 = 0.455


def test_not_applicable_on_other_tasks_and_one_hot_inputs():
    parity = registry.task("parity")
    result = Fourier()(registry.adapter("transformer").for_task(parity, 0), parity, 0)
    assert not result.applicable and "parity" in result.reason
    modadd = registry.task("modadd")
    result = Fourier()(registry.adapter("nvar").for_task(modadd, 0), modadd, 0)
    assert not result.applicable and "one-hot" in result.reason


def test_a_family_without_readout_is_scored_on_the_embedding_alone():
    task = registry.task("modadd")
    adapter = registry.adapter("spiking").for_task(task, 0)
    assert "readout" not in adapter.capabilities
    result = Fourier()(adapter, task, 0)
    assert result.applicable and 0.0 <= result.score < 0.2
    assert result.metrics["key_share_unembed"] is None and result.metrics["overlap_embed_unembed"] is None


@pytest.mark.slow  # trains three transformers on modadd: about 40 s of one core, twice that on a shared one
def test_trained_transformer_concentrates_its_embedding():
    from archbench import zoo

    task = registry.task("modadd")
    for seed in (0, 1, 2):
        organism, meta = zoo.organism("transformer", task, seed)
        trained = Fourier()(organism, task, seed)
        control = Fourier()(zoo.control("transformer", task, seed), task, seed)
        assert trained.score > control.score + 0.5, (seed, trained.score, control.score)
        assert trained.metrics["accuracy_kept"] > 0.9
