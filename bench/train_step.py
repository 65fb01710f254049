"""Training step cost: is organism training bound by per-step overhead or by arithmetic?

Two ways to make tiny-model training cheaper pull in opposite directions. If a step is bound
by Python and dispatch overhead, training several seeds of one (family, task) as one batched
model (`torch.func.stack_module_state` + `vmap`) amortises it; if it is bound by arithmetic,
only fewer operations (a smaller batch, fewer steps, a narrower model) help. This script
measures both on the organisms the matrix trains, one torch thread, in one process:

  batch scaling   seconds per training step (`Adapter.loss`, backward, AdamW) at batch 8, 32
                  and the matrix's 128; a step bound by overhead costs about the same at every
                  batch, one bound by arithmetic grows with it (32 -> 128 is 4x the arithmetic)
  seeds in vmap   3 seeds trained as one vmapped functional model against the same 3 trained
                  one after another (batch 128 each, both on the answer cross-entropy); the
                  ratio is the speed-up vmap would give

Medians of repeated steps after two warm-up steps; both variants run interleaved on the same
machine. A family whose model vmap cannot batch (data-dependent shapes, autograd Functions
without `setup_context`) reports why.

    python bench/train_step.py                                   # every trained family, parity
    python bench/train_step.py --family mamba,transformer --task recall --reps 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from torch.func import functional_call, stack_module_state, vmap

from archbench import registry
from archbench.adapter import Adapter

FAMILIES = "transformer,moe,looped,mamba,mamba2,rwkv,diffusion,spiking,kan,gru,aaren,xlstm,griffin,deltanet,hybrid"
N_SEEDS = 3


def train_config(adapter, task_name: str) -> dict:
    return {**Adapter.train_config, **adapter.train_config, **adapter.task_train_config.get(task_name, {})}


def answer_loss(adapter, tokens, answer, cfg, gen):
    """Cross-entropy of the answer at the last position: the loss the vmap variant trains
    (the diffusion LM's own `loss` is masked denoising, which would not compare like for like)."""
    return torch.nn.functional.cross_entropy(adapter.forward(tokens)[:, -1], answer)


def step_seconds(adapter, train, cfg: dict, batch: int, reps: int, gen: torch.Generator,
                 loss_fn=None) -> float:
    """Median seconds of one `fit`-style step at `batch` (after two warm-up steps), with the
    adapter's own training loss unless `loss_fn` is given."""
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=cfg["lr"])
    adapter.model.train()
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        idx = torch.randint(len(train), (batch,), generator=gen)  # (batch,)
        if loss_fn is None:
            loss = adapter.loss(train.tokens[idx], train.answer[idx], cfg, gen)
        else:
            loss = loss_fn(adapter, train.tokens[idx], train.answer[idx], cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


class AdapterForward(torch.nn.Module):
    """The adapter's own forward (tokens -> logits) as a module, so `functional_call` can run
    it under stacked weights (the parameters are the wrapped model's, prefixed `model.`)."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model

    def forward(self, tokens):
        return self.adapter.forward(tokens)  # (batch, T, vocab)


def vmap_seconds(adapters, train, cfg: dict, reps: int, gen: torch.Generator) -> float:
    """Median seconds of one step of N_SEEDS models batched by vmap (answer cross-entropy)."""
    params, buffers = stack_module_state([a.model for a in adapters])  # each (N_SEEDS, ...)
    wrapper = AdapterForward(adapters[0])

    def loss_of(p, b, tokens, answer):
        state = {f"model.{k}": v for k, v in {**p, **b}.items()}
        logits = functional_call(wrapper, state, (tokens,))[:, -1]  # (batch, vocab)
        return torch.nn.functional.cross_entropy(logits, answer)

    opt = torch.optim.AdamW(list(params.values()), lr=cfg["lr"])
    batched = vmap(loss_of, randomness="different")
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        idx = torch.randint(len(train), (N_SEEDS, cfg["batch"]), generator=gen)  # (seeds, batch)
        loss = batched(params, buffers, train.tokens[idx], train.answer[idx]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default=FAMILIES)
    p.add_argument("--task", default="parity")
    p.add_argument("--reps", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"training step cost, {datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__}, 1 thread, task {a.task}, medians of {a.reps} steps")
    print()
    print("| family | s/step batch 8 | batch 32 | batch 128 | 128 / 32 | 3 seeds one after another | "
          "3 seeds in vmap | vmap speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for family in a.family.split(","):
        task = registry.task(a.task).for_seed(0)
        cls = registry.adapter(family)
        adapters = [cls.for_task(task, seed) for seed in range(N_SEEDS)]
        cfg = train_config(adapters[0], a.task)
        train = task.sample(2048, 0, "train")
        gen = torch.Generator().manual_seed(0)
        by_batch = {b: step_seconds(adapters[0], train, cfg, b, a.reps, gen) for b in (8, 32, cfg["batch"])}
        one_by_one = sum(step_seconds(ad, train, cfg, cfg["batch"], a.reps, gen, answer_loss) for ad in adapters)
        try:
            together = vmap_seconds(adapters, train, cfg, a.reps, gen)
            vm, ratio = f"{together:.4f}", f"{one_by_one / together:.2f}x"
        except Exception as exc:  # noqa: BLE001 — the reason vmap refuses this model is the result
            vm, ratio = "n/a", f"vmap refuses: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        b8, b32, b128 = (by_batch[b] for b in (8, 32, cfg["batch"]))
        print(f"| {family} | {b8:.4f} | {b32:.4f} | {b128:.4f} | {b128 / b32:.2f} | {one_by_one:.4f} | "
              f"{vm} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
