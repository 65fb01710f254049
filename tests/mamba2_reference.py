"""A Mamba-2 mixer's recurrence written out by hand, the reference the hooked-scan tests check.

Shared by the Mamba-2 adapter's tests and the hybrid (Bamba) adapter's, whose Mamba layers
have the same mixer: x, B, C, dt and dA recomputed independently from `in_proj`, `conv1d`,
`dt_bias` and `A_log`, one step of Dao & Gu 2024, eq. (1), and the mixer output of a scan
rerun from a given state at step t.
"""

import torch
from torch.nn import functional as F


def ssm_inputs(mixer, hidden):
    """x (B, T, H, P), B and C (B, T, H, N), dt and dA (B, T, H) of a mixer on `hidden`."""
    H, P, G, N = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    b, t, _ = hidden.shape
    _, xBC, dt = mixer.in_proj(hidden).split([mixer.intermediate_size, mixer.conv_dim, H], -1)
    xBC = F.silu(mixer.conv1d(xBC.transpose(1, 2))[..., :t]).transpose(1, 2)  # (B, T, conv_dim)
    x, B, C = xBC.split([H * P, G * N, G * N], -1)
    x = x.reshape(b, t, H, P)  # (B, T, H, P)
    B = B.reshape(b, t, G, 1, N).expand(b, t, G, H // G, N).reshape(b, t, H, N)  # (B, T, H, N)
    C = C.reshape(b, t, G, 1, N).expand(b, t, G, H // G, N).reshape(b, t, H, N)
    dt = F.softplus(dt + mixer.dt_bias)  # (B, T, H)
    dA = torch.exp(dt * -torch.exp(mixer.A_log))  # (B, T, H)
    return x, B, C, dt, dA


def step(h, s, x, B, dt, dA):
    """One step with scalar A per head: h = exp(Δa) h + Δ x Bᵀ; h (B, H, P, N)."""
    return dA[:, s, :, None, None] * h + dt[:, s, :, None, None] * x[:, s, :, :, None] * B[:, s, :, None, :]


def reference_states(mixer, hidden):
    """The state after every step from a zero state: (B, T, H, P, N)."""
    x, B, _, dt, dA = ssm_inputs(mixer, hidden)
    h, out = torch.zeros(x.shape[0], *x.shape[2:], B.shape[-1]), []  # (B, H, P, N)
    for s in range(x.shape[1]):
        h = step(h, s, x, B, dt, dA)
        out.append(h)
    return torch.stack(out, 1)  # (B, T, H, P, N)


def rerun_from(mixer, hidden, state, t):
    """The scan rerun from `state` (B, H, P, N) at step t: the states of steps t.. (B, T - t,
    H, P, N) and the mixer's output there (B, T - t, d_model)."""
    x, B, C, dt, dA = ssm_inputs(mixer, hidden)
    h, rerun = state, [state]
    for s in range(t + 1, x.shape[1]):
        h = step(h, s, x, B, dt, dA)
        rerun.append(h)
    states = torch.stack(rerun, 1)  # (B, T - t, H, P, N)
    y = torch.einsum("bthpn,bthn->bthp", states, C[:, t:]) + mixer.D[:, None] * x[:, t:]
    gate = mixer.in_proj(hidden)[..., :mixer.intermediate_size]
    return states, mixer.out_proj(mixer.norm(y.flatten(2), gate[:, t:]))  # (B, T - t, d_model)
