"""Tasks with known ground truth (docs/architecture.md, "Tasks").

`BUILTIN_TASKS` is the lazy table of built-in tasks (`"name": "module:Class"`), loaded by
the registry on first use; the classes are also importable from here.
"""

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
}

__all__ = ["BUILTIN_TASKS", "Count", "Counterfactuals", "Examples", "Facts", "ModAdd",
           "Parity", "Recall", "Task"]
