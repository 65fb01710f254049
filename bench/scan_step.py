"""Scan step: seconds per step of the hooked recurrences before and after the O(T) loops.

The recurrent families run their own time loop. Indexing a (batch, T, ...) tensor per step
(`x[:, t]`) or writing into it (`out[:, t] = ...`) costs O(T) in the backward at *every*
step (a zero-filled or copied gradient the size of the whole tensor), so the backward of a
length-T loop is O(T^2) in the largest tensor: for Mamba that is (batch, d_inner, T, d_state).
archbench's loops split their inputs with `unbind` once and stack outputs at the end.

This script keeps the previous implementations (copied below, `Old*`) and times, side by side
in one process on the same model (one torch thread, old and new interleaved, medians of
repeated steps):

  train     one training step as `Adapter.fit` takes it: forward, answer cross-entropy,
            backward, AdamW step (batch 128, train mode, nothing hooked)
  grad      attribution's pass: run with every state site cached, grad=True, backward to them
  patch     patching's pass: one forward with a state site patched at one position

for mamba (the previous unhooked forward was transformers' own torch scan), mamba2 (hooked
sequential scan; the unhooked forward is transformers' chunked scan, unchanged), rwkv
(transformers' CPU WKV loop and the previous hooked copy of it) and spiking (the snntorch
time loop and archbench.stepwise). Before timing, every pair is checked for equal logits
and gradients.

    python bench/scan_step.py                                  # 4 families x recall, parity, count
    python bench/scan_step.py --family mamba --task recall --reps 30
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time

import torch
from torch.nn import functional as F
from transformers.models.mamba import modeling_mamba as hf_mamba
from transformers.models.mamba2 import modeling_mamba2 as hf_mamba2
from transformers.models.rwkv.modeling_rwkv import RwkvSelfAttention

import archbench.stepwise as stepwise
from archbench import registry
from archbench.adapters import mamba as ab_mamba, mamba2 as ab_mamba2, rwkv as ab_rwkv, spiking as ab_spiking
from archbench.hooks import HookPoint, Patch


# ---- the previous implementations (archbench 6ce08b5), kept for the comparison only ----------
def old_scan(dA, dBx, edited=None, changed=None):
    state = torch.zeros_like(dBx[:, 0])
    states = []
    for t in range(dBx.shape[1]):
        state = dA[:, t] * state + dBx[:, t]
        if edited is not None:
            c = changed[:, t].view(-1, *([1] * (state.dim() - 1)))
            state = torch.where(c, edited[:, t], state)
        states.append(state)
    return torch.stack(states, 1)


class OldHookedScan:
    hook_state: HookPoint

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        hook = self.hook_state
        if cache is not None or not (hook._forward_hooks or hook._forward_pre_hooks):
            return super().forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        return self.scan_forward(hidden_states, attention_mask)

    def hooked_states(self, dA, dBx):
        clean = old_scan(dA, dBx)
        states = self.hook_state(clean)
        self.last_states = None
        if states is not clean:
            changed = (states != clean).flatten(2).any(-1)
            states = old_scan(dA, dBx, states, changed)
            self.last_states = states
        return states


class OldHookedMambaMixer(OldHookedScan, hf_mamba.MambaMixer):
    def scan_forward(self, hidden_states, attention_mask=None):
        dtype = hidden_states.dtype
        hidden_states = hf_mamba.apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        x, gate = projected.chunk(2, dim=1)
        x = hf_mamba.causal_conv1d_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                      activation=self.activation)
        x = hf_mamba.apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)
        time_step, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size,
                                                       self.ssm_state_size], dim=-1)
        dt = self.dt_proj.weight @ time_step.transpose(1, 2)
        u = x.transpose(1, 2)
        input_dtype = u.dtype
        dt = F.softplus(dt + self.dt_proj.bias.float()[..., None])
        dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
        dBu = dt[:, :, :, None] * B[:, None, :, :].float() * u[:, :, :, None].float()
        states = self.hooked_states(dA.transpose(1, 2), dBu.transpose(1, 2))
        T = u.shape[-1]
        y = torch.stack([torch.matmul(states[:, t].to(input_dtype), C[:, t, :].unsqueeze(-1))[:, :, 0]
                         for t in range(T)], dim=-1)
        y = (y + u * self.D.float()[None, :, None]) * F.silu(gate)
        return self.out_proj(y.transpose(1, 2).to(dtype))


class OldHookedMamba2Mixer(OldHookedScan, hf_mamba2.Mamba2Mixer):
    scan_forward = ab_mamba2.HookedMamba2Mixer.scan_forward  # unchanged; only the scan differs


class OldHookedRwkvSelfAttention(RwkvSelfAttention):
    def forward(self, hidden, state=None, use_cache=False):
        hook = self.hook_state
        if state is not None or use_cache or not (hook._forward_hooks or hook._forward_pre_hooks):
            return super().forward(hidden, state=state, use_cache=use_cache)
        receptance, key, value, _ = self.extract_key_value(hidden)
        out, clean = self.wkv(key, value)
        states = self.hook_state(clean)
        self.last_states = None
        if states is not clean:
            changed = (states != clean).flatten(2).any(-1)
            out, states = self.wkv(key, value, states, changed)
            self.last_states = states
        return self.output(receptance * out), None

    def wkv(self, key, value, edited=None, changed=None):
        _, seq_length, _ = key.size()
        output = torch.zeros_like(key)
        num_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        den_state = torch.zeros_like(key[:, 0], dtype=torch.float32)
        max_state = torch.zeros_like(key[:, 0], dtype=torch.float32) - 1e38
        time_decay = -torch.exp(self.time_decay)
        time_first = self.time_first
        states = []
        for t in range(seq_length):
            if edited is not None:
                c = changed[:, t, None]
                num_state = torch.where(c, edited[:, t, 0], num_state)
                den_state = torch.where(c, edited[:, t, 1], den_state)
                max_state = torch.where(c, edited[:, t, 2], max_state)
            states.append(torch.stack([num_state, den_state, max_state], 1))
            current_key = key[:, t].float()
            current_value = value[:, t]
            max_for_output = torch.maximum(max_state, current_key + time_first)
            e1 = torch.exp(max_state - max_for_output)
            e2 = torch.exp(current_key + time_first - max_for_output)
            numerator = e1 * num_state + e2 * current_value
            denominator = e1 * den_state + e2
            output[:, t] = (numerator / denominator).to(output.dtype)
            max_for_state = torch.maximum(max_state + time_decay, current_key)
            e1 = torch.exp(max_state + time_decay - max_for_state)
            e2 = torch.exp(current_key - max_for_state)
            num_state = e1 * num_state + e2 * current_value
            den_state = e1 * den_state + e2
            max_state = max_for_state
        return output, torch.stack(states, 1)


def old_spiking_forward(self, tokens):
    x = self.hook_input(self.embed(tokens))
    B, T, d = x.shape
    spk = [x.new_zeros(B, d) for _ in self.blocks]
    mem = [x.new_zeros(B, d) for _ in self.blocks]
    logits = []
    for t in range(T):
        h = x[:, t]
        for i, block in enumerate(self.blocks):
            spk[i], mem[i] = block.step(h, spk[i], mem[i], t, T)
            h = spk[i]
        logits.append(self.readout(mem[-1]))
    return self.hook_logits(torch.stack(logits, dim=1))


def old_attach_stepwise(site, spec, intervention, store, grad):
    history, leaf = [], []

    def hook(module, args, output):
        x, t, n_steps = args[0], int(args[1]), int(args[2])
        if t == 0:
            history.clear()
            leaf.clear()
        new = None
        if intervention is not None:
            later = [torch.zeros_like(x)] * (n_steps - t - 1)
            canon = torch.stack([*history, x, *later], dim=1)
            new = intervention(canon, spec)[:, t]
            x = new
        history.append(x)
        if store is None:
            return new
        if not grad:
            store[spec.name] = torch.stack(history, dim=1).detach()
            return new
        if t == 0:
            leaf.append(torch.zeros(x.shape[0], n_steps, *x.shape[1:], dtype=x.dtype,
                                    device=x.device, requires_grad=True))
            store[spec.name] = leaf[0]
        leaf[0].data[:, t] = x.detach()
        step = leaf[0][:, t]
        return x + (step - step.detach())

    return site.module.register_forward_hook(hook, prepend=True)


# ---- switching one model between the two ------------------------------------------------------
OLD = {"mamba": OldHookedMambaMixer, "mamba2": OldHookedMamba2Mixer, "rwkv": OldHookedRwkvSelfAttention}
NEW = {"mamba": ab_mamba.HookedMambaMixer, "mamba2": ab_mamba2.HookedMamba2Mixer,
       "rwkv": ab_rwkv.HookedRwkvSelfAttention}


def mixers(adapter):
    if adapter.family == "rwkv":
        return [b.attention for b in adapter.model.rwkv.blocks]
    return [b.mixer for b in adapter.model.backbone.layers]


@contextlib.contextmanager
def implementation(adapter, old: bool):
    """Run `adapter` with the previous (old=True) or the current loops."""
    if adapter.family == "spiking":
        saved = ab_spiking.SpikingNet.forward, stepwise.attach_stepwise
        if old:
            ab_spiking.SpikingNet.forward, stepwise.attach_stepwise = old_spiking_forward, old_attach_stepwise
        try:
            yield
        finally:
            ab_spiking.SpikingNet.forward, stepwise.attach_stepwise = saved
        return
    for m in mixers(adapter):
        m.__class__ = (OLD if old else NEW)[adapter.family]
    try:
        yield
    finally:
        for m in mixers(adapter):
            m.__class__ = NEW[adapter.family]


# ---- the three passes ------------------------------------------------------------------------
def make_passes(adapter, task, batch, seed):
    ex = task.sample(batch, seed, "train")
    src = task.sample(batch, seed + 1, "train").tokens
    states = adapter.names("state")
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    cfg = {**adapter.train_config, **adapter.task_train_config.get(task.name, {})}
    site = states[0]
    t_patch = task.seq_len // 2

    def train():
        adapter.model.train()
        loss = adapter.loss(ex.tokens, ex.answer, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        adapter.model.eval()
        return loss.detach()

    def grad():
        out = adapter.run(ex.tokens, cache=states, grad=True)
        logp = out.logits[:, -1].log_softmax(-1).gather(1, ex.answer[:, None]).sum()
        return torch.autograd.grad(logp, [out.cache[n] for n in states], allow_unused=True)

    source = adapter.run(src, cache=[site]).cache[site]

    def patch():
        with torch.no_grad():
            return adapter.run(ex.tokens, interventions={site: Patch(source, positions=[t_patch])}).logits

    return {"train": train, "grad": grad, "patch": patch}, ex


def check_equal(adapter, ex, states):
    """Logits, parameter gradients and state-site gradients agree between old and new."""
    results = []
    for old in (True, False):
        with implementation(adapter, old):
            adapter.model.zero_grad(set_to_none=True)
            adapter.model.train()
            loss = F.cross_entropy(adapter.forward(ex.tokens)[:, -1], ex.answer)
            loss.backward()
            adapter.model.eval()
            pgrads = [p.grad.clone() for p in adapter.model.parameters() if p.grad is not None]
            adapter.model.zero_grad(set_to_none=True)
            out = adapter.run(ex.tokens, cache=states, grad=True)
            cached = [out.cache[n] for n in states]
            sgrads = torch.autograd.grad(out.logits[:, -1].logsumexp(-1).sum(), cached, allow_unused=True)
            sgrads = [torch.zeros_like(c) if g is None else g for g, c in zip(sgrads, cached)]
            results.append((out.logits.detach(), pgrads, sgrads))
    (l0, p0, s0), (l1, p1, s1) = results
    diff = max([(l0 - l1).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(p0 + list(s0), p1 + list(s1))])
    return diff


def time_pair(fn, adapter, reps):
    """Medians (cpu s, wall s) of old and new, interleaved."""
    times = {True: ([], []), False: ([], [])}
    for r in range(reps + 2):
        for old in (True, False):
            with implementation(adapter, old):
                c, w = time.process_time(), time.perf_counter()
                fn()
                c, w = time.process_time() - c, time.perf_counter() - w
            if r >= 2:  # two warm-up rounds
                times[old][0].append(c)
                times[old][1].append(w)
    return {old: (statistics.median(cs), statistics.median(ws)) for old, (cs, ws) in times.items()}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="mamba,mamba2,rwkv,spiking")
    p.add_argument("--task", default="recall,parity,count")
    p.add_argument("--mode", default="train,grad,patch")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(1)
    print(f"# scan_step  {datetime.datetime.now():%Y-%m-%d %H:%M}  torch {torch.__version__}  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} cpus, 1 thread  "
          f"batch {args.batch}  median of {args.reps}")
    print(f"{'family':8} {'task':7} {'T':>3} {'pass':6} {'old cpu s':>10} {'new cpu s':>10} {'speed-up':>8}"
          f" {'old wall':>9} {'new wall':>9}  max |diff|")
    for family in args.family.split(","):
        for task_name in args.task.split(","):
            task = registry.task(task_name).for_seed(args.seed)
            adapter = registry.adapter(family).for_task(task, args.seed)
            passes, ex = make_passes(adapter, task, args.batch, args.seed)
            diff = check_equal(adapter, ex, adapter.names("state"))
            for mode in args.mode.split(","):
                t = time_pair(passes[mode], adapter, args.reps)
                (oc, ow), (nc, nw) = t[True], t[False]
                print(f"{family:8} {task_name:7} {task.seq_len:3} {mode:6} {oc:10.4f} {nc:10.4f} {oc / nc:7.2f}x"
                      f" {ow:9.4f} {nw:9.4f}  {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
