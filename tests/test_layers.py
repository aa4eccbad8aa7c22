"""The layering rules (common rules, "Layout"): iothub/ is sans-IO, and the import-linter
contracts in pyproject.toml hold."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_iotfailover

PACKAGE = Path(pytest_iotfailover.__file__).parent
IO_MODULES = {"asyncio", "socket", "ssl", "threading", "selectors"}
CLOCK_CALLS = {"time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"}

# Every contract in pyproject.toml must report KEPT.
KEPT = [
    "iothub/ is sans-IO: standard library, model and errors only",
    "fakehub/ never imports pytest or azure",
    "backends/real/ never imports fakehub/",
    "devices/ never imports the hub or the backends",
    "only plugin/ imports pytest",
]
EXPECTED_BROKEN: list[str] = []


def _problems(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in IO_MODULES:
                    yield node.lineno, f"imports {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in IO_MODULES:
                yield node.lineno, f"imports from {node.module}"
            if node.module == "time" and any(a.name in CLOCK_CALLS for a in node.names):
                yield node.lineno, "imports a clock from time"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if isinstance(func.value, ast.Name) and func.value.id == "time" and func.attr in CLOCK_CALLS:
                yield node.lineno, f"calls time.{func.attr}() (the driver passes `now`)"


def test_iothub_is_sans_io():
    files = sorted((PACKAGE / "iothub").rglob("*.py"))
    assert files
    found = [f"{f.relative_to(PACKAGE)}:{line}: {what}" for f in files for line, what in _problems(f)]
    assert found == []


def test_the_checker_sees_what_it_must_refuse(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom threading import Lock\nimport time\nx = time.time()\n"
                   "y = time.monotonic()\nz = time.gmtime(0)\n")
    assert [line for line, _ in _problems(bad)] == [1, 2, 4, 5]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install import-linter)")
    root = PACKAGE.parent
    if not (root / "pyproject.toml").is_file():
        pytest.skip("needs the source tree's pyproject.toml")
    # lint-imports exits 1 when any contract is broken; the statuses are read from its output
    run = subprocess.run([exe, "--no-cache"], check=False, cwd=root, capture_output=True, text=True, timeout=120)
    return run.stdout + run.stderr


def test_import_contracts():
    out = _lint_imports()
    status = {}
    for line in out.splitlines():
        for word in ("KEPT", "BROKEN"):
            if line.rstrip().endswith(" " + word):
                status[line.rstrip()[:-len(word)].strip()] = word
    for name in KEPT:
        assert status.get(name) == "KEPT", f"{name}: {status.get(name)}\n{out}"
    assert set(status) <= set(KEPT) | set(EXPECTED_BROKEN), f"unknown contracts: {set(status) - set(KEPT)}"
