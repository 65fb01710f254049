"""The `archbench` command line: list, inspect, run --matrix, report, zoo, cite.

Examples:
  archbench list adapters
  archbench inspect transformer --task recall
  archbench run --matrix --quick                               (writes ./archbench-results)
  archbench run --matrix --profile full --results R            (quick|default|full: 3, 5, 10 seeds)
  archbench run --matrix --arch transformer --technique probe --task modadd,count --seeds 3
  archbench report                                             (re-renders ./archbench-results)
  archbench report --results results                           (the published leaderboard)
  archbench cite --results results/ > references.bib
  archbench zoo build --arch transformer --task modadd --seeds 2
  archbench iit --arch transformer --task count,recall,modadd   (known-answer organisms' table)

Bad input (an unknown name, a bad flag value, a results directory that is read-only, on a
full disk, damaged, of a newer schema or in use by another run) prints one line that says
what to fix and exits with status 2; nothing already computed is lost.
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sqlite3
import sys
from pathlib import Path

from archbench import registry
from archbench import results_dir as results_place

EXIT_USAGE = 2
MAX_SEEDS = 100  # the full profile runs 10; a typo such as 10**9 would expand into billions of cells
FLAGS = {"adapters": "--arch", "techniques": "--technique", "tasks": "--task"}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def split_names(value: str) -> list[str]:
    """A comma-separated list of names, where a variant's own knobs are comma-separated too:
    `transformer,mamba@d_model=32,n_layers=4` is two names (a piece with `=` and no `@`
    continues the variant before it; no family or task name holds `=`)."""
    names: list[str] = []
    for piece in (p.strip() for p in value.split(",")):
        if "=" in piece and "@" not in piece and names and "@" in names[-1]:
            names[-1] += "," + piece
        elif piece:
            names.append(piece)
    return names


def _names(kind: str, value: str | None) -> list[str]:
    """The names of a comma-separated flag, each checked, duplicates dropped; every name
    when the flag is absent (an empty value is an error, not "all")."""
    if value is None:
        return registry.names(kind)
    names = list(dict.fromkeys(split_names(value)))
    if not names:
        raise UsageError(f"{FLAGS.get(kind, kind)} needs at least one name (leave the flag out for all; "
                         f"`archbench list {kind}` lists them)")
    for n in names:
        try:
            registry.resolve(kind, n)
        except registry.UnknownName as exc:
            raise UsageError(str(exc)) from None
    return names


def _results_dir(value: str, must_exist: bool = False, published: bool = False) -> Path:
    """`--results` as a path that can be a directory; with `must_exist`, one holding a store
    (`archbench.db`, or with `published` also the committed `archbench.db.gz`)."""
    from archbench import store

    try:
        path = results_place.check(value)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    found = store.has_store(path) if published else (path / store.DB_NAME).exists()
    if must_exist and not found:
        raise UsageError(f"no results store in {value}; run `archbench run --matrix --results {value}` first")
    return path


def _checked(parse, ok, wanted: str):
    """An argparse type: parse the value, check it, or say in one line what was expected."""
    def check(value: str):
        try:
            x = parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value!r}")
        return x
    return check


_positive = _checked(int, lambda n: n >= 1, "a positive integer")
_seed_count = _checked(int, lambda n: 1 <= n <= MAX_SEEDS, f"a number of seeds from 1 to {MAX_SEEDS}")
_seed = _checked(int, lambda n: 0 <= n < MAX_SEEDS, f"a seed from 0 to {MAX_SEEDS - 1}")
_fraction = _checked(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
_amount = _checked(float, lambda x: x >= 0, "a number >= 0")


def cmd_list(args) -> int:
    kinds = [args.kind] if args.kind else ["adapters", "techniques", "tasks"]
    for kind in kinds:
        print(f"{kind}:")
        for name in registry.names(kind):
            obj = registry.get(kind, name)
            doc = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
            mod = sys.modules.get(obj.__module__)
            doc = doc or ((mod.__doc__ or "").strip().splitlines()[0] if mod and mod.__doc__ else "")
            print(f"  {name:<14} {doc}")
        if kind == "tasks":
            _list_natural_tasks()
    return 0


def _list_natural_tasks() -> None:
    """The natural-text tasks: they need a checkpoint's tokenizer, so they run with --model."""
    import importlib

    from archbench.tasks import NATURAL_TASKS

    print("tasks on a checkpoint's own tokenizer (with --model hf):")
    for name, target in NATURAL_TASKS.items():
        module, _, attr = target.partition(":")
        doc = (getattr(importlib.import_module(module), attr).__doc__ or "").strip().splitlines()
        print(f"  {name:<14} {doc[0] if doc else ''}")


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """Lines of an aligned text table: a header, a rule, the rows (columns in `right` right-aligned)."""
    widths = [max([len(h)] + [len(r[j]) for r in rows]) for j, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def cmd_inspect(args) -> int:
    # registry.adapter imports the one module its lazy table names for `arch`, not every adapter
    from archbench import checkpoints

    checkpoint = _checkpoint(args)
    if checkpoint is None and args.arch is None:
        raise UsageError("name an architecture (`archbench inspect transformer`) or a checkpoint (--model hf)")
    arch = checkpoint or _names("adapters", args.arch)[0]
    task_name = _tasks(args.task, checkpoint)[0] if args.task else "ioi" if checkpoint else "recall"
    seed = args.organism
    if seed is not None and checkpoint:
        raise UsageError("--organism is for a family's trained organisms; a checkpoint is inspected as it is")
    try:
        task = checkpoints.task(arch, task_name)
        if checkpoint:
            adapter = checkpoints.loaded(arch)
        elif seed is not None:
            from archbench import zoo

            adapter, meta = zoo.organism(arch, task, seed)
            print(f"organism {meta['organism']}: held-out accuracy {meta['accuracy']:.3f} "
                  f"({meta['steps']} steps, stopped: {meta.get('stopped', '?')})")
        else:
            adapter = registry.adapter(arch).for_task(task, seed=0)
    except checkpoints.CheckpointError as exc:
        raise UsageError(str(exc)) from None
    out = adapter.run(task.sample(2, 0).tokens, cache="all")
    print(f"{arch} on {task.name} (vocab {task.vocab_size}, length {task.seq_len}); "
          f"capabilities: {', '.join(sorted(adapter.capabilities))}")
    for key, value in adapter.describe().items():  # e.g. the program family's program text
        what = "trained organism" if seed is not None else "random-init model (--organism SEED: a trained one)"
        print(f"{key} of the {what}:\n" + "\n".join(f"  {line}" for line in str(value).splitlines()))
    if adapter.config.get("hooked_blocks") is not None:
        print(f"hook points of blocks {', '.join(map(str, adapter.config['hooked_blocks']))} of "
              f"{adapter.config['n_layers']} (blocks=); every block runs")
    shapes = {n: tuple(t.shape) for n, t in out.cache.items()}
    rows = [[s.name, s.role, ", ".join(s.axes), str(shapes.get(s.name, "-"))] for s in adapter.hook_points()]
    print("\n".join(_table(["hook point", "role", "axes", "shape"], rows)))
    aliases = adapter.aliases() if hasattr(adapter, "aliases") else {}
    if aliases:
        print(f"\nTransformerLens names ({len(aliases)}), accepted wherever a hook name is:")
        rows = [[a.name, a.target, ", ".join(a.axes),
                 str(tuple(shapes[a.target][k] for k in a.perm) if a.perm and a.target in shapes
                     else shapes.get(a.target, "-"))] for a in aliases.values()]
        print("\n".join(_table(["TransformerLens name", "hook point", "axes", "shape"], rows)))
    return 0


def _organism_rows(rows: list[dict], gate: float) -> list[list[str]]:
    """`zoo ls` rows: accuracy rounded down (0.8996 never reads as passing 0.90), gate status."""
    import math

    from archbench import zoo

    def shown(x, fmt="{}"):
        return "?" if x is None else fmt.format(x)

    out = []
    for r in rows:
        acc = r.get("accuracy")
        ok = isinstance(acc, (int, float))
        status = "?" if not ok else "pass" if zoo.gate_reason({"accuracy": acc}, gate) is None else "fail"
        out.append([shown(r.get("arch")), shown(r.get("task")), shown(r.get("seed")),
                    f"{math.floor(acc * 1000) / 1000:.3f}" if ok else "?", status, shown(r.get("stopped")),
                    shown(r.get("steps")), shown(r.get("seconds"), "{:.1f}"), shown(r.get("check")),
                    shown(r.get("path"))])
    return out


def cmd_zoo_ls(args) -> int:
    """The cached organisms as an aligned table with their behavioural-gate status."""
    from archbench import zoo

    given = [flag for flag, name in _ZOO_BUILD_ONLY.items() if getattr(args, name, None) not in (None, False)]
    if given:
        raise UsageError(f"{given[0]} is for `zoo build`; `zoo ls` takes only --arch, --task and --gate")
    archs = set(_names("adapters", args.arch)) if args.arch else None
    tasks = set(_names("tasks", args.task)) if args.task else None
    listed = [r for r in zoo.list_organisms()
              if not (archs and r.get("arch") not in archs) and not (tasks and r.get("task") not in tasks)]
    gate = zoo.DEFAULT_GATE if getattr(args, "gate", None) is None else args.gate
    rows = _organism_rows(listed, gate)
    header = ["arch", "task", "seed", "accuracy", f"gate {gate:.2f}", "stopped", "steps", "seconds", "check", "path"]
    print("\n".join(_table(header, rows, right={2, 3, 6, 7})))
    if not rows:
        print(f"archbench: no organisms in {zoo.cache_root() / 'organisms'}; `archbench zoo build` trains them",
              file=sys.stderr)
    return 0


def _executor(args):
    """`local`, or a Ray executor built from the ray flags (which need `--executor ray`)."""
    from archbench import runner

    ray_flags = {"--address": args.address, "--ray-cpus-per-task": args.ray_cpus_per_task,
                 "--ray-gpus-per-task": args.ray_gpus_per_task}
    if args.executor != "ray":
        given = [flag for flag, value in ray_flags.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --executor ray")
        return _slurm_executor(args) or args.executor
    if args.ray_cpus_per_task == 0:
        raise UsageError("--ray-cpus-per-task must be > 0 (fractions such as 0.5 are fine)")
    try:
        return runner.EXECUTORS["ray"](args.workers, address=args.address,
                                       num_cpus=args.ray_cpus_per_task or 1,
                                       num_gpus=args.ray_gpus_per_task or 0)
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def _slurm_time(value: str) -> int:
    from archbench.slurm_executor import slurm_minutes

    return _checked(slurm_minutes, lambda m: m >= 1, "a Slurm time limit such as 90, 4:00:00 or 1-00:00")(value)


def _slurm_executor(args):
    """None unless `--executor slurm`, else the Slurm executor built from the slurm flags."""
    from archbench import runner

    slurm_flags = {"--slurm-partition": args.slurm_partition, "--slurm-time": args.slurm_time,
                   "--slurm-folder": args.slurm_folder, "--slurm-cpus-per-task": args.slurm_cpus_per_task}
    if args.executor != "slurm":
        given = [flag for flag, value in slurm_flags.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --executor slurm")
        return None
    from archbench.slurm_executor import DEFAULT_MINUTES, SlurmError

    try:
        return runner.EXECUTORS["slurm"](args.workers, partition=args.slurm_partition,
                                         minutes=args.slurm_time or DEFAULT_MINUTES, folder=args.slurm_folder,
                                         cpus_per_task=args.slurm_cpus_per_task or 1)
    except (ImportError, SlurmError) as exc:
        raise UsageError(str(exc)) from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _matrix_archs(value: str | None) -> list[str]:
    """Adapters for the matrix: by default every adapter that trains organisms."""
    archs = _names("adapters", value)
    wrappers = [a for a in archs if not registry.adapter(a).organisms]
    if value and wrappers:
        raise UsageError(f"{', '.join(wrappers)} only wraps your own checkpoints and has no organisms "
                         "to train; leave it out of --arch and use it from Python")
    return [a for a in archs if a not in wrappers]


def _checkpoint(args) -> str | None:
    """`--model hf --model-args ...` registered as the matrix row `hf:NAME` (None without --model)."""
    from archbench import checkpoints

    if args.model is None:
        if args.model_args is not None:
            raise UsageError("--model-args needs --model hf")
        return None
    if args.model_args is None:
        raise UsageError("--model hf needs --model-args pretrained=DIR[,gguf_file=F][,dtype=D][,device=D]")
    try:
        return checkpoints.register(checkpoints.parse_model_args(args.model_args))
    except (checkpoints.CheckpointError, ImportError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def _tasks(value: str | None, checkpoint: str | None) -> list[str]:
    """Task names; with a checkpoint the natural-text tasks are known too (and the default)."""
    from archbench.tasks import NATURAL_TASKS

    if checkpoint is None:
        # by default the matrix's own tasks; the findings' tasks run when named
        return _names("tasks", value) if value is not None else registry.matrix_tasks()
    if value is None:
        return list(NATURAL_TASKS)
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise UsageError("--task needs at least one name (leave the flag out for the natural-text tasks)")
    for n in names:
        if n not in NATURAL_TASKS:
            try:
                registry.resolve("tasks", n)
            except registry.UnknownName as exc:
                raise UsageError(f"{exc}; natural-text tasks: {', '.join(NATURAL_TASKS)}") from None
    return names


def _check_checkpoint_tasks(checkpoint: str, tasks: list[str]) -> None:
    """Every task builds under the checkpoint's tokenizer and fits its vocabulary (before any work)."""
    from archbench import checkpoints

    cls = registry.adapter(checkpoint)
    for name in tasks:
        try:
            cls.check_task(checkpoints.task(checkpoint, name))
            checkpoints.loaded(checkpoint)  # every weight loads, before any work
        except ValueError as exc:  # CheckpointError, or a task with too few single-token items
            raise UsageError(str(exc).splitlines()[0]) from None


def _refusal(exc: Exception) -> str:
    return f"{exc}; --no-retrain keeps it as it is: rerun without --no-retrain to rebuild it"


def _note(line: str) -> None:
    print(f"archbench: {line}", file=sys.stderr)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _with_reference(archs: list[str], notes: list[str]) -> list[str]:
    """`--arch` without the reference architecture gets its cells too: every verdict divides by them."""
    from archbench.verdict import Settings

    reference = Settings.reference
    if reference in archs or reference not in registry.names("adapters"):
        return archs
    notes.append(f"adding {reference} to --arch: it is the reference every verdict divides by "
                 "(its cells already in the store are skipped)")
    return [reference, *archs]


def _axis_rows(archs: list[str], axis: str, notes: list[str]) -> list[str]:
    """Each family with its rows along `axis` (archbench/variants.py): the 3 x 3 width-depth grid
    (the point equal to the family's own config is the family's row) or the training stages."""
    from archbench import variants

    rows, left_out = [], []
    for arch in archs:
        rows.append(arch)
        if variants.is_variant(arch):
            continue
        extra = variants.scale_rows(arch) if axis == "scale" else variants.development_rows(arch)
        try:
            classes = [registry.adapter(row) for row in extra]
        except registry.UnknownName as exc:
            left_out.append(f"{arch} ({str(exc).split(': ', 1)[-1]})")
            continue
        base = registry.adapter(arch).default_config
        rows += [row for row, cls in zip(extra, classes) if cls.default_config != base or cls.stage is not None]
    for reason in left_out:
        notes.append(f"--axis {axis} leaves out {reason}")
    return list(dict.fromkeys(rows))


def cmd_run(args) -> int:
    from archbench import report, runner, store, zoo
    from archbench.technique import SCORING_VERSION

    if not args.matrix and not args.findings:
        raise UsageError("say what to run: `archbench run --matrix` (filters: --arch, --technique, --task) "
                         "or `archbench run --findings`")
    if args.findings:
        given = [flag for flag, value in (("--matrix", args.matrix), ("--arch", args.arch),
                                          ("--technique", args.technique), ("--task", args.task),
                                          ("--axis", args.axis), ("--model", args.model)) if value]
        if given:
            raise UsageError(f"--findings runs the cells archbench/findings.py names; leave out {', '.join(given)}")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` and `timeout` stop a run like Ctrl-C
    notes: list[str] = []  # printed once every flag has been checked
    checkpoint = _checkpoint(args)
    if args.findings:
        archs = techniques = tasks = []
    elif checkpoint is not None:  # the checkpoint's row, and any --arch rows asked for beside it
        archs = [checkpoint, *(_matrix_archs(args.arch) if args.arch is not None else [])]
    else:
        archs = _matrix_archs(args.arch)
        archs = _with_reference(archs, notes) if args.arch is not None else archs
    if args.axis is not None:
        if checkpoint is not None:
            raise UsageError(f"--axis {args.axis} varies the synthetic organisms; a checkpoint has one size "
                             "and no training run to follow")
        archs = _axis_rows(archs, args.axis, notes)
    if not args.findings:
        techniques = _names("techniques", args.technique)
        tasks = _tasks(args.task, checkpoint)
    if checkpoint is not None:
        _check_checkpoint_tasks(checkpoint, tasks)
    if args.quick and args.profile not in (None, "quick"):
        raise UsageError(f"--quick is --profile quick; it contradicts --profile {args.profile}")
    profile = "quick" if args.quick else args.profile or "default"
    n_seeds = args.seeds or runner.PROFILES[profile]
    results = _results_dir(args.results)
    cluster = args.executor == "slurm" or (args.executor == "ray" and (args.address or os.environ.get("RAY_ADDRESS")))
    if args.workers and args.workers > _cores() and not cluster:  # a process per cell helps nobody
        notes.append(f"--workers {args.workers} capped at {_cores()}, the cores of this machine")
        args.workers = _cores()
    if args.findings:
        from archbench import findings

        specs = findings.specs(range(n_seeds))
    else:
        specs = runner.expand(archs, techniques, tasks, range(n_seeds))
    executor = _executor(args)
    for line in notes:
        _note(line)
    waiting = lambda: _note(f"another run holds {results}; waiting for it (--wait)")  # noqa: E731
    with results_place.run_lock(results, wait=args.wait, on_wait=waiting):
        if store.unpack(results):
            _note(f"resuming the published store: {results / store.GZ_NAME} decompressed to "
                  f"{results / store.DB_NAME}")
        try:
            summary = runner.run_matrix(specs, results, workers=args.workers, gate=args.gate,
                                        executor=executor, progress=not args.no_progress,
                                        no_retrain=args.no_retrain)
        except zoo.CorruptOrganism as exc:
            raise UsageError(_refusal(exc)) from None
        board = results / "LEADERBOARD.md"
        try:
            # the cells this code computes; a store with older-version rows keeps them, unrendered
            if report.is_current(results, scoring=SCORING_VERSION):
                board = f"{board} (up to date)"
            else:  # new cells, a file missing or changed, or a rendering that never finished
                board = report.write(results, scoring=SCORING_VERSION)
        except KeyboardInterrupt:
            raise runner.Interrupted(summary) from None
    print(f"{summary.total} cells: {summary.skipped} already done, {summary.ok} ok, {summary.na} n/a, "
          f"{summary.error} errors in {summary.seconds:.1f} s; leaderboard: {board}")
    for line in summary.errors or []:
        print(f"  error: {line}", file=sys.stderr)
    return 1 if summary.error else 0


def _formats(value: str) -> list[str]:
    from archbench.report import FORMATS

    names = [f.strip() for f in value.split(",") if f.strip()]
    for f in names:
        if f not in FORMATS:
            hint = difflib.get_close_matches(f, FORMATS, n=1)
            raise argparse.ArgumentTypeError(f"unknown format {f!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                                             + f" (formats: {','.join(FORMATS)})")
    if not names:
        raise argparse.ArgumentTypeError(f"give at least one format of {','.join(FORMATS)}")
    return names


def cmd_report(args) -> int:
    import time

    from archbench import report

    results = _results_dir(args.results, must_exist=True, published=True)
    start = time.perf_counter()
    try:
        board = report.write(results, formats=args.format or report.FORMATS, scoring=args.scoring)
    except report.MixedScoring as exc:
        raise UsageError(str(exc)) from None
    written = [p for p in ("LEADERBOARD.md", "leaderboard.tex", "cells.csv", "index.html", "figures")
               if (results / p).exists()]
    print(f"{board} ({', '.join(written)} in {results}; {time.perf_counter() - start:.1f} s)")
    return 0


def cmd_cite(args) -> int:
    from archbench import cite

    if args.results is None:
        print(cite.render(registry.names("techniques"), registry.names("adapters")), end="")
        return 0
    techniques, adapters = cite.used_names(_results_dir(args.results, must_exist=True, published=True))
    print(cite.render(techniques, adapters), end="")
    return 0


_ZOO_BUILD_ONLY = {"--seeds": "seeds", "--workers": "workers", "--no-retrain": "no_retrain"}


def cmd_zoo(args) -> int:
    if args.action == "ls":
        return cmd_zoo_ls(args)
    from archbench import zoo
    from archbench.jobs import train_organism
    from archbench.local_executor import LocalExecutor

    archs, tasks = _matrix_archs(args.arch), _names("tasks", args.task)
    gate = zoo.DEFAULT_GATE if args.gate is None else args.gate
    calls = [(a, k, s, gate, args.no_retrain) for a in archs for k in tasks for s in range(args.seeds or 1)]
    failed = []

    def done(call, out):
        for message in out.get("warnings") or []:
            print(f"warning: {message}", file=sys.stderr)
        if out.get("refused"):
            raise UsageError(_refusal(out["refused"]))
        if out["ok"]:
            m = out["meta"]
            print(f"{m['arch']:<12} {m['task']:<8} seed {m['seed']:<3} accuracy {m['accuracy']:.3f} "
                  f"{'gate: ' + out['gate'] if out['gate'] else 'passes gate'}")
        else:
            failed.append(call)
            print(f"{'/'.join(map(str, call[:3]))}: error {out['error'].strip().splitlines()[-1]}", file=sys.stderr)

    LocalExecutor(args.workers or 1).map(train_organism, calls, done)
    return 1 if failed else 0


def cmd_iit(args) -> int:
    """Build (or load) known-answer organisms, print their table as markdown and, with
    --results, store their localisation rows and re-render that directory's report."""
    import contextlib

    from archbench import iit_sites, known_answer_table, report, store
    from archbench.technique import SCORING_VERSION

    archs = _matrix_archs(args.arch) if args.arch else sorted(iit_sites.DESIGNATED)
    jobs = [(a, k, s) for a in archs for k in _names("tasks", args.task) for s in range(args.seeds or 1)]
    results = _results_dir(args.results) if args.results else None
    rows = []
    with contextlib.ExitStack() as held:
        if results is not None:
            held.enter_context(results_place.run_lock(results))
            store.unpack(results)
            db = held.enter_context(store.Store(results))
        for a, k, s in jobs:
            found = known_answer_table.localisation_rows(a, k, s)
            if results is not None and found:
                db.put_localisation(found)  # each organism's rows as soon as they exist
            rows.append(known_answer_table.row(a, k, s, found))
        text = known_answer_table.markdown(rows)
        print(text, end="")
        if args.out:
            Path(args.out).write_text(text)
        if results is not None:
            db.close()
            print(f"leaderboard: {report.write(results, scoring=SCORING_VERSION)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="archbench", description=__doc__.split("\n\n")[0],
                epilog="\n".join(__doc__.split("\n\n")[1].splitlines()[1:]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("list", help="list adapters, techniques or tasks")
    s.add_argument("kind", nargs="?", choices=["adapters", "techniques", "tasks"])
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("inspect", help="the hook points of an architecture (names, roles, axes, shapes)")
    s.add_argument("arch", nargs="?", help="an adapter (or leave it out and give --model)")
    s.add_argument("--task", help="task that sizes the model (default: recall; ioi for a checkpoint)")
    s.add_argument("--organism", type=_seed, metavar="SEED",
                   help="inspect the trained organism of this seed (from the zoo; trained if not cached) "
                        "instead of a random-init model")
    _model_flags(s)
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("run", help="run the matrix (skips cells already in the store)",
                       epilog="example: archbench run --matrix --quick --arch transformer --results R")
    s.add_argument("--matrix", action="store_true", help="every technique x architecture x task x seed")
    s.add_argument("--findings", action="store_true",
                   help="the cells that re-measure the published findings (archbench/findings.py)")
    s.add_argument("--axis", choices=["scale", "development"],
                   help="also run each family along an axis: scale (d_model 32/64/128 x 2/4/6 blocks) or "
                        "development (snapshots at 10%%..90%% of its training)")
    s.add_argument("--arch", help="comma-separated adapters (default: all)")
    s.add_argument("--technique", help="comma-separated techniques (default: all)")
    s.add_argument("--task", help="comma-separated tasks (default: all; with --model the natural-text tasks)")
    _model_flags(s)
    s.add_argument("--profile", choices=["quick", "default", "full"],
                   help="how many seeds: quick 3 (a smoke-test matrix), default 5, full 10")
    s.add_argument("--seeds", type=_seed_count, help=f"number of seeds, at most {MAX_SEEDS} (overrides --profile)")
    s.add_argument("--quick", action="store_true", help="the same as --profile quick")
    s.add_argument("--workers", type=_positive, help="worker processes (default and at most: number of cores); "
                   "with --executor ray: CPUs of the local Ray instance, or tasks in flight on a cluster; with "
                   "--executor slurm: jobs in flight (default 32)")
    s.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                   help="local: a process pool here (default); ray: one Ray task per organism and cell "
                        '(pip install "archbench[ray]"); slurm: one Slurm job per organism and cell '
                        'through submitit (pip install "archbench[slurm]"); $ARCHBENCH_CACHE must then be '
                        "a filesystem every node shares, never /tmp")
    s.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001; default: start "
                   "a local Ray); $ARCHBENCH_CACHE must then be a filesystem shared by every node")
    s.add_argument("--ray-cpus-per-task", type=_amount, help="CPUs each Ray task reserves (default 1)")
    s.add_argument("--ray-gpus-per-task", type=_amount, help="GPUs each Ray task reserves (default 0)")
    s.add_argument("--slurm-partition", metavar="NAME", help="Slurm partition of each job (default: the "
                   "cluster's); other sbatch settings come from SBATCH_* variables, e.g. SBATCH_ACCOUNT")
    s.add_argument("--slurm-time", type=_slurm_time, metavar="LIMIT", help="time limit of each job: minutes, "
                   "H:M:S or D-H:M (default 60 minutes)")
    s.add_argument("--slurm-folder", metavar="DIR", help="submitit's job pickles and logs, on a filesystem "
                   "every node shares (default: $ARCHBENCH_CACHE/slurm/%%j, %%j being the job id)")
    s.add_argument("--slurm-cpus-per-task", type=_positive, metavar="N",
                   help="CPUs (and torch threads) of each job (default 1)")
    s.add_argument("--gate", type=_fraction, default=0.9, help="held-out accuracy an organism needs (default 0.9)")
    s.add_argument("--results", default=results_place.DEFAULT,
                   help=f"results directory (default: {results_place.DEFAULT}; the published leaderboard is "
                        "--results results)")
    s.add_argument("--wait", action="store_true",
                   help="if another run holds --results, wait for it to finish (default: exit with status 2)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--no-retrain", action="store_true",
                   help="stop (exit 2) instead of rebuilding a cached organism that fails its integrity checks")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("report", help="write the leaderboard (md, tex, csv, html, figures) from the store; "
                                      "recomputes nothing",
                       epilog="example: archbench report --results results --format md,html")
    s.add_argument("--results", default=results_place.DEFAULT,
                   help=f"results directory: its archbench.db, or a published archbench.db.gz (default: "
                        f"{results_place.DEFAULT})")
    s.add_argument("--format", type=_formats, default=None,
                   help="comma-separated subset of md,tex,csv,html,png (default: all)")
    s.add_argument("--scoring", type=_positive, default=None,
                   help="render only the cells of this scoring version (a store that mixes versions needs it)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("cite", help="BibTeX for archbench and the techniques and architectures used",
                       epilog="example: archbench cite --results results/ > references.bib")
    s.add_argument("--results", help="cite what this results directory used (default: everything registered)")
    s.set_defaults(fn=cmd_cite)

    s = sub.add_parser("zoo", help="train organisms into the cache, or list the cache (with each one's check)",
                       epilog="example: archbench zoo build --arch transformer --task modadd --seeds 2")
    s.add_argument("action", choices=["build", "ls"])
    s.add_argument("--arch", help="comma-separated adapters (default: all that train organisms)")
    s.add_argument("--task", help="comma-separated tasks (default: all)")
    s.add_argument("--seeds", type=_positive, help="build: number of seeds (default 1)")
    s.add_argument("--workers", type=_positive, help="build: worker processes (default 1)")
    s.add_argument("--gate", type=_fraction, help="held-out accuracy an organism needs (default 0.9): "
                   "build gates on it, ls shows pass or fail against it")
    s.add_argument("--no-retrain", action="store_true",
                   help="build: stop (exit 2) instead of rebuilding a cached organism that fails its integrity checks")
    s.set_defaults(fn=cmd_zoo)

    s = sub.add_parser("iit", help="known-answer organisms (strict IIT): build them and print their table "
                                   "(behaviour, IIA, other components' effect, gate, patching rank)")
    s.add_argument("--arch", help="comma-separated adapters (default: every family with a designated site)")
    s.add_argument("--task", help="comma-separated tasks (default: all)")
    s.add_argument("--seeds", type=_positive, help="number of seeds (default 1)")
    s.add_argument("--out", help="also write the markdown table to this file")
    s.add_argument("--results", help="also store the localisation rows in this results directory and re-render "
                                     "its report (its known-answer track)")
    s.set_defaults(fn=cmd_iit)
    return p


def _error(line: str) -> int:
    print(f"archbench: error: {line}", file=sys.stderr)
    return EXIT_USAGE


def _model_flags(s) -> None:
    s.add_argument("--model", choices=["hf"], help="run a checkpoint of your own (lm-evaluation-harness's "
                   "convention): a local transformers directory or GGUF file, given by --model-args")
    s.add_argument("--model-args", metavar="ARGS", help="pretrained=DIR[,gguf_file=F][,dtype=float32|bfloat16|"
                   "float16][,device=cpu|cuda][,name=N][,blocks=N][,trust_remote_code=true]")


def main(argv: list[str] | None = None) -> int:
    from archbench.ray_executor import ClusterUnreachable
    from archbench.store import StoreError

    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except (UsageError, StoreError, results_place.Busy, ClusterUnreachable) as exc:
        return _error(str(exc))
    except (sqlite3.Error, OSError) as exc:  # read-only, disk full, damaged: say which
        return _error(results_place.explain(exc, getattr(args, "results", None)))
    except KeyboardInterrupt as exc:
        summary = getattr(exc, "summary", None)  # runner.Interrupted: what the run kept
        kept = (f"; this run kept {summary.kept()} ({summary.skipped} cells were done before it)"
                if summary is not None else "")
        print(f"archbench: interrupted{kept}; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
