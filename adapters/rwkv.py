"""Linear-attention RNN: RWKV-4 (Hugging Face `RwkvForCausalLM`, CPU path, `rescale_every=0`).

Each block has a time-mixing WKV recurrence (an exponentially decaying, key-weighted average
of past values, read through a sigmoid receptance) and a channel-mixing feed-forward, both
with token shift (Peng et al. 2023, "RWKV: reinventing RNNs for the transformer era").
Organisms are built from a tiny `RwkvConfig` with `rescale_every=0` (no inference-time
rescaling, so training and evaluation compute the same function); `from_pretrained` wraps a
local `save_pretrained` directory. RWKV `.pth` checkpoints (v4-v6, inference only) load
through the `rwkv` package in adapters/rwkv_pth.py instead.

The WKV state is not a module output. Every time-mixing module gets a `hook_state` HookPoint
and a forward that runs transformers' CPU WKV loop (same operations, tested bit-equal in the
forward and to about 1e-6 in gradients) in O(T): transformers indexes `key[:, t]` and writes
`output[:, t]`, whose backward handles a whole (batch, T, d_att) gradient at every step;
here the inputs are `unbind`-ed once and the outputs stacked. *While that HookPoint is
hooked* the loop also materialises the state. With an inference state or cache, or unhooked
on CUDA (transformers' kernel), the module is transformers' forward, untouched. `blocks.{i}.wkv.state`
has axes (batch, pos, wkv_part, d_att): wkv_part 0, 1, 2 are transformers' numerically
stabilised (numerator, denominator, max exponent), so the real numerator is
num * exp(max). The state at position t is the state that step t *reads* (the summary of
tokens 0..t-1; at t=0 the initial state (0, 0, -1e38)): the output at t combines it with the
current key and value. Editing it at step t therefore changes outputs from t on, exactly as
running the recurrence on from that state would, and leaves steps before t untouched. The
intervention sees the clean states; where (example, step) it returned a different value, the
recurrence takes that state and continues from it. The cache of an edited state site holds
the states the recurrence actually used. (The token-shift state, the previous step's input,
is not a hook point: it is the neighbouring position's `resid` input.)

Hook points: `embed`, per block `blocks.{i}.wkv.state` (state), `blocks.{i}.wkv.out`
(mixer), `blocks.{i}.ffn.out` (mlp), `blocks.{i}.resid_post` (stream), then `logits`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import RwkvConfig, RwkvForCausalLM
from transformers.models.rwkv.modeling_rwkv import RwkvSelfAttention

from archbench.adapter import Adapter, Hook, Site, hook
from archbench.hf_checkpoint import FromPretrained
from archbench.hooks import StateHookPoint

D = ("batch", "pos", "d_model")
STATE = ("batch", "pos", "wkv_part", "d_att")


class HookedRwkvSelfAttention(RwkvSelfAttention):
    """transformers' RWKV time mixing whose per-step WKV state is a HookPoint."""

    hook_state: StateHookPoint

    def forward(self, hidden, state=None, use_cache=False):
        hook = self.hook_state
        hooked = bool(hook._forward_hooks or hook._forward_pre_hooks)
        if state is not None or use_cache or (not hooked and hidden.is_cuda):
            return super().forward(hidden, state=state, use_cache=use_cache)
        receptance, key, value, _ = self.extract_key_value(hidden)  # (B, T, d_att) each
        if not hooked:  # transformers' CPU loop indexes per step: an O(T^2) backward
            out, _ = self.wkv(key, value, keep_states=False)
            return self.output(receptance * out), None
        out, clean = self.wkv(key, value)
        states = self.hook_state(clean)  # (B, T, 3, d_att)
        if states is not clean:  # edited: rerun the recurrence through the edited steps
            changed = (states != clean).flatten(2).any(-1)  # (B, T)
            out, states = self.wkv(key, value, states, changed)
            self.hook_state.used = states  # the states the recurrence used, for Adapter.run's cache
        return self.output(receptance * out), None

    def wkv(self, key, value, edited=None, changed=None, keep_states=True):
        """transformers' `rwkv_linear_attention_cpu`, returning also the state read at each step.

        The same operations step by step, but the inputs are split with `unbind` once and the
        outputs stacked at the end: transformers indexes `key[:, t]` and writes `output[:, t]`,
        whose backward zero-fills or copies a whole (B, T, d_att) gradient at every step.
        Returns (B, T, d_att) and the states (B, T, 3, d_att), or None unless `keep_states`.
        """
        num_state = torch.zeros_like(key[:, 0], dtype=torch.float32)  # (B, d_att)
        den_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        max_state = torch.zeros_like(key[:, 0], dtype=torch.float32) - 1e38
        time_decay = -torch.exp(self.time_decay)
        time_first = self.time_first
        T = key.shape[1]
        edits = zip(edited.unbind(1), changed.unbind(1)) if edited is not None else [None] * T
        outputs, states = [], []
        for current_key, current_value, edit in zip(key.unbind(1), value.unbind(1), edits):
            if edit is not None:
                e, c = edit[0], edit[1][:, None]  # (B, 3, d_att), (B, 1)
                num_state = torch.where(c, e[:, 0], num_state)
                den_state = torch.where(c, e[:, 1], den_state)
                max_state = torch.where(c, e[:, 2], max_state)
            if keep_states:
                states.append(torch.stack([num_state, den_state, max_state], 1))  # (B, 3, d_att)
            current_key = current_key.float()
            max_for_output = torch.maximum(max_state, current_key + time_first)
            e1 = torch.exp(max_state - max_for_output)
            e2 = torch.exp(current_key + time_first - max_for_output)
            numerator = e1 * num_state + e2 * current_value
            denominator = e1 * den_state + e2
            outputs.append((numerator / denominator).to(key.dtype))
            max_for_state = torch.maximum(max_state + time_decay, current_key)
            e1 = torch.exp(max_state + time_decay - max_for_state)
            e2 = torch.exp(current_key - max_for_state)
            num_state = e1 * num_state + e2 * current_value
            den_state = e1 * den_state + e2
            max_state = max_for_state
        return torch.stack(outputs, 1), torch.stack(states, 1) if keep_states else None


