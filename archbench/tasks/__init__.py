"""Tasks with known ground truth (docs/architecture.md, "Tasks").

`BUILTIN_TASKS` is the lazy table of built-in tasks (`"name": "module:Class"`), loaded by
the registry on first use; the classes are also importable from here.

`NATURAL_TASKS` lists the natural-text tasks for pretrained LMs (ioi, induction, facts_nl,
greater_than). They need the checkpoint's tokenizer, so they are not built-in (the matrix
builds tasks without arguments) and `natural_task(name, tokenizer)` constructs them.
"""

from importlib import import_module

from archbench.tasks.base import Counterfactuals, Examples, Task
from archbench.tasks.count import Count
from archbench.tasks.facts import Facts
from archbench.tasks.modadd import ModAdd
from archbench.tasks.parity import Parity
from archbench.tasks.recall import Recall

BUILTIN_TASKS: dict[str, str] = {
    "modadd": "archbench.tasks.modadd:ModAdd",
    "parity": "archbench.tasks.parity:Parity",
    "recall": "archbench.tasks.recall:Recall",
    "count": "archbench.tasks.count:Count",
    "facts": "archbench.tasks.facts:Facts",
    "regression": "archbench.tasks.regression:Regression",
    "facts_long": "archbench.tasks.facts_long:FactsLong",
    "mqar": "archbench.tasks.mqar:MQAR",
}

NATURAL_TASKS: dict[str, str] = {
    "ioi": "archbench.tasks.ioi:IOI",
    "induction": "archbench.tasks.induction:Induction",
    "facts_nl": "archbench.tasks.facts_nl:FactsNL",
    "greater_than": "archbench.tasks.greater_than:GreaterThan",
}


def natural_task(name: str, tokenizer, **knobs) -> Task:
    """The natural-text task `name` under `tokenizer` (a `transformers` tokenizer or a path)."""
    if name not in NATURAL_TASKS:
        raise KeyError(f"no natural-text task {name!r}; known: {', '.join(NATURAL_TASKS)}")
    module, qualname = NATURAL_TASKS[name].split(":")
    return getattr(import_module(module), qualname)(tokenizer, **knobs)


__all__ = ["BUILTIN_TASKS", "NATURAL_TASKS", "natural_task", "Count", "Counterfactuals", "Examples", "Facts", "ModAdd",
           "Parity", "Recall", "Task"]
