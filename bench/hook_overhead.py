"""Hook overhead: what does caching every activation cost over a bare forward?

One process, one torch thread, a GPT-2-small-shaped model (4 layers, d_model 256, 4 heads of
64, d_mlp 1024, sequence 128, batch 16) built by archbench's reference adapter (a Llama-style
`LlamaForCausalLM` with archbench's editable eager attention). Rows, timed interleaved
(every repetition runs every row once, in rotating order, so drift and other load on the
machine hit all rows alike), median over repetitions:

  HF forward                        the bare forward of the very model archbench wraps (the baseline)
  archbench run(cache="all")        every hook point cached: embed, resid_pre/mid/post, attn.out,
                                    attn.pattern, mlp.out per block, logits
  archbench run(cache="stream")     the block outputs only (what nnsight saves below)
  nnsight trace, save block outputs NNsight on a copy of the same model, every block's output saved
  TransformerLens forward           HookedTransformer of the equivalent config (RMSNorm, rotary, SwiGLU)
  TransformerLens run_with_cache    the same, every hook point cached
  HF forward, sdpa attention        reference only: the same weights with torch's fused attention,
                                    which cannot expose or edit the attention pattern

Target: archbench run(cache="all") <= 1.05x the bare forward.

    python bench/hook_overhead.py                 # defaults above, 40 repetitions
    python bench/hook_overhead.py --reps 100 --vocab 50257

Needs the bench extra for the last rows (`pip install "transformer-lens>=3.9,<4" nnsight`);
a missing library drops its rows with a note.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
import warnings

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-mlp", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary (default 1024; GPT-2's 50257 makes "
                   "the unembedding dominate the forward)")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def variants(a, tokens) -> tuple[dict, list[str]]:
    """name -> zero-argument callable returning logits; plus notes on rows left out."""
    from archbench.adapters.transformer import TransformerAdapter

    adapter = TransformerAdapter.build(a.vocab, a.seq, seed=0, d_model=a.d_model, n_layers=a.layers,
                                       n_heads=a.heads, d_mlp=a.d_mlp)
    model = adapter.model
    rows = {
        "HF forward (baseline)": lambda: model(input_ids=tokens, use_cache=False).logits,
        'archbench run(cache="all")': lambda: adapter.run(tokens, cache="all").logits,
        'archbench run(cache="stream")': lambda: adapter.run(tokens, cache="stream").logits,
    }
    notes = [f"archbench caches {len(adapter.names('all'))} hook points with cache=\"all\", "
             f"{len(adapter.names('stream'))} with cache=\"stream\""]

    try:
        from nnsight import NNsight

        traced = NNsight(copy.deepcopy(model))  # a copy: nnsight's wrapping never touches `model`

        def nnsight_save_blocks():
            saved = []  # filled inside the trace: nnsight runs the block's source itself and,
            # inside a function on Python < 3.13, cannot write new locals back
            with traced.trace(tokens, use_cache=False):
                for i in range(a.layers):
                    saved.append(traced.model.layers[i].output.save())
                saved.append(traced.output.logits.save())
            assert len(saved) == a.layers + 1 and isinstance(saved[0], torch.Tensor)
            return saved[-1]
        rows["nnsight trace, save block outputs"] = nnsight_save_blocks
    except ImportError as exc:
        notes.append(f"nnsight rows left out: {exc}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            cfg = HookedTransformerConfig(
                n_layers=a.layers, d_model=a.d_model, n_ctx=a.seq, d_head=a.d_model // a.heads,
                n_heads=a.heads, d_mlp=a.d_mlp, d_vocab=a.vocab, act_fn="silu", normalization_type="RMS",
                positional_embedding_type="rotary", rotary_dim=a.d_model // a.heads, gated_mlp=True,
                final_rms=True, device="cpu", seed=0)
            tl = HookedTransformer(cfg).eval()
        rows["TransformerLens forward"] = lambda: tl(tokens)
        rows["TransformerLens run_with_cache (all)"] = lambda: tl.run_with_cache(tokens)[0]
        notes.append(f"TransformerLens caches {len(tl.hook_dict)} hook points")
    except ImportError as exc:
        notes.append(f"TransformerLens rows left out (HookedTransformer needs transformer-lens<4): "
                     f"{str(exc).splitlines()[0]}")

    sdpa = copy.deepcopy(model)
    sdpa.config._attn_implementation = "sdpa"
    rows["HF forward, sdpa attention (reference)"] = lambda: sdpa(input_ids=tokens, use_cache=False).logits

    with torch.no_grad():  # the rows that wrap the same weights must agree with the baseline
        ref = rows["HF forward (baseline)"]()
        for name in ('archbench run(cache="all")', "nnsight trace, save block outputs",
                     "HF forward, sdpa attention (reference)"):
            if name in rows:
                torch.testing.assert_close(rows[name](), ref, rtol=1e-4, atol=1e-4, msg=name)
    return rows, notes


def measure(rows: dict, reps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """name -> {"cpu": [...], "wall": [...]} seconds per call, rows interleaved in rotating order."""
    names = list(rows)
    times = {n: {"cpu": [], "wall": []} for n in names}
    with torch.no_grad():
        for r in range(-warmup, reps):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                cpu, wall = time.process_time(), time.perf_counter()
                rows[name]()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if r >= 0:
                    times[name]["cpu"].append(cpu)
                    times[name]["wall"].append(wall)
    return times


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq))  # (B, T)
    rows, notes = variants(a, tokens)
    times = measure(rows, a.reps, a.warmup)
    base = {clock: statistics.median(times["HF forward (baseline)"][clock]) for clock in ("cpu", "wall")}

    import transformers

    print(f"hook overhead, {datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} thread), transformers {transformers.__version__}")
    print(f"model: {a.layers} layers, d_model {a.d_model}, {a.heads} heads, d_mlp {a.d_mlp}, vocab {a.vocab}; "
          f"input: batch {a.batch} x seq {a.seq}; {a.reps} repetitions after {a.warmup} warm-up, interleaved")
    print("cpu = process CPU time (robust to other load on the machine), wall = elapsed time")
    print()
    print(f"| {'variant':<40} | {'cpu ms':>7} | {'x bare':>7} | {'wall ms':>7} | {'x bare':>7} |")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for name, ts in times.items():
        cpu, wall = statistics.median(ts["cpu"]), statistics.median(ts["wall"])
        print(f"| {name:<40} | {cpu * 1e3:>7.1f} | {cpu / base['cpu']:>6.3f}x "
              f"| {wall * 1e3:>7.1f} | {wall / base['wall']:>6.3f}x |")
    print()

    def paired(name, over, clock="cpu"):  # median over repetitions of the per-repetition ratio
        return statistics.median(x / y for x, y in zip(times[name][clock], times[over][clock]))

    ours, bare = 'archbench run(cache="all")', "HF forward (baseline)"
    ratio, wall_ratio = paired(ours, bare), paired(ours, bare, "wall")
    print(f"{ours} / HF forward, median of paired cpu ratios: {ratio:.3f}x (wall {wall_ratio:.3f}x; "
          f"target <= 1.05x: {'met' if ratio <= 1.05 else 'NOT met'})")
    if "TransformerLens forward" in times:
        print(f"TransformerLens run_with_cache / its own forward, median of paired cpu ratios: "
              f"{paired('TransformerLens run_with_cache (all)', 'TransformerLens forward'):.3f}x")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
