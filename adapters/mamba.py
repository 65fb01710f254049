"""Selective state-space model: Mamba (Hugging Face `MambaForCausalLM`, pure-torch path on CPU).

Each block mixes tokens with a selective scan h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,
y_t = C_t h_t + D x_t, gated by silu(z) (Gu & Dao 2023, "Mamba: linear-time sequence modeling
with selective state spaces"; Gu et al. 2022, S4). Organisms are built from a tiny
`MambaConfig`; `from_pretrained` wraps a local `save_pretrained` directory. The CUDA kernels
of `mamba-ssm` are an optional GPU extra: without them transformers runs its own torch scan,
and this adapter needs nothing else.

The per-step SSM state is not a module output in transformers (and `conv1d`, `act`,
`dt_proj` are used as weights, not called as modules, so hooks on them never fire). Every
mixer therefore gets a `hook_state` HookPoint and a forward that runs the same computation
written out here (in_proj, transformers' own causal conv, x_proj, dt_proj, A_log, D, the
same sequential scan); *while that HookPoint is hooked* it materialises the states
(batch, pos, d_inner, d_state) and passes them through the HookPoint. Both paths are tested
bit-equal to transformers' own mixer in the forward and equal to about 1e-6 in gradients.
The scan is O(T): transformers' torch scan indexes `discrete_A[:, :, t]` at every step,
whose backward zero-fills a whole (batch, d_inner, T, d_state) gradient per step (O(T^2));
here the inputs are `unbind`-ed once, and unhooked the states are discretised step by step
with each output computed in the loop (about half the seconds per training step,
bench/scan_step.py). With an inference cache, or unhooked on CUDA (where mamba-ssm's
kernels may apply), the mixer is transformers' forward, untouched. The scan and this
dispatch (`scan`, `HookedScan`) are shared with the Mamba-2 adapter (adapters/mamba2.py).

Patching the state: the intervention sees the clean states of every step; at each
(example, step) where it returned a different value, the scan takes the returned state and
continues from it; elsewhere the recurrence runs on from the (possibly edited) previous
state. So editing the state at step t changes outputs from t on exactly as rerunning the scan
from that state would, and leaves steps before t untouched. The cache of an edited state site
holds the states the scan actually used.

Hook points: `embed`, per block `blocks.{i}.ssm.state` (state), `blocks.{i}.ssm.out`
(mixer), `blocks.{i}.resid_post` (stream), then `logits`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.nn import functional as F
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba import modeling_mamba as hf_mamba

from archbench.adapter import Adapter, Hook, Site, hook
from archbench.hf_checkpoint import FromPretrained
from archbench.hooks import StateHookPoint

D = ("batch", "pos", "d_model")
STATE = ("batch", "pos", "d_inner", "d_state")


def scan(dA: torch.Tensor, dBx: torch.Tensor, edited: torch.Tensor | None = None,
         changed: torch.Tensor | None = None) -> torch.Tensor:
    """The sequential linear recurrence h_t = dA_t * h_{t-1} + dBx_t from h_{-1} = 0, over axis 1.

    dA broadcasts against dBx (batch, T, *state). Where `changed[b, t]`, the state at t is
    `edited[b, t]` instead and the recurrence runs on from it. Returns (batch, T, *state).
    Shared by the Mamba-1 and Mamba-2 adapters.

    The inputs are split with `unbind` once, not indexed per step: the backward of `x[:, t]`
    zero-fills a gradient the size of all of `x` at every step, which made the backward
    O(T^2) in the (batch, T, d_inner, d_state) tensors; `unbind`'s backward is one stack.
    """
    state = torch.zeros_like(dBx[:, 0])  # (B, *state)
    steps = zip(dA.unbind(1), dBx.unbind(1))  # T pairs of (B, *state)
    if edited is None:
        states = []
        for a, bx in steps:
            state = a * state + bx  # (B, *state)
            states.append(state)
        return torch.stack(states, 1)  # (B, T, *state)
    states = []
    shape = (-1, *([1] * (dBx.dim() - 2)))  # (B, 1, ...)
    for (a, bx), e, c in zip(steps, edited.unbind(1), changed.unbind(1)):
        state = torch.where(c.view(shape), e, a * state + bx)  # (B, *state)
        states.append(state)
    return torch.stack(states, 1)  # (B, T, *state)


def scan_readout(steps: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 readout: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """The recurrence of `scan` with each step's output `readout(h_t, C_t)` computed in the loop.

    For the unhooked forward, where the states are never stacked: `steps` yields
    (dA_t, dBx_t, C_t) per step (computed step by step by the caller, which is faster than
    slicing whole-sequence tensors). Returns the T outputs, equal to `readout` applied to
    `scan`'s states step by step.
    """
    state, out = None, []
    for a, bx, c in steps:
        state = a * (torch.zeros_like(bx) if state is None else state) + bx  # (B, *state)
        out.append(readout(state, c))
    return out


class HookedScan:
    """Mixin for a transformers SSM mixer: its per-step state is a HookPoint (module docstring).

    Without an inference cache, `scan_forward` (which the mixer class writes out) runs
    instead of transformers' forward and routes its states through `hooked_states` while
    `hook_state` is hooked. Unhooked, transformers' own forward runs if `own_unhooked` is
    False or the input is on CUDA (where transformers' kernels may apply), else
    `scan_forward`'s unhooked path.
    """

    hook_state: StateHookPoint
    own_unhooked: bool = False

    @property
    def hooked(self) -> bool:
        hook = self.hook_state
        return bool(hook._forward_hooks or hook._forward_pre_hooks)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if cache is not None or (not self.hooked and (not self.own_unhooked or hidden_states.is_cuda)):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        return self.scan_forward(hidden_states, attention_mask)

    def hooked_states(self, dA: torch.Tensor, dBx: torch.Tensor) -> torch.Tensor:
        """Run the scan, pass its states through `hook_state`, and rerun it through any edit
        (recording the states it then used on the hook point, for `Adapter.run`'s cache)."""
        clean = scan(dA, dBx)  # (B, T, *state)
        states = self.hook_state(clean)
        if states is not clean:  # an intervention edited some steps: rerun the scan through them
            changed = (states != clean).flatten(2).any(-1)  # (B, T)
            states = scan(dA, dBx, states, changed)
            self.hook_state.used = states
        return states


class HookedMambaMixer(HookedScan, hf_mamba.MambaMixer):
    """transformers' MambaMixer whose per-step state is a HookPoint (see the module docstring)."""

    own_unhooked = True  # transformers' torch scan indexes per step: an O(T^2) backward

    def scan_forward(self, hidden_states: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """transformers' full-sequence torch path in O(T), the states hookable."""
        dtype = hidden_states.dtype
        hidden_states = hf_mamba.apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, T)
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        x, gate = projected.chunk(2, dim=1)  # (B, d_inner, T) each
        x = hf_mamba.causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                      activation=self.activation)  # (B, d_inner, T)
        x = hf_mamba.apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # (B, T, d_inner)
        time_step, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size,
                                                       self.ssm_state_size], dim=-1)  # (B, T, r|n|n)
        dt = self.dt_proj.weight @ time_step.transpose(1, 2)  # (B, d_inner, T)
        u = x.transpose(1, 2)  # (B, d_inner, T)
        input_dtype = u.dtype
        dt = F.softplus(dt + self.dt_proj.bias.float()[..., None])  # (B, d_inner, T)

        def readout(h, c):  # (B, d_inner, d_state), (B, d_state) -> (B, d_inner), as transformers
            return torch.matmul(h.to(input_dtype), c.unsqueeze(-1))[:, :, 0]

        if self.hooked:
            dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # (B, d_inner, T, d_state)
            dBu = dt[:, :, :, None] * B[:, None, :, :].float() * u[:, :, :, None].float()  # (B, d_inner, T, d_state)
            states = self.hooked_states(dA.transpose(1, 2), dBu.transpose(1, 2))  # (B, T, d_inner, d_state)
            ys = [readout(h, c) for h, c in zip(states.unbind(1), C.unbind(1))]
        else:  # the same values, discretised step by step (no (B, d_inner, T, d_state) tensors)
            steps = ((torch.exp(A[None] * dt_t[:, :, None]),  # (B, d_inner, d_state)
                      dt_t[:, :, None] * B_t[:, None, :].float() * u_t[:, :, None].float(), C_t)
                     for dt_t, B_t, C_t, u_t in zip(dt.unbind(2), B.unbind(1), C.unbind(1), u.unbind(2)))
            ys = scan_readout(steps, readout)
        y = torch.stack(ys, dim=-1)  # (B, d_inner, T)
        y = (y + u * self.D.float()[None, :, None]) * F.silu(gate)  # (B, d_inner, T)
        return self.out_proj(y.transpose(1, 2).to(dtype))  # (B, T, d_model)


