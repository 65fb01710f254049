"""Program organisms: a program in a small typed DSL per task, found by FunSearch-style search.

FunSearch (Romera-Paredes et al. 2024, "Mathematical discoveries from program search with
large language models", Nature 625) evolves programs: islands of programs, parents sampled
from an island, a mutated child evaluated and kept by its score, the worse islands
periodically reseeded from the better. Here the LLM that proposes children is replaced by a
RANDOM mutation operator over typed templates (insert, replace or delete a statement;
change an operand, an operator or fold, a constant, a position; edit a table entry), the
programs are those of `archbench.program_dsl` (integer variables, + - * == <, mod by a
constant, token at a constant or computed position, a loop over positions, lookup tables),
and the score is held-out accuracy: the worse of the validation split's and that of the
training half the tables were not filled from (ties: fewer table entries, then statements;
`_score` says why validation alone was not enough).
Within an island, selection is a tournament and the oldest program leaves when a child
enters (regularised evolution, Real et al. 2019), so programs that are lucky on the
validation set do not block drift on flat landscapes (parity). Whenever a child's structure
changed, its tables are filled from training data (the majority answer per key at the last
position), which is how a memorised knowledge base (facts) becomes a program. Search starts
from one fixed seed program (`SEED`: a loop that counts nothing, then `return tok[t]`) for
every task, is deterministic in the seed (it stops on a generation count, never a clock),
and `fit` returns the best program found; its test-split accuracy is the gate accuracy.
The random-init control is a random program drawn from the seed (`random_program`).

The organism's "weights" are its program: `config["program"]` (JSON statements, table
entries included) rebuilds it, and model.safetensors holds the same program as canonical
JSON bytes (`program_source`) and its tables as tensors; `load` refuses a pair that
disagree. `program_text()` is its readable source.

Interpretation: statements are evaluated at every position (program_dsl), the logits at
position t are log-probabilities with 1 - smoothing on the program's output at t (uniform
where the output is not a token id); the answer is read at the last position, and logits at
earlier positions are the program's output there (the program sees the whole input, so
they are not causal predictions). No gradients: the program is integer-valued.

Hook points (every variable is one; a value is encoded one-hot over its static range
[lo, hi], width hi - lo + 1, so a linear probe reads an integer variable; an edited
activation is read back as lo + argmax, so Zero reads back as lo and a Mean as the commonest
value, and downstream statements use the edited value):

    embed          (batch, pos, vocab)   the tokens one-hot (an edit changes the tokens read)
    stmt.{k}.v{k}  (batch, pos, value)   statement k's variable (role stream, layer k + 1)
    stmt.{k}.acc{k} (batch, pos, value)  loop k's accumulator acc_t per step (role state): a
                                         StepHookPoint (archbench.stepwise), so an edit at step
                                         t is what step t + 1 continues from and steps < t are
                                         untouched; an unhooked loop runs vectorised (cumsum,
                                         cummin/cummax), bit-equal to the step loop
    logits         (batch, pos, vocab)

Every program carries at least one loop (the mutation operator never deletes the last one):
a loop the answer does not read is dead code, and its state hook is inert.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from archbench import program_dsl as dsl
from archbench.adapter import Adapter, Hook, Site, TrainReport, hook
from archbench.hooks import HookPoint
from archbench.stepwise import StepHookPoint, StepSite, StepwiseAttach

VALUE = ("batch", "pos", "value")

# the fixed seed program of every search: a loop that counts nothing, then echo the token
SEED = dsl.normalise([
    {"kind": "scan", "fold": "sum", "op": "<", "a": ["tok"], "b": ["const", 0], "m": 0},
    {"kind": "binop", "op": "+", "a": ["tok"], "b": ["const", 0]},
])


# ---- the module --------------------------------------------------------------------------

def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _NetHooks(dsl.Hooks):
    """The interpreter's view of ProgramNet's hook points: encode, pass through, decode edits."""

    def __init__(self, net: "ProgramNet"):
        self.net = net

    def stmt(self, k, values, r):
        point = self.net.hook_stmt[k]
        if not _hooked(point):
            return values
        onehot = dsl.encode(values, r)  # (B, T, width)
        edited = point(onehot)
        return values if edited is onehot else dsl.decode(edited, r)

    def loop_hooked(self, k):
        return _hooked(self.net.hook_stmt[k])

    def step(self, k, acc, t, T, r):
        onehot = dsl.encode(acc, r)  # (B, width)
        edited = self.net.hook_stmt[k](onehot, t, T)
        return acc if edited is onehot else dsl.decode(edited, r)


class ProgramNet(nn.Module):
    """tokens (B, T) -> logits (B, T, V): a DSL program with a hook point per variable."""

    def __init__(self, program, vocab_size: int, seq_len: int, smoothing: float):
        super().__init__()
        self.program = dsl.normalise(program)
        self.ranges = dsl.validate(self.program, vocab_size, seq_len)
        self.vocab_size, self.seq_len, self.smoothing = vocab_size, seq_len, smoothing
        self.hook_embed = HookPoint()
        self.hook_stmt = nn.ModuleList(StepHookPoint() if s["kind"] == "scan" else HookPoint()
                                       for s in self.program)
        self.hook_logits = HookPoint()
        self.register_buffer("program_source", torch.tensor(list(dsl.source_bytes(self.program)),
                                                            dtype=torch.uint8))
        for k, s in enumerate(self.program):
            if s["kind"] == "table":
                keys, values, default = dsl.table_tensors(s)
                self.register_buffer(f"table{k}_keys", keys)
                self.register_buffer(f"table{k}_values", values)
                self.register_buffer(f"table{k}_default", default)

    def tables(self) -> dict[int, tuple]:
        return {k: (getattr(self, f"table{k}_keys"), getattr(self, f"table{k}_values"),
                    getattr(self, f"table{k}_default"))
                for k, s in enumerate(self.program) if s["kind"] == "table"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.seq_len:
            raise ValueError(f"this program reads absolute positions of length-{self.seq_len} inputs; "
                             f"got length {tokens.shape[1]}")
        if self.hook_embed.hooked:
            onehot = F.one_hot(tokens, self.vocab_size).float()  # (B, T, V)
            edited = self.hook_embed(onehot)
            if edited is not onehot:
                tokens = edited.argmax(-1)  # (B, T)
        values = dsl.execute(self.program, self.ranges, tokens, self.tables(), _NetHooks(self))
        return self.hook_logits(dsl.output_logits(values[-1], self.vocab_size, self.smoothing))  # (B, T, V)


# ---- random templates and the mutation operator --------------------------------------------

def _modulus(rng: random.Random, V: int, T: int) -> int:
    return rng.randint(2, max(V, T + 1))


def _const(rng: random.Random, V: int) -> int:
    return rng.randrange(V) if rng.random() < 0.5 else rng.randrange(min(V, 5))


def random_leaf(rng: random.Random, k: int, V: int, T: int) -> tuple:
    """An operand for statement k: a recent variable, the current token, a token at a
    position, or a small constant."""
    if k > 0 and rng.random() < 0.4:
        return ("var", k - 1 if rng.random() < 0.5 else rng.randrange(k))
    r = rng.random()
    if r < 0.3:
        return ("tok",)
    if r < 0.7:  # the last (query) position a quarter of the time, else any
        return ("at", T - 1 if rng.random() < 0.25 else rng.randrange(T))
    return ("const", _const(rng, V))


def random_stmt(rng: random.Random, k: int, V: int, T: int, program: list | None = None) -> dict:
    """A statement at index k of `program` drawn from the typed templates (operands read only
    v0..v{k-1})."""
    kind = rng.choices(dsl.KINDS, weights=(3, 1, 1, 2, 2))[0]
    leaf = lambda: random_leaf(rng, k, V, T)  # noqa: E731
    if kind == "binop":
        return {"kind": "binop", "op": rng.choice(dsl.OPS), "a": leaf(), "b": leaf()}
    if kind == "mod":
        return {"kind": "mod", "a": leaf(), "m": _modulus(rng, V, T)}
    if kind == "index":  # mostly a position a loop found, or one computed just before
        loops = [j for j in range(k) if program is not None and program[j]["kind"] == "scan"]
        r = rng.random()
        a = ("var", loops[-1]) if loops and r < 0.5 else ("var", k - 1) if k > 0 and r < 0.8 else leaf()
        return {"kind": "index", "a": a, "offset": rng.randint(-1, 1) if rng.random() < 0.8 else rng.choice((-2, 2))}
    if kind == "scan":
        fold = rng.choice(dsl.FOLDS)
        m = _modulus(rng, V, T) if fold == "sum" and rng.random() < 0.5 else 0
        # first/last: mostly the position of a token equal to something
        op = "==" if fold != "sum" and rng.random() < 0.5 else rng.choice(dsl.OPS)
        return {"kind": "scan", "fold": fold, "op": op,
                "a": ("tok",) if rng.random() < 0.7 else leaf(), "b": leaf(), "m": m}
    keys = tuple(leaf() for _ in range(rng.choice((1, 2))))
    return {"kind": "table", "keys": keys, "default": 0, "entries": []}


def _map_leaves(stmt: dict, fn) -> dict:
    for slot, leaf in dsl.leaves(stmt):
        stmt = dsl.with_leaf(stmt, slot, fn(leaf))
    return stmt


def _n_loops(p) -> int:
    return sum(s["kind"] == "scan" for s in p)


def _mutate_once(p: list, rng: random.Random, V: int, T: int, max_len: int):
    """One random edit: (new program or None, whether its structure changed)."""
    what = rng.choices(("insert", "delete", "replace", "leaf", "op", "const", "entry"),
                       weights=(2, 1.5, 1, 3, 1.5, 2.5, 0.5))[0]
    k = rng.randrange(len(p))
    if what == "insert":
        if len(p) >= max_len:
            return None, True
        k = rng.randint(0, len(p))
        later = [_map_leaves(s, lambda lf: ("var", lf[1] + 1) if lf[0] == "var" and lf[1] >= k else lf)
                 for s in p[k:]]
        p = p[:k] + [random_stmt(rng, k, V, T, p)] + later
        if k < len(p) - 1 and rng.random() < 0.5:  # let a later statement read the new variable
            j = rng.randrange(k + 1, len(p))
            p[j] = dsl.with_leaf(p[j], rng.choice(dsl.leaves(p[j]))[0], ("var", k))
        return p, True
    if what == "delete":
        if len(p) == 1 or (p[k]["kind"] == "scan" and _n_loops(p) == 1):
            return None, True
        bypass = dsl.leaves(p[k])[0][1]  # readers of v{k} read its first operand instead
        remap = lambda lf: (bypass if lf[1] == k else ("var", lf[1] - 1)) if lf[0] == "var" and lf[1] >= k else lf  # noqa: E731
        return p[:k] + [_map_leaves(s, remap) for s in p[k + 1:]], True
    s = dict(p[k])
    if what == "replace":
        s = random_stmt(rng, k, V, T, p)
        if p[k]["kind"] == "scan" and s["kind"] != "scan" and _n_loops(p) == 1:
            return None, True
    elif what == "leaf":
        s = dsl.with_leaf(s, rng.choice(dsl.leaves(s))[0], random_leaf(rng, k, V, T))
    elif what == "op" and s["kind"] in ("binop", "scan"):
        if s["kind"] == "scan" and rng.random() < 0.5:
            s["fold"] = rng.choice(dsl.FOLDS)
            s["m"] = s["m"] if s["fold"] == "sum" else 0
        else:
            s["op"] = rng.choice(dsl.OPS)
    elif what == "op" and s["kind"] == "table":  # one key more or less
        s["keys"] = s["keys"][:1] if len(s["keys"]) == 2 else (*s["keys"], random_leaf(rng, k, V, T))
    elif what in ("op", "const"):
        params = [slot for slot, lf in dsl.leaves(s) if lf[0] in ("at", "const")]
        params += [f for f in ("m", "offset") if f in s and not (f == "m" and s.get("fold", "sum") != "sum")]
        if not params:
            return None, True
        slot = rng.choice(params)
        if slot == "m":
            s["m"] = 0 if s["kind"] == "scan" and rng.random() < 0.3 else _modulus(rng, V, T)
        elif slot == "offset":
            s["offset"] = rng.randint(-2, 2)
        else:
            lf = dict(dsl.leaves(s))[slot]
            if lf[0] == "at":
                new = ("at", rng.randrange(T))
            else:
                new = ("const", lf[1] + rng.choice((-1, 1)) if rng.random() < 0.5 else _const(rng, V))
            s = dsl.with_leaf(s, slot, new)
    else:  # entry: edit one table entry (or the default); the table is not refilled
        tables = [j for j, t in enumerate(p) if t["kind"] == "table"]
        if not tables:
            return None, True
        k = rng.choice(tables)
        s = dict(p[k])
        keys, values, default = s["_table"] if "_table" in s else dsl.table_tensors(s)
        if len(values) and rng.random() < 0.8:
            values = values.clone()
            values[rng.randrange(len(values))] = rng.randrange(V)
        else:
            default = torch.tensor(rng.randrange(V))
        s["_table"] = (keys, values, default)
        return p[:k] + [s] + p[k + 1:], False
    return p[:k] + [s] + p[k + 1:], True


def mutate(p: list, rng: random.Random, V: int, T: int, max_len: int, tries: int = 20):
    """A valid child of p: one to three random edits (None if no valid one came in `tries`)."""
    for _ in range(tries):
        child, structural, ok = p, False, True
        for _ in range(1 + (rng.random() < 0.4) + (rng.random() < 0.15)):
            child, changed = _mutate_once(child, rng, V, T, max_len)
            if child is None:
                ok = False
                break
            structural |= changed
        if ok:
            try:
                return child, structural, dsl.validate(child, V, T)
            except ValueError:
                pass
    return None, False, None


def random_program(rng: random.Random, V: int, T: int, n_statements: int) -> list:
    """The random-init control: a loop and n - 1 random statements, random table entries."""
    while True:
        p = [{"kind": "scan", "fold": rng.choice(dsl.FOLDS), "op": rng.choice(dsl.OPS),
                "a": ("tok",), "b": random_leaf(rng, 0, V, T), "m": 0}]
        for k in range(1, n_statements):
            p.append(random_stmt(rng, k, V, T, p))
        try:
            R = dsl.validate(p, V, T)
        except ValueError:
            continue
        for k, s in enumerate(p):
            if s["kind"] == "table":
                key_ranges = [dsl._leaf_range(lf, R, V, T, k) for lf in s["keys"]]
                entries = {tuple(rng.randint(*r) for r in key_ranges) for _ in range(8)}
                s["entries"] = [(*key, rng.randrange(V)) for key in sorted(entries)]
                s["default"] = rng.randrange(V)
        return p


# ---- the search ----------------------------------------------------------------------------

class _Evaluator:
    """Scores programs: tables filled from the first half of the training examples, accuracy
    on the other half ("train") and on the validation split ("val"): neither half that
    scores was used to fill (a table over a + b then misses the rare sums it never saw)."""

    def __init__(self, task, seed: int, n_train: int, n_val: int, resolution: float):
        self.resolution = resolution
        train, val = task.sample(n_train, seed, "train"), task.sample(n_val, seed, "val")
        self.tokens = torch.cat([train.tokens, val.tokens])  # (n_train + n_val, T)
        self.answer = torch.cat([train.answer, val.answer])  # (n,)
        self.n_fill, self.n_train, self.V, self.T = n_train // 2, n_train, task.vocab_size, task.seq_len
        self.seen: dict[tuple, tuple] = {}  # structure -> result, for children seen before

    def __call__(self, program: list, refill: bool, R=None):
        key = None
        if refill:
            key = tuple(tuple((f, v) for f, v in s.items() if f not in ("entries", "default", "_table"))
                        for s in program)
            if key in self.seen:
                return self.seen[key]
        R = R or dsl.validate(program, self.V, self.T)
        tables = {} if refill else {k: s["_table"] if "_table" in s else dsl.table_tensors(s)
                                    for k, s in enumerate(program) if s["kind"] == "table"}
        fill = (lambda k, flat: dsl.fill_table(flat[:self.n_fill, -1], self.answer[:self.n_fill], self.V)) if refill else None
        out = dsl.execute(program, R, self.tokens, tables, fill=fill, answer_only=True)[-1][:, -1]  # (n,)
        # as the logits decide: an output that is no token id gives uniform logits, argmax 0
        right = (out.masked_fill((out < 0) | (out >= self.V), 0) == self.answer).float()  # (n,)
        if refill:
            program = [dict(s, _table=tables[k]) if k in tables else s for k, s in enumerate(program)]
        val, train = float(right[self.n_train:].mean()), float(right[self.n_fill:self.n_train].mean())
        result = (val, train, program, _score(val, train, program, self.resolution))
        if key is not None:
            self.seen[key] = result
        return result


def _score(val: float, train: float, program: list, resolution: float) -> tuple:
    """Fitness: the worse of validation and held-out training accuracy, counted in steps of
    `resolution` (0: exact); then fewer table entries, fewer statements, that accuracy
    itself, and validation accuracy.

    Validation alone certified wrong programs: modadd's validation split has 53 distinct
    pairs, and a program that maps sum 22 to 0 scored 1.0 there and 0.93 on the test split;
    facts' covers about 26 of the 32 facts. Among equals FunSearch prefers the shorter
    program; here that also prefers (a + b) mod 23 to a table over a + b, which misses the
    sums whose few pairs all lie in held-out splits. Steps of a few standard errors would
    let that preference act among programs at chance too, which differ by noise only; on
    parity that hurt (resolution 0.05: seeds 10, 11 unsolved in 50000 generations; exact:
    solved in 25957 and 20732), so the default compares exactly."""
    entries = sum(len(s["_table"][0]) if "_table" in s else len(s["entries"])
                  for s in program if s["kind"] == "table")
    acc = min(val, train)
    return (math.floor(acc / resolution + 1e-9) if resolution else acc, -entries, -len(program), acc, val)


def finalise(program: list) -> list:
    """A searched program as plain DSL: tables' tensors as entries, dead code removed."""
    out = []
    for s in program:
        if "_table" in s:
            table = s["_table"]
            s = {f: v for f, v in s.items() if f != "_table"}
            s.update(entries=dsl.table_entries(s, table), default=int(table[2]))
        out.append(s)
    return dsl.prune(out)


