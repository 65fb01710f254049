"""Gated DeltaNet: Qwen3-Next's linear-attention layers (Hugging Face `Qwen3NextForCausalLM`, torch path).

A Gated DeltaNet layer keeps, per value head, a fast-weight memory S (d_k x d_v) that it
decays and corrects by the delta rule at every step,
S_t = α_t S_{t-1} + β_t k_t (v_t - α_t S_{t-1}ᵀ k_t)ᵀ, and reads o_t = S_tᵀ q_t, with
α_t = exp(-exp(A_log) softplus(a_t + dt_bias)) a data-dependent gate and β_t = sigmoid(b_t)
the write strength (Yang, Kautz & Hatamizadeh 2025, "Gated delta networks: improving Mamba2
with delta rule", ICLR 2025). In Qwen3-Next, q, k and v pass a short causal depthwise
convolution (kernel `linear_conv_kernel_dim`) with SiLU, q and k are L2-normalised and q scaled
by 1/sqrt(d_k), and the read is normalised and gated by silu(z) before the output projection.
Blocks are pre-norm with zero-centred RMSNorms (scale 1 + w) and a SwiGLU MLP (or Qwen3-Next's
sparse MoE block where the config has experts). Organisms are built from a tiny
`Qwen3NextConfig` with every layer "linear_attention" and a dense MLP (`num_experts=0`);
`attention_layers` lists blocks that use Qwen3-Next's gated full attention instead (hooked at
its output only). `from_pretrained` wraps a local `save_pretrained` directory.

transformers computes the delta rule in chunks (`torch_chunk_gated_delta_rule`: a UT transform
within a chunk, a recurrence between chunks), so the per-step memory is never materialised.
Every Gated DeltaNet module gets a `hook_state` StateHookPoint and a forward that, *only while
that HookPoint is hooked*, runs the same layer with the delta rule written out as
transformers' `torch_recurrent_gated_delta_rule` (the same operations, bit-equal to it; it
equals the chunked form to float rounding, about 1e-7 on logits, tested to 1e-5) in O(T): the
inputs are `unbind`-ed over time once and the outputs stacked (transformers' recurrent loop
writes `core_attn_out[:, :, i]`, whose backward handles a whole (B, H, T, d_v) gradient at
every step). Unhooked in eval mode (every `Adapter.run`), on CUDA, or with a cache, the module
is transformers' forward, untouched. Unhooked in training mode on CPU (`fit`) it runs the same
scan without keeping states: transformers' torch chunked path pads every sequence to 64-step
chunks, so at task lengths it is slower (fwd+bwd of one layer at batch 128, 4 heads of 16x16,
T = 17: 195 ms chunked vs 55 ms scanned; T = 3: 207 vs 9 ms, measured on a shared CPU), and
the two differ only by float rounding (gradients tested to 1e-5).

`blocks.{i}.deltanet.state` has axes (batch, pos, heads, d_k, d_v): heads are the value
heads (key heads repeated for grouped value attention, as transformers does). The state at
position t is the state that step t *reads*: S_{t-1}, the memory after tokens 0..t-1 (zero at
t=0); step t decays it, writes token t and reads the result. Editing it at step t therefore
changes outputs from t on, exactly as running the delta rule on from that state would, and
leaves steps before t untouched. The intervention sees the clean states; where (example, step)
it returned a different value, the recurrence takes that state and continues from it. The cache
of an edited state site holds the states the recurrence actually used. The causal
convolution's state (the previous kernel-1 positions' q, k, v inputs) is not a hook point: it
is the neighbouring positions' mixer input, so a source that differs from the clean run
within kernel-1 positions before t still changes that layer's q, k, v at t after a state patch.
With gradients (`run(..., grad=True)`) the states the hook sees, and the cache, are a leaf
wired into every step as `+ (S - S.detach())` (exactly zero; archbench/stepwise.py's trick),
so the gradient with respect to the state at t runs through every later step (tested against
finite differences); finding their values costs one extra pass without a graph.

Hook points: `embed`, per block `blocks.{i}.deltanet.state` (state),
`blocks.{i}.deltanet.out` (mixer; `blocks.{i}.attn.out` for a full-attention block),
`blocks.{i}.mlp.out` (mlp), `blocks.{i}.resid_post` (stream), then `logits`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next import modeling_qwen3_next as hf_qwen3_next

from archbench.adapter import Adapter, Hook, Site, hook
from archbench.hf_checkpoint import FromPretrained
from archbench.hooks import StateHookPoint

D = ("batch", "pos", "d_model")
STATE = ("batch", "pos", "heads", "d_k", "d_v")
LAYER_TYPES = ("linear_attention", "full_attention")


def delta_rule_scan(query, key, value, decay, beta, edited=None, changed=None, used=None, keep_states=True):
    """transformers' `torch_recurrent_gated_delta_rule` in O(T), also returning the state read at each step.

    Inputs as the layer hands them to transformers (before L2 norm): query, key (B, T, H_k, d_k),
    value (B, T, H, d_v), decay (log α) and beta (B, T, H). `edited` (B, T, H, d_k, d_v) with
    `changed` (B, T) bool replaces the state read at the changed steps; where `edited` needs a
    gradient it is also wired into the unchanged steps as `+ (e - e.detach())`, exactly zero, so
    its gradient is that of the state read there (through every later step). `used`, a leaf
    (B, T, H, d_k, d_v), is filled with the states read and wired in the same way. Returns the
    outputs (B, T, H, d_v) in the input dtype and the states read (B, T, H, d_k, d_v), or None
    unless `keep_states`.
    """
    dtype = query.dtype
    heads = value.shape[2]
    if key.shape[2] != heads:  # grouped value attention: each key head serves consecutive value heads
        query = query.repeat_interleave(heads // key.shape[2], dim=2)
        key = key.repeat_interleave(heads // key.shape[2], dim=2)
    query, key, value, beta, decay = (x.float() for x in (query, key, value, beta, decay))
    query = hf_qwen3_next.l2norm(query, dim=-1, eps=1e-6)  # (B, T, H, d_k)
    key = hf_qwen3_next.l2norm(key, dim=-1, eps=1e-6)  # (B, T, H, d_k)
    query = query / (query.shape[-1] ** 0.5)
    batch, T, _, d_k = key.shape
    memory = torch.zeros(batch, heads, d_k, value.shape[-1], dtype=value.dtype, device=value.device)  # (B, H, d_k, d_v)
    edits = zip(edited.unbind(1), changed.unbind(1)) if edited is not None else [None] * T
    used_steps = used.unbind(1) if used is not None else [None] * T  # views, one `unbind`
    outputs, states = [], []
    steps = zip(query.unbind(1), key.unbind(1), value.unbind(1), decay.unbind(1), beta.unbind(1), edits, used_steps)
    for t, (q_t, k_t, v_t, decay_t, beta_t, edit, used_t) in enumerate(steps):  # (B, H, d_k) q, k; (B, H, d_v) v
        if edit is not None:
            e, c = edit[0].to(memory), edit[1][:, None, None, None]  # (B, H, d_k, d_v), (B, 1, 1, 1)
            memory = torch.where(c, e, memory + (e - e.detach()) if e.requires_grad else memory)
        if used_t is not None:
            used.data[:, t] = memory.detach()  # autograd never sees this write (stepwise.py's leaf)
            memory = memory + (used_t - used_t.detach())
        if keep_states:
            states.append(memory)
        # the operations of transformers' loop, in its order (bit-equal outputs)
        memory = memory * decay_t.exp()[..., None, None]
        kv_mem = (memory * k_t.unsqueeze(-1)).sum(dim=-2)  # (B, H, d_v)
        delta = (v_t - kv_mem) * beta_t.unsqueeze(-1)  # (B, H, d_v)
        memory = memory + k_t.unsqueeze(-1) * delta.unsqueeze(-2)  # (B, H, d_k, d_v)
        outputs.append((memory * q_t.unsqueeze(-1)).sum(dim=-2))  # (B, H, d_v)
    out = torch.stack(outputs, 1).to(dtype)  # (B, T, H, d_v)
    return out, torch.stack(states, 1) if keep_states else None


class HookedGatedDeltaNet(hf_qwen3_next.Qwen3NextGatedDeltaNet):
    """transformers' Gated DeltaNet whose per-step memory is a StateHookPoint (see the module docstring)."""

    hook_state: StateHookPoint

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        hook_point = self.hook_state
        if cache is not None or not (hook_point.hooked or (self.training and not hidden_states.is_cuda)):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        query, key, value, z, decay, beta = self.delta_inputs(hidden_states, attention_mask)
        if not hook_point.hooked:  # training on CPU: the scan, no states kept (module docstring)
            out, _ = delta_rule_scan(query, key, value, decay, beta, keep_states=False)
            return self.readout(out, z)
        if not torch.is_grad_enabled():
            out, clean = delta_rule_scan(query, key, value, decay, beta)
            states = hook_point(clean)  # (B, T, H, d_k, d_v)
            if states is not clean:  # edited: rerun the recurrence through the edited steps
                changed = (states != clean).flatten(2).any(-1)  # (B, T)
                out, states = delta_rule_scan(query, key, value, decay, beta, states, changed)
                hook_point.used = states  # the states the recurrence used, for Adapter.run's cache
            return self.readout(out, z)
        # With gradients, the states the hook sees (and caches) are a leaf wired into the
        # recurrence, so d(output)/d(state at t) runs through every later step (a stacked copy
        # of the loop's states would be a dead end): a first pass without a graph finds them.
        with torch.no_grad():
            _, clean = delta_rule_scan(query, key, value, decay, beta)
        clean.requires_grad_(True)  # (B, T, H, d_k, d_v)
        states = hook_point(clean)
        changed = (states != clean).flatten(2).any(-1)  # (B, T)
        used = torch.zeros_like(clean).requires_grad_(True) if states is not clean else None
        out, _ = delta_rule_scan(query, key, value, decay, beta, states, changed, used, keep_states=False)
        if used is not None:
            hook_point.used = used  # the states the recurrence used, a leaf wired in the same way
        return self.readout(out, z)

    def delta_inputs(self, hidden_states, attention_mask=None):
        """transformers' forward up to the delta rule (no cache): q, k (B, T, H_k, d_k), v and z
        (B, T, H, d_v), log decay g and beta (B, T, H)."""
        hidden_states = hf_qwen3_next.apply_mask_to_padding_states(hidden_states, attention_mask)  # (B, T, d)
        query, key, value, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(hidden_states),
                                                                       self.in_proj_ba(hidden_states))
        query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
        mixed_qkv = torch.cat((query, key, value), dim=-1).transpose(1, 2)  # (B, conv_dim, T)
        # `causal_conv1d_fn` (transformers' no-cache path; 5.25 wraps it in `causal_conv1d_forward`)
        mixed_qkv = hf_qwen3_next.causal_conv1d_fn(mixed_qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                                   activation=self.activation)  # (B, conv_dim, T)
        query, key, value = torch.split(mixed_qkv.transpose(1, 2), [self.key_dim, self.key_dim, self.value_dim],
                                        dim=-1)  # (B, T, key_dim), (B, T, key_dim), (B, T, value_dim)
        query = query.reshape(query.shape[0], query.shape[1], -1, self.head_k_dim)  # (B, T, H_k, d_k)
        key = key.reshape(key.shape[0], key.shape[1], -1, self.head_k_dim)  # (B, T, H_k, d_k)
        value = value.reshape(value.shape[0], value.shape[1], -1, self.head_v_dim)  # (B, T, H, d_v)
        beta = b.sigmoid()  # (B, T, H)
        decay = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # (B, T, H), log α
        return query, key, value, z, decay, beta

    def readout(self, core_attn_out, z):
        """transformers' forward after the delta rule: gated RMSNorm by z, then out_proj."""
        batch, T = z.shape[:2]
        normed = self.norm(core_attn_out.reshape(-1, core_attn_out.shape[-1]), z.reshape(-1, z.shape[-1]))
        return self.out_proj(normed.reshape(batch, T, -1))  # (B, T, d_model)