class MambaAdapter(FromPretrained, Adapter):
    hf_model_class = MambaForCausalLM
    family = "mamba"
    capabilities = frozenset({"gradients", "trainable", "recurrent_state", "readout"})
    default_config = {"d_model": 64, "n_layers": 2, "d_state": 16, "expand": 2, "d_conv": 4}
    mixer_class = HookedMambaMixer
    state_axes = STATE
    task_train_config = {
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192},
        "parity": {"steps": 2500},
        # lr 3e-3 (measured, seed 0): 2000 -> 700 steps, held-out 0.986 -> 0.989 (mamba2 inherits
        # this table)
        "recall": {"lr": 3e-3},
    }

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> MambaForCausalLM:
        if "hf_config" in config:  # a checkpoint's own config (its random-init control)
            return cls._prepare(MambaForCausalLM(MambaConfig.from_dict(config["hf_config"])))
        hf = MambaConfig(vocab_size=config["vocab_size"], hidden_size=config["d_model"],
                         num_hidden_layers=config["n_layers"], state_size=config["d_state"],
                         expand=config["expand"], conv_kernel=config["d_conv"], use_mambapy=False,
                         use_cache=False, tie_word_embeddings=False,
                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
        return cls._prepare(MambaForCausalLM(hf))

    @classmethod
    def _prepare(cls, model: MambaForCausalLM) -> MambaForCausalLM:
        for block in model.backbone.layers:
            if not isinstance(block.mixer, cls.mixer_class):
                block.mixer.__class__ = cls.mixer_class  # same parameters, one HookPoint more
                block.mixer.hook_state = StateHookPoint()
        return model.eval()

    @staticmethod
    def config_of(c) -> dict[str, Any]:
        """The adapter config of a checkpoint's transformers config (`hf_config` rebuilds it exactly)."""
        return {"vocab_size": c.vocab_size, "seq_len": None, "d_model": c.hidden_size,
                "n_layers": c.num_hidden_layers, "d_state": c.state_size, "expand": c.expand,
                "d_conv": c.conv_kernel, "hf_config": c.to_dict()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.backbone.norm_f(stream))  # (B, T, vocab)

    def hooks(self) -> list[Hook]:
        backbone = self.model.backbone
        out = [hook("embed", "embed", D, 0, Site(backbone.embeddings))]
        for i, block in enumerate(backbone.layers):
            out += [hook(f"blocks.{i}.ssm.state", "state", self.state_axes, i, Site(block.mixer.hook_state)),
                    hook(f"blocks.{i}.ssm.out", "mixer", D, i, Site(block.mixer)),
                    hook(f"blocks.{i}.resid_post", "stream", D, i + 1, Site(block))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), len(backbone.layers) + 1,
                           Site(self.model.lm_head))]
