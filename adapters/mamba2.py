"""Structured state-space duality: Mamba-2 (Hugging Face `Mamba2ForCausalLM`, pure-torch path on CPU).

Mamba-2 restricts Mamba's state matrix to a scalar times the identity per head, so each of
`num_heads` heads keeps a (head_dim, d_state) state h_t = exp(Δ_t a) h_{t-1} + Δ_t x_t B_tᵀ,
reads y_t = h_t C_t + D x_t, and the block gates and normalises y with silu(z) before the
output projection (Dao & Gu 2024, "Transformers are SSMs: generalized models and efficient
algorithms through structured state space duality", arXiv:2405.21060). transformers computes
it in chunks (the SSD algorithm: quadratic attention-like form within a chunk, recurrence
between chunks), so the per-step state is never materialised. The CUDA kernels of
`mamba-ssm` are an optional GPU extra: without them transformers runs its own torch code,
and this adapter needs nothing else.

As for Mamba-1 (Gu & Dao 2023, arXiv:2312.00752; adapters/mamba.py, whose `scan`,
`HookedScan` and adapter this file reuses), every mixer gets a `hook_state` HookPoint and a
forward that, *only while that HookPoint is hooked*, runs the same computation written out
sequentially (in_proj, transformers' own causal conv, softplus(dt + dt_bias) clamped to
`time_step_limit`, A_log, D, the gated RMSNorm, out_proj) while materialising the states
(batch, pos, heads, head_dim, d_state) and passing them through the HookPoint. The
sequential scan equals transformers' chunked one up to float rounding (about 1e-6 on
logits, tested to 1e-5), not bit for bit: a run that hooks a state site differs from the
plain forward by that rounding. With no hook on the state, the mixer is transformers'
forward, untouched.

Patching the state: the intervention sees the clean states of every step; at each
(example, step) where it returned a different value, the scan takes the returned state and
continues from it. So editing the state at step t changes outputs from t on exactly as
rerunning the scan from that state would, and leaves steps before t untouched. The cache of
an edited state site holds the states the scan actually used.

Hook points: `embed`, per block `blocks.{i}.ssm.state` (state), `blocks.{i}.ssm.out`
(mixer), `blocks.{i}.resid_post` (stream), then `logits`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2 import modeling_mamba2 as hf_mamba2

from archbench.adapters.mamba import HookedScan, MambaAdapter

STATE = ("batch", "pos", "heads", "head_dim", "d_state")


class HookedMamba2Mixer(HookedScan, hf_mamba2.Mamba2Mixer):
    """transformers' Mamba2Mixer whose per-step state is a HookPoint (see the module docstring)."""

    # Unhooked, transformers' chunked scan stays: it has no per-step indexing, and it trains
    # faster than the sequential loop (0.15 vs 0.20 s/step on recall, 0.19 vs 0.34 on parity).
    own_unhooked = False

    def scan_forward(self, hidden_states: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """transformers' full-sequence torch path as a sequential scan, states hookable."""
        dtype = hidden_states.dtype
        batch, T, _ = hidden_states.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        hidden_states = hf_mamba2.apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states)  # (B, T, d_inner + conv_dim + H)
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, H], dim=-1)
        xBC = hf_mamba2.causal_conv1d_fn(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1),
                                         self.conv1d.bias, activation=self.activation)  # (B, conv_dim, T)
        xBC = hf_mamba2.apply_mask_to_padding_states(xBC.transpose(1, 2), attention_mask)  # (B, T, conv_dim)
        x, B, C = torch.split(xBC, [self.intermediate_size, G * N, G * N], dim=-1)
        x = x.reshape(batch, T, H, P).float()  # (B, T, H, P)
        B = B.reshape(batch, T, G, N).float().repeat_interleave(H // G, dim=2)  # (B, T, H, N)
        C = C.reshape(batch, T, G, N).float().repeat_interleave(H // G, dim=2)  # (B, T, H, N)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))  # (B, T, H)
        dt = torch.clamp(dt, self.time_step_limit[0], self.time_step_limit[1]).float()  # (B, T, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        dA = torch.exp(dt * A)[..., None, None]  # (B, T, H, 1, 1)
        dBx = (dt[..., None] * x)[..., None] * B[:, :, :, None, :]  # (B, T, H, P, N)
        states = self.hooked_states(dA, dBx)  # (B, T, H, P, N)
        y = torch.einsum("bthpn,bthn->bthp", states, C)  # (B, T, H, P)
        y = y + self.D.float()[:, None] * x  # (B, T, H, P)
        y = self.norm(y.reshape(batch, T, H * P), gate)  # (B, T, d_inner)
        return self.out_proj(y.to(dtype))  # (B, T, d_model)


class Mamba2Adapter(MambaAdapter):
    hf_model_class = Mamba2ForCausalLM
    # Mamba-2 behind the Mamba adapter's hook points: transformers uses the same module paths
    # (backbone.embeddings, backbone.layers[i].mixer, backbone.norm_f, lm_head).
    family = "mamba2"
    # head_dim * n_heads = expand * d_model; chunk_size only changes how transformers
    # groups the scan (chunks of 8 so task-length sequences use the inter-chunk path too).
    default_config = {"d_model": 64, "n_layers": 2, "d_state": 16, "expand": 2, "d_conv": 4,
                      "head_dim": 16, "n_groups": 1, "chunk_size": 8}
    mixer_class = HookedMamba2Mixer
    state_axes = STATE

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> Mamba2ForCausalLM:
        if "hf_config" in config:  # a checkpoint's own config (its random-init control)
            return cls._prepare(Mamba2ForCausalLM(Mamba2Config.from_dict(config["hf_config"])))
        d_inner = config["expand"] * config["d_model"]
        if d_inner % config["head_dim"]:
            raise ValueError(f"mamba2: expand * d_model = {d_inner} is not a multiple of "
                             f"head_dim = {config['head_dim']}")
        hf = Mamba2Config(vocab_size=config["vocab_size"], hidden_size=config["d_model"],
                          num_hidden_layers=config["n_layers"], state_size=config["d_state"],
                          expand=config["expand"], conv_kernel=config["d_conv"],
                          head_dim=config["head_dim"], num_heads=d_inner // config["head_dim"],
                          n_groups=config["n_groups"], chunk_size=config["chunk_size"],
                          use_cache=False, tie_word_embeddings=False,
                          pad_token_id=None, bos_token_id=None, eos_token_id=None)
        return cls._prepare(Mamba2ForCausalLM(hf))

    @staticmethod
    def config_of(c) -> dict[str, Any]:
        """The adapter config of a checkpoint's transformers config (`hf_config` rebuilds it exactly)."""
        return {"vocab_size": c.vocab_size, "seq_len": None, "d_model": c.hidden_size,
                "n_layers": c.num_hidden_layers, "d_state": c.state_size, "expand": c.expand,
                "d_conv": c.conv_kernel, "head_dim": c.head_dim, "n_groups": c.n_groups,
                "chunk_size": c.chunk_size, "hf_config": c.to_dict()}