def search(task, seed: int, cfg: dict[str, Any]):
    """FunSearch's loop with random mutation: (best (val, train, program), generations, stopped, history)."""
    rng = random.Random(seed)
    V, T = task.vocab_size, task.seq_len
    evaluate = _Evaluator(task, seed, cfg["n_train"], cfg["n_val"], cfg["resolution"])
    first = evaluate(SEED, True)
    islands = [deque([first], maxlen=cfg["population"]) for _ in range(cfg["islands"])]
    best, best_gen, history, stopped, gen = first, 0, [], "step cap", 0
    solved = None  # the generation the target was first reached
    for gen in range(1, cfg["steps"] + 1):
        island = islands[gen % len(islands)]
        parent = max((rng.choice(island) for _ in range(cfg["tournament"])), key=lambda ind: ind[3])
        child, structural, R = mutate(parent[2], rng, V, T, cfg["max_statements"])
        if child is not None:
            ind = evaluate(child, structural, R)
            island.append(ind)  # the oldest program of the island leaves
            if ind[3] > best[3]:
                best, best_gen = ind, gen
        if solved is None and min(best[0], best[1]) >= cfg["target"]:
            solved = gen
        done = solved is not None and gen - solved >= cfg["polish_steps"]
        if gen % cfg["eval_every"] == 0 or done:
            history.append({"step": gen, "val_accuracy": best[0], "train_accuracy": best[1],
                            "statements": len(best[2]), "score": list(best[3][:3])})
        if done:  # at the target, then `polish_steps` more for a simpler program
            stopped = "target"
            break
        if cfg["plateau_steps"] and gen - best_gen >= cfg["plateau_steps"] and min(best[:2]) < cfg["plateau_below"]:
            stopped = "plateau"
            break
        if gen % cfg["reset_every"] == 0:  # FunSearch: reseed the worse half of the islands
            order = sorted(range(len(islands)), key=lambda i: max(ind[3] for ind in islands[i]))
            half = len(islands) // 2
            stuck = gen - best_gen >= cfg["restart_after"]  # then from the seed, for diversity
            for i in order[:half]:
                donor = first if stuck else max(islands[rng.choice(order[half:])], key=lambda ind: ind[3])
                islands[i] = deque([donor], maxlen=cfg["population"])
    return best, gen, stopped, history