class DeltaNetAdapter(FromPretrained, Adapter):
    hf_model_class = Qwen3NextForCausalLM
    family = "deltanet"
    capabilities = frozenset({"gradients", "trainable", "recurrent_state", "readout"})
    # n_heads value heads (and as many key heads) of d_head x d_head memories; attention_layers:
    # blocks that use gated full attention (n_heads heads of d_head) instead of Gated DeltaNet
    default_config = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_key_heads": 4, "d_head": 8,
                      "d_conv": 4, "d_mlp": 128, "attention_layers": []}
    # Measured at seed 0 (d_head 8; CPU seconds on a shared 2-core machine): facts 200 steps,
    # 7 s; count 300 steps, 18 s (seed 1 the same); no override needed for either.
    task_train_config = {
        # as the transformer's: 3000 steps -> held-out 0.945 (validation 0.90-0.95 from step 1600)
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192, "grad_clip": 1.0},
        # fails the gate: held-out 0.495, at chance from step 100 to the plateau stop at 1100
        # (also at lr 3e-3 with 8 heads, 0.514, and with plateau_steps 1500, 0.486 at 1600)
        "parity": {"steps": 2500},
        # lr 3e-3: 1300 steps, held-out 0.989 (d_head 16 at lr 1e-3: 1200 steps, 0.993)
        "recall": {"lr": 3e-3},
    }

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> Qwen3NextForCausalLM:
        if "hf_config" in config:  # a checkpoint's own config (its random-init control)
            return cls._prepare(Qwen3NextForCausalLM(Qwen3NextConfig.from_dict(config["hf_config"])))
        n_layers, attention = config["n_layers"], set(config["attention_layers"])
        if not attention <= set(range(n_layers)):
            raise ValueError(f"deltanet: attention_layers {sorted(attention)} must be block indices < n_layers={n_layers}")
        if config["n_heads"] % config["n_key_heads"]:
            raise ValueError(f"deltanet: n_heads={config['n_heads']} must be a multiple of "
                             f"n_key_heads={config['n_key_heads']}")
        hf = Qwen3NextConfig(
            vocab_size=config["vocab_size"], max_position_embeddings=max(config["seq_len"] or 0, 64),
            hidden_size=config["d_model"], intermediate_size=config["d_mlp"], num_hidden_layers=n_layers,
            layer_types=["full_attention" if i in attention else "linear_attention" for i in range(n_layers)],
            linear_num_value_heads=config["n_heads"], linear_num_key_heads=config["n_key_heads"],
            linear_key_head_dim=config["d_head"], linear_value_head_dim=config["d_head"],
            linear_conv_kernel_dim=config["d_conv"],
            num_attention_heads=config["n_heads"], num_key_value_heads=config["n_heads"], head_dim=config["d_head"],
            num_experts=0, mlp_only_layers=list(range(n_layers)),  # a dense SwiGLU MLP in every block
            use_cache=False, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return cls._prepare(Qwen3NextForCausalLM(hf))

    @staticmethod
    def _prepare(model: Qwen3NextForCausalLM) -> Qwen3NextForCausalLM:
        unknown = sorted(set(model.config.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"deltanet hooks layer types {list(LAYER_TYPES)}; this config has {unknown}")
        for layer in model.model.layers:
            if layer.block_type == "linear_attention" and not isinstance(layer.linear_attn, HookedGatedDeltaNet):
                layer.linear_attn.__class__ = HookedGatedDeltaNet  # same parameters, one HookPoint more
                layer.linear_attn.hook_state = StateHookPoint()
        return model.eval()

    @staticmethod
    def config_of(c) -> dict[str, Any]:
        """The adapter config of a checkpoint's transformers config (`hf_config` rebuilds it exactly)."""
        return {"vocab_size": c.vocab_size, "seq_len": None, "d_model": c.hidden_size,
                "n_layers": c.num_hidden_layers, "n_heads": c.linear_num_value_heads,
                "n_key_heads": c.linear_num_key_heads, "d_head": c.linear_key_head_dim,
                "d_conv": c.linear_conv_kernel_dim, "d_mlp": c.intermediate_size,
                "attention_layers": [i for i, t in enumerate(c.layer_types) if t == "full_attention"],
                "hf_config": c.to_dict()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(stream))  # (B, T, vocab)

    def hooks(self) -> list[Hook]:
        body = self.model.model
        out = [hook("embed", "embed", D, 0, Site(body.embed_tokens))]
        for i, layer in enumerate(body.layers):
            if layer.block_type == "linear_attention":
                out += [hook(f"blocks.{i}.deltanet.state", "state", STATE, i, Site(layer.linear_attn.hook_state)),
                        hook(f"blocks.{i}.deltanet.out", "mixer", D, i, Site(layer.linear_attn))]
            else:
                out.append(hook(f"blocks.{i}.attn.out", "mixer", D, i, Site(layer.self_attn, index=0)))
            out += [hook(f"blocks.{i}.mlp.out", "mlp", D, i, Site(layer.mlp)),
                    hook(f"blocks.{i}.resid_post", "stream", D, i + 1, Site(layer))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), len(body.layers) + 1,
                           Site(self.model.lm_head))]
