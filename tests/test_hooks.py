"""Each intervention changes exactly what it should; hooks never outlive a run."""

import pytest
import torch

from archbench.hooks import Add, HookSpec, Mean, Patch, Project, Zero, position_mask

SPEC = HookSpec("x", "stream", ("batch", "pos", "d"))


def act():
    return torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4) + 1  # (B=2, T=3, d=4)


def test_zero_everywhere_and_at_positions():
    a = act()
    assert torch.equal(Zero()(a, SPEC), torch.zeros_like(a))
    out = Zero(positions=[1])(a, SPEC)
    assert torch.equal(out[:, 1], torch.zeros(2, 4))
    assert torch.equal(out[:, [0, 2]], a[:, [0, 2]])


def test_mean_replaces_with_given_values():
    a, m = act(), torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = Mean(m, positions=2)(a, SPEC)
    assert torch.equal(out[:, 2], m.expand(2, 4))
    assert torch.equal(out[:, :2], a[:, :2])


def test_patch_per_example_positions():
    a, src = act(), -act()
    out = Patch(src, positions=torch.tensor([0, 2]))(a, SPEC)
    assert torch.equal(out[0, 0], src[0, 0]) and torch.equal(out[1, 2], src[1, 2])
    untouched = torch.ones(2, 3, dtype=torch.bool)
    untouched[0, 0] = untouched[1, 2] = False
    assert torch.equal(out[untouched], a[untouched])


def test_patch_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="source shape"):
        Patch(torch.zeros(1, 3, 4))(act(), SPEC)


def test_add_scales_vector():
    a, v = act(), torch.tensor([1.0, 0.0, 0.0, 0.0])
    out = Add(v, scale=3.0, positions=[0])(a, SPEC)
    assert torch.equal(out[:, 0, 0], a[:, 0, 0] + 3)
    assert torch.equal(out[:, 0, 1:], a[:, 0, 1:]) and torch.equal(out[:, 1:], a[:, 1:])


def test_project_removes_direction_and_keeps_orthogonal_part():
    a = torch.randn(2, 3, 4)
    d = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    out = Project(d)(a, SPEC)
    assert torch.allclose(out @ d[0], torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(out[..., 2:], a[..., 2:])


def test_position_mask_forms():
    assert position_mask(None, 2, 3) is None
    assert position_mask(1, 2, 3).tolist() == [[False, True, False]] * 2
    assert position_mask(torch.tensor([2, 0]), 2, 3).tolist() == [[False, False, True], [True, False, False]]
    with pytest.raises(ValueError):
        position_mask(torch.tensor([0, 1, 2]), 2, 3)


def test_unknown_role_and_bad_axes_rejected():
    with pytest.raises(ValueError, match="unknown role"):
        HookSpec("x", "residual", ("batch", "pos"))
    with pytest.raises(ValueError, match="axes"):
        HookSpec("x", "stream", ("pos", "batch"))
