"""A small typed DSL of integer programs over token sequences, and its torch interpreter.

The organisms of `archbench.adapters.program` (FunSearch-style program search) are programs
in this DSL. A program is a list of statements; statement k assigns variable k (`v{k}`, or
`acc{k}` for a loop) and may read tokens and variables 0..k-1. Every variable is an integer
*sequence*: a statement is evaluated at every position t of the input (the program sees the
whole input, as a RASP program does: `tok[i]` reads position i wherever t is), and the
value of the last statement at position t is the program's output there; the answer is the
output at the last position. Nothing reads a variable at another position except a loop.

Leaves (operands), as tuples:

    ("tok",)       tok[t], the token at the current position
    ("at", i)      tok[i], the token at constant position i
    ("const", c)   the integer c
    ("var", j)     variable j at the current position (j < k)

Statements, as dicts (JSON-able; `normalise` turns a loaded one back into tuples):

    binop  {"kind": "binop", "op": o, "a": leaf, "b": leaf}    a o b, o in + - * == <
                                                                (== and < give 0/1)
    mod    {"kind": "mod", "a": leaf, "m": m}                   a mod m (m >= 2, result in [0, m))
    index  {"kind": "index", "a": leaf, "offset": d}            tok[a + d], the position clamped
                                                                to [0, T - 1]
    scan   {"kind": "scan", "fold": f, "op": o, "a": leaf, "b": leaf, "m": m}
                                                                a loop over positions with input
                                                                x_t = a o b at step t:
           sum:   acc_t = acc_{t-1} + x_t (mod m when m >= 2), acc_{-1} = 0   (running count, xor)
           first: acc_t = acc_{t-1} if acc_{t-1} >= 0 else (t if x_t != 0 else -1), acc_{-1} = -1
           last:  acc_t = t if x_t != 0 else acc_{t-1}, acc_{-1} = -1
    table  {"kind": "table", "keys": [leaf] or [leaf, leaf], "default": d,
            "entries": [[k, value], ...] or [[k1, k2, value], ...]}
                                                                a lookup: entries' value for
                                                                the key, else d; values are
                                                                token ids in [0, V)

Types are static integer ranges [lo, hi] (`ranges`): tokens [0, V-1], a constant itself,
+ - * by interval arithmetic, == < [0, 1], mod m [0, m-1], index and table [0, V-1], a sum
loop [0, m-1] with a modulus, else [T min(lo, 0), T max(hi, 0)], first/last [-1, T-1]. A
program whose range is wider than MAX_WIDTH values anywhere is invalid (`validate` raises
a one-line ValueError), so every variable can be encoded one-hot over its range, which is
how the adapter exposes it (`encode`, `decode`: lo + argmax).
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

OPS = ("+", "-", "*", "==", "<")
FOLDS = ("sum", "first", "last")
KINDS = ("binop", "mod", "index", "scan", "table")
MAX_WIDTH = 512  # the widest range a variable may have (its one-hot width)
KEY_OFFSET = 1 << 20  # table keys are packed as (k1 + OFF) * 2 OFF + (k2 + OFF)

Leaf = tuple
Program = list  # of statement dicts
Range = tuple  # (lo, hi)


# ---- structure ---------------------------------------------------------------------------

def normalise(program: Sequence[dict]) -> Program:
    """A program with tuple leaves and int fields (as loaded from JSON, or written by hand)."""
    out = []
    for s in program:
        s = dict(s)
        for field in ("a", "b"):
            if field in s:
                s[field] = tuple(s[field])
        if "keys" in s:
            s["keys"] = tuple(tuple(k) for k in s["keys"])
            s["entries"] = [tuple(int(x) for x in e) for e in s.get("entries", [])]
            s["default"] = int(s.get("default", 0))
        out.append(s)
    return out


def to_json(program: Program) -> list[dict]:
    """The program as plain JSON data (lists for tuples), canonical key order."""
    return json.loads(json.dumps(program, sort_keys=True))


def source_bytes(program: Program) -> bytes:
    """Canonical UTF-8 JSON of the program (stored in the organism's safetensors too)."""
    return json.dumps(to_json(program), sort_keys=True, separators=(",", ":")).encode()


def leaves(stmt: dict) -> list[tuple[str, Leaf]]:
    """(slot, leaf) of each operand: slot "a", "b" or "key0", "key1"."""
    if stmt["kind"] == "table":
        return [(f"key{i}", k) for i, k in enumerate(stmt["keys"])]
    return [(f, stmt[f]) for f in ("a", "b") if f in stmt]


def with_leaf(stmt: dict, slot: str, leaf: Leaf) -> dict:
    """A copy of stmt with operand `slot` replaced."""
    s = dict(stmt)
    if slot.startswith("key"):
        keys = list(s["keys"])
        keys[int(slot[3:])] = leaf
        s["keys"] = tuple(keys)
    else:
        s[slot] = leaf
    return s


def var_name(program: Program, k: int) -> str:
    return f"acc{k}" if program[k]["kind"] == "scan" else f"v{k}"


# ---- types -------------------------------------------------------------------------------

def _leaf_range(leaf: Leaf, R: list[Range], V: int, T: int, k: int) -> Range:
    kind = leaf[0]
    if kind in ("tok", "at"):
        if kind == "at" and not 0 <= int(leaf[1]) < T:
            raise ValueError(f"statement {k}: tok[{leaf[1]}] is outside positions 0..{T - 1}")
        return (0, V - 1)
    if kind == "const":
        return (int(leaf[1]), int(leaf[1]))
    if kind == "var":
        if not 0 <= int(leaf[1]) < k:
            raise ValueError(f"statement {k} reads variable {leaf[1]}; only 0..{k - 1} exist before it")
        return R[int(leaf[1])]
    raise ValueError(f"statement {k}: unknown operand {leaf!r} (tok, at, const or var)")


def _op_range(op: str, a: Range, b: Range, k: int) -> Range:
    if op == "+":
        return (a[0] + b[0], a[1] + b[1])
    if op == "-":
        return (a[0] - b[1], a[1] - b[0])
    if op == "*":
        p = [x * y for x in a for y in b]
        return (min(p), max(p))
    if op in ("==", "<"):
        return (0, 1)
    raise ValueError(f"statement {k}: unknown operator {op!r} (one of {' '.join(OPS)})")


def ranges(program: Program, V: int, T: int) -> list[Range]:
    """The static range [lo, hi] of every variable; ValueError (one line) if invalid."""
    if not program:
        raise ValueError("a program needs at least one statement")
    R: list[Range] = []
    for k, s in enumerate(program):
        kind = s.get("kind")
        lr = [_leaf_range(leaf, R, V, T, k) for _, leaf in leaves(s)] if kind in KINDS else []
        if kind == "binop":
            r = _op_range(s["op"], lr[0], lr[1], k)
        elif kind == "mod":
            if int(s["m"]) < 2:
                raise ValueError(f"statement {k}: mod needs a modulus >= 2, got {s['m']}")
            r = (0, int(s["m"]) - 1)
        elif kind == "index":
            r = (0, V - 1)
        elif kind == "scan":
            x = _op_range(s["op"], lr[0], lr[1], k)
            m = int(s.get("m", 0))
            if s["fold"] not in FOLDS:
                raise ValueError(f"statement {k}: unknown fold {s['fold']!r} (one of {' '.join(FOLDS)})")
            if s["fold"] == "sum":
                r = (0, m - 1) if m >= 2 else (T * min(x[0], 0), T * max(x[1], 0))
            else:
                r = (-1, T - 1)
        elif kind == "table":
            if len(s["keys"]) not in (1, 2):
                raise ValueError(f"statement {k}: a table has one or two keys, got {len(s['keys'])}")
            bad = [e for e in s["entries"] if len(e) != len(s["keys"]) + 1 or not 0 <= e[-1] < V]
            if bad or not 0 <= s["default"] < V:
                raise ValueError(f"statement {k}: table values must be token ids in [0, {V}); "
                                 f"bad entry {bad[0] if bad else s['default']}")
            r = (0, V - 1)
        else:
            raise ValueError(f"statement {k}: unknown kind {kind!r} (one of {' '.join(KINDS)})")
        if r[1] - r[0] + 1 > MAX_WIDTH:
            raise ValueError(f"statement {k} ranges over {r[0]}..{r[1]}, wider than {MAX_WIDTH} values")
        R.append(r)
    return R


def validate(program: Program, V: int, T: int) -> list[Range]:
    """`ranges`, and the adapter's rule that every program carries a loop (its state hook)."""
    R = ranges(program, V, T)
    if not any(s["kind"] == "scan" for s in program):
        raise ValueError("a program needs at least one scan statement (its loop state is the "
                         "hook point of role 'state')")
    return R


# ---- tables ------------------------------------------------------------------------------

def pack(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """One int64 per key tuple (a table's lookup key)."""
    flat = keys[0] + KEY_OFFSET
    if len(keys) == 2:
        flat = flat * (2 * KEY_OFFSET) + (keys[1] + KEY_OFFSET)
    return flat


def table_tensors(stmt: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted packed keys (n,), values (n,), default ()) of a table statement's entries."""
    n_keys = len(stmt["keys"])
    e = torch.tensor(stmt["entries"], dtype=torch.long).view(-1, n_keys + 1)  # (n, keys + 1)
    keys = pack(list(e[:, :n_keys].unbind(1)))  # (n,)
    order = keys.argsort()
    return keys[order], e[order, n_keys], torch.tensor(int(stmt["default"]))


def lookup(table, flat: torch.Tensor) -> torch.Tensor:
    keys, values, default = table  # (n,), (n,), ()
    if len(keys) == 0:
        return default.expand_as(flat)
    idx = torch.searchsorted(keys, flat.contiguous()).clamp(max=len(keys) - 1)  # (B, T)
    return torch.where(keys[idx] == flat, values[idx], default)


def fill_table(flat: torch.Tensor, answer: torch.Tensor, V: int):
    """The majority answer per observed key, default the majority answer overall:
    (packed keys (n,), answers (n,)) -> a table as `table_tensors` returns it."""
    uniq, inv = torch.unique(flat, return_inverse=True)  # (u,), (n,)
    counts = torch.zeros(len(uniq), V, dtype=torch.long)  # (u, V)
    counts.index_put_((inv, answer), torch.ones_like(answer), accumulate=True)
    return uniq, counts.argmax(1), torch.bincount(answer, minlength=V).argmax()


def table_entries(stmt: dict, table) -> list[tuple]:
    """Entries (JSON-able tuples) of a table given as tensors."""
    keys, values, _ = table
    if len(stmt["keys"]) == 1:
        return [(int(k) - KEY_OFFSET, int(v)) for k, v in zip(keys.tolist(), values.tolist())]
    k1, k2 = keys // (2 * KEY_OFFSET) - KEY_OFFSET, keys % (2 * KEY_OFFSET) - KEY_OFFSET
    return [(a, b, v) for a, b, v in zip(k1.tolist(), k2.tolist(), values.tolist())]


# ---- the interpreter ---------------------------------------------------------------------

def encode(values: torch.Tensor, r: Range) -> torch.Tensor:
    """(...) int in [lo, hi] -> (..., hi - lo + 1) float one-hot."""
    return F.one_hot(values - r[0], r[1] - r[0] + 1).float()


def decode(onehot: torch.Tensor, r: Range) -> torch.Tensor:
    """(..., width) -> (...) int: lo + argmax (how an edited variable is read back)."""
    return r[0] + onehot.argmax(-1)


def _apply(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "==":
        return (a == b).long()
    return (a < b).long()


def _fold_step(s: dict, acc: torch.Tensor, x: torch.Tensor, t: int, r: Range) -> torch.Tensor:
    """One loop step: acc_{t-1} (B,), x_t (B,) -> acc_t (B,), inside the loop's range."""
    if s["fold"] == "sum":
        acc = acc + x
        # without a modulus only an edited state can leave the range: clamp it back
        return acc.remainder(s["m"]) if s["m"] >= 2 else acc.clamp(r[0], r[1])
    hit = x != 0
    if s["fold"] == "first":
        return torch.where(acc >= 0, acc, torch.where(hit, t, -1))
    return torch.where(hit, t, acc)


def _fold_all(s: dict, x: torch.Tensor) -> torch.Tensor:
    """The whole loop at once (B, T) -> (B, T): what the step loop gives when nothing edits it."""
    T = x.shape[1]
    if s["fold"] == "sum":
        acc = x.cumsum(1)
        return acc.remainder(s["m"]) if s["m"] >= 2 else acc
    # (arithmetic, not torch.where: several times faster on these small integer tensors)
    hit = (x != 0).long()  # (B, T)
    pos1 = torch.arange(1, T + 1)  # (T,) position + 1
    if s["fold"] == "first":
        first = (hit * pos1 + (1 - hit) * (T + 1)).cummin(1).values  # (B, T) first hit + 1, or T + 1
        return first - 1 - (first > T).long() * (T + 1)
    return (hit * pos1).cummax(1).values - 1


class Hooks:
    """What the interpreter calls to expose and edit values (the adapter's hook points);
    the default exposes nothing."""

    def stmt(self, k: int, values: torch.Tensor, r: Range) -> torch.Tensor:
        return values

    def loop_hooked(self, k: int) -> bool:
        return False

    def step(self, k: int, acc: torch.Tensor, t: int, T: int, r: Range) -> torch.Tensor:
        return acc


def liveness(program: Program) -> tuple[list[bool], list[bool]]:
    """(live, full) per statement: whether the answer depends on it, and whether it is
    needed at every position (read by a loop, directly or through other statements) rather
    than at the answer position only."""
    n = len(program)
    live, full = [False] * n, [False] * n
    live[n - 1] = True
    for k in reversed(range(n)):
        if not live[k]:
            continue
        for _, lf in leaves(program[k]):
            if lf[0] == "var":
                live[lf[1]] = True
                full[lf[1]] |= program[k]["kind"] == "scan" or full[k]
    return live, full


def prune(program: Program) -> Program:
    """The program without statements the answer does not depend on (dead code), keeping
    one loop if no live one is left (every program carries a loop); same outputs."""
    live, _ = liveness(program)
    if not any(l and s["kind"] == "scan" for l, s in zip(live, program)):
        live[max(k for k, s in enumerate(program) if s["kind"] == "scan")] = True
    new_index = {}
    out = []
    for k, s in enumerate(program):
        if live[k]:
            new_index[k] = len(out)
            out.append(s)
    remap = lambda lf: ("var", new_index[lf[1]]) if lf[0] == "var" else lf  # noqa: E731
    pruned = []
    for s in out:
        for slot, lf in leaves(s):
            s = with_leaf(s, slot, remap(lf))
        pruned.append(s)
    return pruned


def execute(program: Program, R: list[Range], tokens: torch.Tensor, tables: dict[int, tuple],
            hooks: Hooks | None = None,
            fill: Callable[[int, torch.Tensor], tuple] | None = None,
            answer_only: bool = False) -> list[torch.Tensor | None]:
    """Run the program on tokens (B, T): every variable's values (B, T) long.

    `tables` maps a table statement's index to its tensors; with `fill`, each table is
    first (re)filled as `fill(k, packed keys (B, T))` returns (search fills from training
    data) and stored in `tables`. A hooked loop (`hooks.loop_hooked`) runs step by step
    so that an edited state is what the next step continues from; otherwise all at once.
    With `answer_only` (the search's fast path) statements the answer does not depend on
    are skipped (None) and those only the answer position needs give (B, 1).
    """
    hooks = hooks or Hooks()
    B, T = tokens.shape
    live, full = liveness(program) if answer_only else ([True] * len(program),) * 2
    values: list[torch.Tensor | None] = []

    def leaf(lf: Leaf, last: bool) -> torch.Tensor:
        if lf[0] == "tok":
            return tokens[:, -1:] if last else tokens
        if lf[0] == "at":
            return tokens[:, lf[1]:lf[1] + 1]  # (B, 1), broadcast over positions
        if lf[0] == "const":
            return tokens.new_full((1, 1), lf[1])
        v = values[lf[1]]
        return v[:, -1:] if last else v

    for k, s in enumerate(program):
        kind = s["kind"]
        if not live[k]:
            values.append(None)
            continue
        last = not full[k] and kind != "scan"  # only the answer position is needed
        L = 1 if last else T
        if kind == "binop":
            v = _apply(s["op"], leaf(s["a"], last), leaf(s["b"], last))
        elif kind == "mod":
            v = leaf(s["a"], last).remainder(s["m"])
        elif kind == "index":
            pos = (leaf(s["a"], last) + s["offset"]).clamp(0, T - 1).expand(B, L)  # (B, L)
            v = tokens.gather(1, pos)
        elif kind == "table":
            flat = pack([leaf(lf, last).expand(B, L) for lf in s["keys"]])  # (B, L)
            if fill is not None:
                tables[k] = fill(k, flat)
            v = lookup(tables[k], flat)
        else:  # scan
            x = _apply(s["op"], leaf(s["a"], False), leaf(s["b"], False)).expand(B, T)  # (B, T) loop input
            if hooks.loop_hooked(k):
                acc = x.new_full((B,), 0 if s["fold"] == "sum" else -1)  # (B,) acc_{-1}
                steps = []
                for t, x_t in enumerate(x.unbind(1)):  # x_t: (B,)
                    acc = hooks.step(k, _fold_step(s, acc, x_t, t, R[k]), t, T, R[k])
                    steps.append(acc)
                v = torch.stack(steps, 1)  # (B, T)
            else:
                v = _fold_all(s, x)
        v = v.expand(B, L)
        values.append(hooks.stmt(k, v, R[k]) if kind != "scan" else v)
    return values


def output_logits(out: torch.Tensor, V: int, smoothing: float) -> torch.Tensor:
    """(B, T) program output -> (B, T, V) log-probabilities: 1 - smoothing on the output token
    plus smoothing spread over all V; uniform where the output is not a token id."""
    valid = (out >= 0) & (out < V)  # (B, T)
    probs = torch.full((*out.shape, V), smoothing / V)  # (B, T, V)
    probs.scatter_add_(-1, out.clamp(0, V - 1).unsqueeze(-1), torch.full((*out.shape, 1), 1 - smoothing))
    probs = torch.where(valid.unsqueeze(-1), probs, torch.full_like(probs, 1 / V))
    return probs.log()


# ---- text --------------------------------------------------------------------------------

def _leaf_text(lf: Leaf, program: Program) -> str:
    if lf[0] == "tok":
        return "tok[t]"
    if lf[0] == "at":
        return f"tok[{lf[1]}]"
    if lf[0] == "const":
        return str(lf[1])
    return var_name(program, lf[1])


def _expr_text(op: str, a: Leaf, b: Leaf, program: Program) -> str:
    return f"{_leaf_text(a, program)} {op} {_leaf_text(b, program)}"


def program_text(program: Program, max_entries: int = 64) -> str:
    """Python-like source: one line per statement (evaluated at every position t), a loop as
    its recurrence, tables' entries after the listing, `return` the answer variable."""
    lines, tables = [], []
    for k, s in enumerate(program):
        name = var_name(program, k)
        kind = s["kind"]
        if kind == "binop":
            expr = _expr_text(s["op"], s["a"], s["b"], program)
            rhs = f"int({expr})" if s["op"] in ("==", "<") else expr
        elif kind == "mod":
            rhs = f"{_leaf_text(s['a'], program)} % {s['m']}"
        elif kind == "index":
            d = s["offset"]
            shift = f" + {d}" if d > 0 else f" - {-d}" if d < 0 else ""
            rhs = f"tok[{_leaf_text(s['a'], program)}{shift}]"
        elif kind == "table":
            key = ", ".join(_leaf_text(lf, program) for lf in s["keys"])
            rhs = f"T{k}.get({f'({key})' if len(s['keys']) == 2 else key}, {s['default']})"
            shown = ", ".join(f"{tuple(e[:-1]) if len(e) > 2 else e[0]}: {e[-1]}"
                              for e in s["entries"][:max_entries])
            more = f", ... ({len(s['entries']) - max_entries} more)" if len(s["entries"]) > max_entries else ""
            tables.append(f"T{k} = {{{shown}{more}}}")
        else:
            x = _expr_text(s["op"], s["a"], s["b"], program)
            if s["fold"] == "sum":
                step = f"{name}[t-1] + int({x})" if s["op"] in ("==", "<") else f"{name}[t-1] + ({x})"
                rhs = f"({step}) % {s['m']}" if s["m"] >= 2 else step
                init = 0
            elif s["fold"] == "first":
                rhs = f"{name}[t-1] if {name}[t-1] >= 0 else (t if {x} else -1)"
                init = -1
            else:
                rhs = f"t if {x} else {name}[t-1]"
                init = -1
            lines.append(f"{name}[t] = {rhs}    # loop, {name}[-1] = {init}")
            continue
        lines.append(f"{name} = {rhs}")
    lines.append(f"return {var_name(program, len(program) - 1)}    # the answer token, read at the last t")
    return "\n".join(tables + lines)
