"""A classical recurrent baseline: a stack of gated recurrent units (torch `nn.GRU`).

The GRU (Cho et al. 2014, "Learning phrase representations using RNN encoder-decoder for
statistical machine translation"; gating compared with the LSTM in Chung et al. 2014,
"Empirical evaluation of gated recurrent neural networks on sequence modeling") is the
reference point for the modern recurrent families: a result that holds on Mamba, RWKV,
xLSTM or Griffin *and* here is about recurrence; one that holds there but not here is
about that family. One token per time step: a token embedding drives `n_layers` single-layer
`nn.GRU`s, each layer's output sequence the next one's input (no residual: the classical
stacked RNN), and a linear readout of the last layer's hidden state gives the logits at
every step; the answer is read at the last step.

Each layer is torch's own `nn.GRU`, run *one step at a time* (`gru(x_t, h_{t-1})`), so the
hidden state carried from step t to step t + 1 passes through a per-step hook point and an
edit of it at step t is what step t + 1 starts from. Run unhooked, each layer is one call
of `nn.GRU` over the whole sequence (torch's fused loop, the same function; the stepped and
the fused forwards agree to float rounding, tested); any hooked run steps every layer, so
a clean run and an edited one compare like with like.

Hook points (per step, stacked over steps):

    input               (batch, pos, d_model)   token embedding (role embed)
    blocks.{i}.hidden   (batch, pos, d_model)   hidden state h_t of layer i, carried to t + 1 (role state)
    blocks.{i}.out      (batch, pos, d_model)   layer i's output sequence, the next layer's input (role stream)
    logits              (batch, pos, vocab)

`hidden` and `out` hold the same values in a clean run; they differ as edit sites. Editing
`blocks.{i}.hidden` at step t changes what layer i carries into step t + 1 (and what it
outputs at t); editing `blocks.{i}.out` at t changes only what the layer above (or the
readout) sees at t, not layer i's own recurrence. There is no Hugging Face class for this
family, so there is no `from_pretrained`: organisms load with `GRUAdapter.load`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from archbench.adapter import Adapter, Hook, Site, hook
from archbench.hooks import HookPoint
from archbench.stepwise import StepHookPoint, StepSite, StepwiseAttach

D = ("batch", "pos", "d_model")


class GRULayer(nn.Module):
    """One `nn.GRU` layer whose carried hidden state is a per-step hook point."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.gru = nn.GRU(d_in, d, num_layers=1, batch_first=True)
        self.hook_hidden = StepHookPoint()
        self.hook_out = HookPoint()

    def forward(self, x: torch.Tensor, stepped: bool) -> torch.Tensor:
        """x (B, T, d_in) -> outputs (B, T, d); `stepped` runs one `nn.GRU` call per step."""
        if not stepped:
            out, _ = self.gru(x)  # (B, T, d): torch's fused loop
            return self.hook_out(out)
        B, T, _ = x.shape
        h = x.new_zeros(1, B, self.gru.hidden_size)  # (1, B, d): nn.GRU's (layers, batch, d)
        outs = []
        for t, x_t in enumerate(x.unbind(1)):  # x_t: (B, d_in); unbind, since x[:, t]'s backward is O(T)
            _, h = self.gru(x_t[:, None], h)  # h: (1, B, d)
            h = self.hook_hidden(h[0], t, T)[None]  # the carried state, after any edit
            outs.append(h[0])  # (B, d): a GRU's output at t is its hidden state at t
        return self.hook_out(torch.stack(outs, dim=1))  # (B, T, d)


class GRUNet(nn.Module):
    """tokens (B, T) -> logits (B, T, V), one token per time step."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.hook_input = HookPoint()
        self.blocks = nn.ModuleList(GRULayer(d_model, d_model) for _ in range(n_layers))
        self.readout = nn.Linear(d_model, vocab_size)
        self.hook_logits = HookPoint()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # step through time whenever a per-step hook point is hooked (a cache or an edit)
        stepped = any(b.hook_hidden._forward_hooks for b in self.blocks)
        h = self.hook_input(self.embed(tokens))  # (B, T, d)
        for block in self.blocks:
            h = block(h, stepped)  # (B, T, d)
        return self.hook_logits(self.readout(h))  # (B, T, V)


class GRUAdapter(StepwiseAttach, Adapter):
    family = "gru"
    capabilities = frozenset({"gradients", "trainable", "recurrent_state", "readout"})
    default_config = {"d_model": 64, "n_layers": 2}
    train_config = {**Adapter.train_config, "lr": 3e-3, "weight_decay": 0.01, "warmup": 50, "grad_clip": 1.0}
    # modadd memorises without strong weight decay (seed 0: test 0.024 at train 1.000, plateau at
    # 1,100 steps); weight decay 1.0 over 3,000 steps generalises (test 0.954, 26 s), as RWKV's does.
    task_train_config: dict[str, dict[str, Any]] = {
        "modadd": {"steps": 3000, "weight_decay": 1.0},
    }

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> GRUNet:
        return GRUNet(config["vocab_size"], config["d_model"], config["n_layers"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)  # (B, T, V)

    def decode(self, stream: torch.Tensor) -> torch.Tensor:
        return self.model.readout(stream)  # (B, T, V)

    def hooks(self) -> list[Hook]:
        out = [hook("input", "embed", D, 0, Site(self.model.hook_input))]
        for i, block in enumerate(self.model.blocks):
            out += [hook(f"blocks.{i}.hidden", "state", D, i + 1, StepSite(block.hook_hidden)),
                    hook(f"blocks.{i}.out", "stream", D, i + 1, Site(block.hook_out))]
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), len(self.model.blocks) + 1,
                           Site(self.model.hook_logits))]
