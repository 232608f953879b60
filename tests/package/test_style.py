"""One formatter and one linter (ruff, configured in pyproject.toml) over the package, its tests,
benchmarks and examples: lines of at most 120 characters, sorted imports, no unused names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREES = ["platform", "tests", "benchmarks", "examples"]


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True)


def test_the_code_is_formatted_and_lint_clean():
    formatted = ruff("format", "--check", *TREES)
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    linted = ruff("check", *TREES)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_checks_fail_on_what_they_guard_against(tmp_path):
    """A long line and an unused import, made on purpose, fail both."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text("import os\n\nx = [" + ", ".join(["1"] * 60) + "]\n")
    assert ruff("format", "--check", "bad.py", cwd=tmp_path).returncode == 1
    found = ruff("check", "bad.py", cwd=tmp_path)
    assert found.returncode == 1 and "F401" in found.stdout


def test_the_benchmarks_import_the_test_support_they_name():
    """A benchmark that borrows the tests' launcher finds it where it is (tests/support/): the
    names it imports exist there, and the path it adds is that folder."""
    import ast

    support = {p.stem: p for p in (ROOT / "tests" / "support").glob("*.py")}
    defined = {
        stem: {n.id for node in ast.walk(ast.parse(p.read_text())) for n in getattr(node, "targets", [])
               if isinstance(n, ast.Name)}
        | {node.name for node in ast.parse(p.read_text()).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        for stem, p in support.items()
    }  # fmt: skip
    for bench in sorted((ROOT / "benchmarks").glob("*.py")):
        source = bench.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module in support:
                assert '"tests" / "support"' in source, f"{bench.name} imports {node.module} from elsewhere"
                missing = {a.name for a in node.names} - defined[node.module]
                assert not missing, f"{bench.name}: {sorted(missing)} not in tests/support/{node.module}.py"
