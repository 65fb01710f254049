"""The documentation says what is true: its Python example runs, it cites nothing outside the
repository, and it names the files a newcomer edits to add a technique, adapter or task."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".toml", ".cff", ".bib"))]


def test_no_file_cites_a_design_document_outside_the_repository():
    if not (ROOT / ".git").exists():
        return  # an installed copy: nothing to read
    offenders = [p.relative_to(ROOT).as_posix() for p in _tracked_text_files()
                 if p.name != "test_docs.py" and "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_readme_python_example_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "model.run(" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert namespace["out"].cache["blocks.0.resid_post"].shape[:2] == namespace["ex"].tokens.shape


def test_readme_and_extending_name_the_real_registries_and_the_bib():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    extending = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    assert "`archbench/tasks/__init__.py`" in readme and "BUILTIN_TASKS" in readme
    assert "archbench/references.bib" in extending and "docs/extending.md" in readme
    assert "hooks()" in readme and "hooks()" in extending
