"""Matrix-memory LSTM: xLSTM's mLSTM (Hugging Face `xLSTMForCausalLM`, native torch path).

Each block is a pre-norm residual pair: an mLSTM layer, then a gated (SwiGLU-style)
feed-forward. The mLSTM keeps per head a matrix memory C (d_qk x d_v) written with
exponentially gated key-value outer products, a normaliser n (d_qk) and a stabiliser m
(a log-scale); the output at step t reads C_t with the query, divided by max(|q.n_t|,
exp(-m_t)), then a per-head norm and a sigmoid output gate (Beck et al. 2024, "xLSTM:
Extended Long Short-Term Memory"). transformers implements the mLSTM-only xLSTM 7B design
(Beck et al. 2025, "xLSTM 7B": soft-capped gates and logits, RMS norms). Organisms are built
from a tiny `xLSTMConfig` in `mode="inference"` with `chunk_size` above every task's length,
so transformers' own forward runs its pure-torch step recurrence
(`mlstm_recurrent_sequence_native`), not the chunkwise kernel; `from_pretrained` wraps a
local `save_pretrained` directory. The optional `xlstm` package (Triton kernels) must not be
installed: with it transformers swaps in that package's blocks, which this adapter cannot
hook (building or loading then raises).

The state is not a module output. Every layer's `mlstm_backend` gets three StateHookPoints
(`hook_C`, `hook_n`, `hook_m`) and a forward that computes transformers' recurrent step
(`mlstm_recurrent_step_native`) over the sequence in O(T): the same values (tested
bit-equal in the forward, and in gradients to about 1e-7 of their scale), with only the
recurrences in time loops over `unbind`-ed inputs and everything elementwise or per step
(gate activations, outer products, the readout) computed for all steps at once.
transformers' own loop indexes `query[:, :, t]` at every step, whose backward fills a whole
(batch, head, T, d) gradient per step. Unhooked, this loop runs exactly where transformers
would run its step recurrence (inference mode, no initial state, T < chunk_size);
elsewhere (a cache, the chunkwise kernel of a long input or of `mode="train"`) the backend
is transformers' own, untouched. *While a state HookPoint is hooked* the loop always runs
(from the zero state) and materialises the states; where transformers would have used its
chunkwise kernel this is the same function in recurrent form, equal to float tolerance
(measured 1e-6 on logits at HF's init), not bit-equal.

The state at position t is (C_t, n_t, m_t) *after* step t's update: what the output at t
reads and what step t + 1 updates (at the last position, transformers' returned final
state). C and n are the stabilised values of the recurrence, so the memory itself is
C * exp(m) (and n * exp(m)). Editing any of the three at step t therefore changes outputs
from t on, exactly as running the recurrence on from the edited state would, and leaves
steps before t untouched. Each intervention sees the clean states; where (example, step) it
returned a different value, that part of the state is replaced and the recurrence continues
from it. The cache of an edited state site holds the states the recurrence actually used.
Note what the architecture does with them: the readout divides q.C_t by a positive scalar
per head and step, max(|q.n_t|, exp(-m_t)), and the per-head norm after the cell removes
such a scale (up to its eps). So an edit of n changes the cell's output h but the logits
only through that eps, an edit of m reaches the logits from t + 1 on (through the gates'
stabilisation), and the content is in C.

Hook points: `embed`; per block `blocks.{i}.mlstm.C` (batch, pos, head, d_qk, d_v),
`blocks.{i}.mlstm.n` (batch, pos, head, d_qk), `blocks.{i}.mlstm.m` (batch, pos, head)
(state), `blocks.{i}.mlstm.out` (mixer: the mLSTM layer's output projection, before the
residual add), `blocks.{i}.ffn.out` (mlp), `blocks.{i}.resid_post` (stream); then `logits`
(after transformers' output soft cap, i.e. the model's logits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers import xLSTMConfig, xLSTMForCausalLM
from transformers.models.xlstm import modeling_xlstm as hf_xlstm

from archbench.adapter import Adapter, Hook, Site, hook
from archbench.hf_checkpoint import FromPretrained
from archbench.hooks import HookPoint, StateHookPoint

D = ("batch", "pos", "d_model")
STATE_C = ("batch", "pos", "head", "d_qk", "d_v")
STATE_N = ("batch", "pos", "head", "d_qk")
STATE_M = ("batch", "pos", "head")

# With the `xlstm` package installed transformers defines no native backend (it imports that
# package's blocks instead); the hooked class is then a placeholder and `_prepare` raises.
_NativeBackend = getattr(hf_xlstm, "xLSTMBackend", torch.nn.Module)


class HookedxLSTMBackend(_NativeBackend):
    """transformers' mLSTM backend whose per-step (C, n, m) states are StateHookPoints."""

    hook_C: StateHookPoint
    hook_n: StateHookPoint
    hook_m: StateHookPoint

    @property
    def state_hooks(self) -> tuple[StateHookPoint, StateHookPoint, StateHookPoint]:
        return self.hook_C, self.hook_n, self.hook_m

    def forward(self, query, key, value, igate, fgate, c_initial=None, n_initial=None, m_initial=None,
                return_last_states=None, mode=None):
        mode = self.config.mode if mode is None else mode
        hooked = any(h.hooked for h in self.state_hooks)
        steps_natively = "inference" in mode and query.shape[2] < self.config.chunk_size
        if c_initial is not None or n_initial is not None or m_initial is not None or not (hooked or steps_natively):
            return super().forward(query, key, value, igate, fgate, c_initial=c_initial, n_initial=n_initial,
                                   m_initial=m_initial, return_last_states=return_last_states, mode=mode)
        if not hooked:
            return self.recurrence(query, key, value, igate, fgate, keep_states=False)
        h, last, clean = self.recurrence(query, key, value, igate, fgate)
        states = tuple(point(s) for point, s in zip(self.state_hooks, clean))  # C, n, m as hooked
        if any(s is not c for s, c in zip(states, clean)):  # edited: rerun through the edited steps
            changed = [(s != c).reshape(*s.shape[:2], -1).any(-1) for s, c in zip(states, clean)]  # (B, T) each
            h, last, used = self.recurrence(query, key, value, igate, fgate, edited=states, changed=changed)
            for point, s in zip(self.state_hooks, used):
                if point.hooked:  # (Adapter.run clears `used` of the points it attached only)
                    point.used = s  # the states the recurrence used, for Adapter.run's cache
        return h, last

    def recurrence(self, query, key, value, igate, fgate, edited=None, changed=None, keep_states=True):
        """transformers' `mlstm_recurrent_sequence_native` from the zero state, in O(T).

        query, key (B, nh, T, d_qk), value (B, nh, T, d_v), igate, fgate (B, nh, T): the
        gate pre-activations. The values are those of `mlstm_recurrent_step_native` step by
        step (tested bit-equal), but only what is recurrent runs in the time loops: the
        stabiliser m_t = max(log sigmoid(f_t) + m_{t-1}, i_t) (one loop of adds and maxima),
        then C_t = f'_t C_{t-1} + i'_t k_t v_t^T and n_t = f'_t n_t-1 + i'_t k_t (a second loop
        of products and sums); the gate activations f', i', the outer products and the
        readout q_t C_t / max(|q_t . n_t|, exp(-m_t)) are computed for all steps at once
        (elementwise, or matrix products with the same operands). Where
        `changed[j][b, t]`, state part j (C, n, m) after step t is `edited[j][b, t]` and the
        recurrence continues from it. Returns h (B, nh, T, d_v), the last state (C, n, m) as
        transformers returns it, and with `keep_states` the states (B, T, nh, d_qk, d_v),
        (B, T, nh, d_qk), (B, T, nh).
        """
        batch, nh, _, d_qk = query.shape
        d_v = value.shape[-1]
        dtype_qkv, dtype_state = query.dtype, getattr(torch, self.config.inference_state_dtype)
        device = query.device
        no_edit = [None] * query.shape[2]
        c_C, c_n, c_m = (c.unbind(1) for c in changed) if edited is not None else (no_edit,) * 3  # (B,) each
        e_C, e_n, e_m = (e.unbind(1) for e in edited) if edited is not None else (no_edit,) * 3
        # the stabiliser recurrence, per head: (B, nh, 1) per step as transformers' fgate[:, :, t, None]
        log_f = F.logsigmoid(fgate)  # (B, nh, T)
        m = torch.zeros(batch, nh, 1, dtype=dtype_state, device=device)  # (B, nh, 1)
        m_prev, m_new, m_used = [], [], []
        for log_f_t, i_t, c, e in zip(log_f.unbind(2), igate.unbind(2), c_m, e_m):
            m_prev.append(m)
            m = torch.max(log_f_t[:, :, None] + m, i_t[:, :, None])  # (B, nh, 1)
            m_new.append(m)
            if c is not None:
                m = torch.where(c[:, None, None], e[:, :, None], m)
            m_used.append(m)
        m_prev, m_new, m_used = (torch.stack(x, 2)[..., 0] for x in (m_prev, m_new, m_used))  # (B, nh, T)
        f_act = torch.exp(log_f + m_prev - m_new)  # (B, nh, T)
        i_act = torch.exp(igate - m_new)
        # the memory and normaliser recurrences; the outer product k v^T is one exact product
        # per entry, so computing it for all steps at once changes no value
        write_C = i_act[..., None, None] * (key[..., :, None] * value[..., None, :])  # (B, nh, T, d_qk, d_v)
        write_n = i_act[..., None] * key  # (B, nh, T, d_qk)
        C = torch.zeros(batch, nh, d_qk, d_v, dtype=dtype_state, device=device)  # (B, nh, d_qk, d_v)
        n = torch.zeros(batch, nh, d_qk, dtype=dtype_state, device=device)  # (B, nh, d_qk)
        Cs, ns = [], []
        steps = zip(f_act.unbind(2), write_C.unbind(2), write_n.unbind(2), c_C, e_C, c_n, e_n)
        for f_t, wC_t, wn_t, cC, eC, cn, en in steps:  # (B, nh), (B, nh, d_qk, d_v), (B, nh, d_qk), ...
            C = f_t[:, :, None, None] * C + wC_t
            n = f_t[:, :, None] * n + wn_t
            if cC is not None:
                C = torch.where(cC[:, None, None, None], eC, C)
                n = torch.where(cn[:, None, None], en, n)
            Cs.append(C)
            ns.append(n)
        C_all, n_all = torch.stack(Cs, 2), torch.stack(ns, 2)  # (B, nh, T, d_qk, d_v), (B, nh, T, d_qk)
        # the readout of every step at once (transformers' step kernel, batched over T)
        q_scaled = query * (d_qk ** (-0.5))  # (B, nh, T, d_qk)
        h_num = (q_scaled[..., None, :] @ C_all.to(dtype=dtype_qkv)).squeeze(-2)  # (B, nh, T, d_v)
        h_num = h_num.to(dtype=dtype_state)
        qn = (q_scaled[..., None, :] @ n_all[..., None].to(dtype=dtype_qkv)).squeeze(-2)  # (B, nh, T, 1)
        h_denom = (torch.maximum(qn.abs(), torch.exp(-m_used)[..., None]) + self.config.eps).to(dtype=dtype_state)
        h = (h_num / h_denom).to(dtype=dtype_qkv)  # (B, nh, T, d_v)
        last = (C, n, m)  # (B, nh, d_qk, d_v), (B, nh, d_qk), (B, nh, 1)
        if not keep_states:
            return h, last
        return h, last, (C_all.transpose(1, 2), n_all.transpose(1, 2), m_used.transpose(1, 2))


