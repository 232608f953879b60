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
