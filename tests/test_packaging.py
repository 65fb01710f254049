"""Guards for the package-dir layout (docs/architecture.md, "Layout").

adapters/ and techniques/ install as archbench.adapters / archbench.techniques. Three traps:
nested folders dropped from wheels, a second copy imported under the bare names, and
re-registration of the same module under two names.
"""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_both_plugin_folders_are_flat():
    for folder in ("adapters", "techniques"):
        nested = [p for p in (ROOT / folder).iterdir() if p.is_dir() and p.name != "__pycache__"]
        assert not nested, f"{folder}/ must stay flat (wheels drop unlisted sub-packages): {nested}"


def test_wheel_contains_every_adapter_and_technique(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("archbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, package in (("adapters", "archbench/adapters"), ("techniques", "archbench/techniques")):
        for module in (ROOT / folder).glob("*.py"):
            assert f"{package}/{module.name}" in names, f"{module} missing from the wheel"
    for module in (ROOT / "archbench").rglob("*.py"):
        assert str(module.relative_to(ROOT)) in names
    assert not any(n.startswith(("adapters/", "techniques/")) for n in names)


def test_no_source_imports_the_bare_names():
    for path in ROOT.glob("**/*.py"):
        if any(part in {"venv", ".venv", "build", "dist"} for part in path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] not in {"adapters", "techniques"}, f"{path} imports {mod}"


def test_loading_every_builtin_never_imports_the_bare_names():
    code = ("import sys; from archbench import registry\n"
            "for kind in ('adapters', 'techniques', 'tasks'):\n"
            "    [registry.get(kind, n) for n in registry.names(kind)]\n"
            "assert 'adapters' not in sys.modules and 'techniques' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