class XLSTMAdapter(FromPretrained, Adapter):
    hf_model_class = xLSTMForCausalLM
    family = "xlstm"
    capabilities = frozenset({"gradients", "trainable", "recurrent_state", "readout"})
    # 4 heads: d_qk = 64 * 0.5 / 4 = 8, d_v = 16 per head; chunk_size 64 > every task's
    # length, so transformers' forward (and the unhooked adapter) runs the step recurrence
    default_config = {"d_model": 64, "n_layers": 2, "n_heads": 4, "chunk_size": 64}
    task_train_config = {
        # measured: the defaults plateau at 0.52 (seed 0, 1,200 steps); these (the other
        # recurrent families') reach 0.991 (seed 0, 2,000 steps, target, 49 s CPU) and 0.933
        # (seed 1, 3,000-step cap, 73 s CPU), through loss spikes: grad_clip 1.0 removes the
        # spikes and plateaus at 0.55-0.56 (both seeds)
        "modadd": {"steps": 3000, "lr": 3e-3, "weight_decay": 1.0, "n_train": 8192},
        # parity (16 bits, k=3) stays at chance: 0.534 (defaults, plateau at 1,100 steps) and
        # 0.482 (lr 3e-3, 2,100 steps, 204 s CPU), as RWKV's and Mamba's organisms; no override
    }

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> xLSTMForCausalLM:
        if "hf_config" in config:  # a checkpoint's own config (its random-init control)
            return cls._prepare(xLSTMForCausalLM(xLSTMConfig.from_dict(config["hf_config"])))
        d_model, n_heads = config["d_model"], config["n_heads"]
        if (d_model // 2) % n_heads or d_model % n_heads:
            raise ValueError(f"xlstm: d_model/2 = {d_model / 2} (query/key width) and d_model = {d_model} "
                             f"must be divisible by n_heads = {n_heads}")
        hf = xLSTMConfig(vocab_size=config["vocab_size"], hidden_size=d_model,
                         num_hidden_layers=config["n_layers"], num_heads=n_heads,
                         qk_dim_factor=0.5, v_dim_factor=1.0, mode="inference",
                         chunk_size=config["chunk_size"], use_cache=False, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return cls._prepare(xLSTMForCausalLM(hf))

    @staticmethod
    def _prepare(model: xLSTMForCausalLM) -> xLSTMForCausalLM:
        if hf_xlstm.external_xlstm:
            raise ValueError("archbench's xlstm adapter hooks transformers' native torch mLSTM; the `xlstm` "
                             "package is installed, so transformers uses its kernels instead: uninstall it")
        c = model.config
        if int(c.hidden_size * c.qk_dim_factor) % c.num_heads or int(c.hidden_size * c.v_dim_factor) % c.num_heads:
            raise ValueError(f"xlstm: query/key and value widths must be divisible by num_heads={c.num_heads}")
        for block in model.backbone.blocks:
            backend = block.mlstm_layer.mlstm_backend
            if not isinstance(backend, HookedxLSTMBackend):
                backend.__class__ = HookedxLSTMBackend  # same (no) parameters, three HookPoints more
                backend.hook_C, backend.hook_n, backend.hook_m = StateHookPoint(), StateHookPoint(), StateHookPoint()
        if not hasattr(model, "hook_logits"):
            # the logits are soft-capped after lm_head inside transformers' forward, with no
            # module boundary: this identity marks the model's output (no parameters)
            model.hook_logits = HookPoint()
        return model.eval()

    @staticmethod
    def config_of(c) -> dict[str, Any]:
        """The adapter config of a checkpoint's transformers config (`hf_config` rebuilds it exactly)."""
        return {"vocab_size": c.vocab_size, "seq_len": None, "d_model": c.hidden_size,
                "n_layers": c.num_hidden_layers, "n_heads": c.num_heads, "chunk_size": c.chunk_size,
                "hf_config": c.to_dict()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.hook_logits(self.model(input_ids=tokens, use_cache=False).logits)  # (B, T, vocab)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        """Final RMS norm, lm head and transformers' logit soft cap, as the model's own readout."""
        head = self.model.lm_head
        normed = self.model.backbone.out_norm(stream)  # (B, T, d)
        return hf_xlstm.soft_cap(head(normed.to(head.weight.dtype)).float(),
                                 self.model.config.output_logit_soft_cap)  # (B, T, vocab)

    def hooks(self) -> list[Hook]:
        backbone = self.model.backbone
        out = [hook("embed", "embed", D, 0, Site(backbone.embeddings))]
        for i, block in enumerate(backbone.blocks):
            backend = block.mlstm_layer.mlstm_backend
            out += [hook(f"blocks.{i}.mlstm.C", "state", STATE_C, i, Site(backend.hook_C)),
                    hook(f"blocks.{i}.mlstm.n", "state", STATE_N, i, Site(backend.hook_n)),
                    hook(f"blocks.{i}.mlstm.m", "state", STATE_M, i, Site(backend.hook_m)),
                    hook(f"blocks.{i}.mlstm.out", "mixer", D, i, Site(block.mlstm_layer, index=0)),
                    hook(f"blocks.{i}.ffn.out", "mlp", D, i, Site(block.ffn)),
                    hook(f"blocks.{i}.resid_post", "stream", D, i + 1, Site(block, index=0))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), len(backbone.blocks) + 1,
                           Site(self.model.hook_logits))]