# ---- the adapter ---------------------------------------------------------------------------

class ProgramAdapter(StepwiseAttach, Adapter):
    family = "program"
    capabilities = frozenset({"trainable", "recurrent_state"})
    default_config = {"smoothing": 0.01, "random_statements": 3}
    # steps: generations (one child each); n_train/n_val: examples that fill tables / score
    train_config = {"steps": 60000, "n_train": 512, "n_val": 512, "islands": 4, "population": 32,
                    "tournament": 4, "reset_every": 4000, "restart_after": 8000, "max_statements": 6, "eval_every": 1000,
                    "target": 1.0, "resolution": 0, "polish_steps": 3000, "plateau_steps": None, "plateau_below": 0.9}
    task_train_config: dict[str, dict[str, Any]] = {}

    def __init__(self, model: ProgramNet, config: dict[str, Any]):
        super().__init__(model, config)
        self.config["program"] = dsl.to_json(model.program)

    @classmethod
    def build_model(cls, config: dict[str, Any]) -> ProgramNet:
        V, T = config["vocab_size"], config["seq_len"]
        if "program" in config:
            program = config["program"]
        else:  # the random-init control: build() seeded torch with the organism seed
            program = random_program(random.Random(torch.initial_seed()), V, T, config["random_statements"])
        return ProgramNet(program, V, T, config["smoothing"])

    @classmethod
    def load(cls, path) -> "ProgramAdapter":
        try:
            adapter = super().load(path)
        except RuntimeError as exc:  # load_state_dict: a program_source of another length
            if "program_source" not in str(exc):
                raise
            adapter = None
        if adapter is None or bytes(adapter.model.program_source.tolist()) != dsl.source_bytes(adapter.model.program):
            raise ValueError(f"{path}: the program in adapter.json and in model.safetensors differ")
        return adapter

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)  # (B, T, V)

    def program_text(self) -> str:
        """The organism's readable source (Python-like, one line per statement)."""
        return dsl.program_text(self.model.program)

    def describe(self) -> dict[str, Any]:
        """The program, for the organism's metadata and `archbench inspect`."""
        return {"program": self.program_text()}

    def hooks(self) -> list[Hook]:
        net = self.model
        out = [hook("embed", "embed", ("batch", "pos", "vocab"), 0, Site(net.hook_embed))]
        for k, (s, point) in enumerate(zip(net.program, net.hook_stmt)):
            name = f"stmt.{k}.{dsl.var_name(net.program, k)}"
            if s["kind"] == "scan":
                out.append(hook(name, "state", VALUE, k + 1, StepSite(point)))
            else:
                out.append(hook(name, "stream", VALUE, k + 1, Site(point)))
        return out + [hook("logits", "logits", ("batch", "pos", "vocab"), len(net.program) + 1,
                           Site(net.hook_logits))]

    def fit(self, task, seed: int, extra_loss=None, val_metric=None, **overrides: Any) -> TrainReport:
        """Search a program for the task (see the module docstring); steps are generations."""
        if extra_loss is not None or val_metric is not None:
            raise ValueError("program search has no loss: interchange intervention training "
                             "(extra_loss / val_metric) does not apply to program organisms")
        unknown = set(overrides) - set(self.train_config) - set(Adapter.train_config)
        if unknown:
            raise ValueError(f"unknown search settings {sorted(unknown)}; known: {sorted(self.train_config)}")
        cfg = {**self.train_config, **self.task_train_config.get(task.name, {}), **overrides}
        start = time.perf_counter()
        best, gens, stopped, history = search(task, seed, cfg)
        self.model = ProgramNet(finalise(best[2]), self.config["vocab_size"], self.config["seq_len"],
                                self.config["smoothing"]).eval()
        self.config["program"] = dsl.to_json(self.model.program)
        self._specs = None  # the hook points are the new program's
        seconds = time.perf_counter() - start
        return TrainReport(accuracy=self.accuracy(task.sample(1024, seed, "test")), steps=gens,
                           seconds=seconds, train_accuracy=self.accuracy(task.sample(1024, seed, "train")),
                           history=history, stopped=stopped)
