"""Shared fixtures: one torch thread, an isolated organism cache, tiny models."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own $ARCHBENCH_CACHE so no test reads another's organisms."""
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gpt():
    """A random-init reference (Llama-style) transformer sized for a 6-token, 10-symbol task."""
    from archbench.adapters.transformer import TransformerAdapter

    return TransformerAdapter.build(vocab_size=10, seq_len=6, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))  # (B, T)