class RWKVAdapter(FromPretrained, Adapter):
    hf_model_class = RwkvForCausalLM
    hf_load_kwargs = {"rescale_every": 0}  # archbench's hooked WKV runs without rescaling
    family = "rwkv"
    capabilities = frozenset({"gradients", "trainable", "recurrent_state", "readout"})
    default_config = {"d_model": 64, "n_layers": 2}
    task_train_config = {
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192},
        "parity": {"steps": 2500},
        # lr 3e-3 (measured, seed 0): 2000 -> 600 steps, held-out 0.981 -> 0.985
        "recall": {"lr": 3e-3},
    }

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> RwkvForCausalLM:
        if "hf_config" in config:  # a checkpoint's own config (its random-init control)
            return cls._prepare(RwkvForCausalLM(RwkvConfig.from_dict(config["hf_config"])))
        hf = RwkvConfig(vocab_size=config["vocab_size"], context_length=config["seq_len"],
                        hidden_size=config["d_model"], num_hidden_layers=config["n_layers"],
                        attention_hidden_size=config["d_model"], intermediate_size=4 * config["d_model"],
                        rescale_every=0, use_cache=False, tie_word_embeddings=False,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return cls._prepare(RwkvForCausalLM(hf))

    @staticmethod
    def _prepare(model: RwkvForCausalLM) -> RwkvForCausalLM:
        if model.config.rescale_every != 0:
            raise ValueError("archbench runs RWKV with rescale_every=0 (found "
                             f"{model.config.rescale_every}); set it in the checkpoint's config")
        for block in model.rwkv.blocks:
            if not isinstance(block.attention, HookedRwkvSelfAttention):
                block.attention.__class__ = HookedRwkvSelfAttention  # same parameters, one HookPoint more
                block.attention.hook_state = StateHookPoint()
        return model.eval()

    @staticmethod
    def config_of(c) -> dict[str, Any]:
        """The adapter config of a checkpoint's transformers config (`hf_config` rebuilds it exactly)."""
        return {"vocab_size": c.vocab_size, "seq_len": c.context_length, "d_model": c.hidden_size,
                "n_layers": c.num_hidden_layers, "hf_config": c.to_dict()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.rwkv.ln_out(stream))  # (B, T, vocab)

    def hooks(self) -> list[Hook]:
        rwkv = self.model.rwkv
        out = [hook("embed", "embed", D, 0, Site(rwkv.embeddings))]
        for i, block in enumerate(rwkv.blocks):
            out += [hook(f"blocks.{i}.wkv.state", "state", STATE, i, Site(block.attention.hook_state)),
                    hook(f"blocks.{i}.wkv.out", "mixer", D, i, Site(block.attention, index=0)),
                    hook(f"blocks.{i}.ffn.out", "mlp", D, i, Site(block.feed_forward, index=0)),
                    hook(f"blocks.{i}.resid_post", "stream", D, i + 1, Site(block, index=0))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), len(rwkv.blocks) + 1,
                           Site(self.model.head))]
