"""The package ships py.typed: its annotations are a promise, checked here with mypy --strict
as configured in pyproject.toml, so a change that breaks them fails CI, not a user's IDE."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mypy(*paths: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_package_is_mypy_strict_clean():
    out = mypy()  # the files pyproject.toml names: platform/dtrain
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_configuration_is_strict(tmp_path):
    """What the check guards against: an unannotated function and an Any leaking out are errors."""
    bad = tmp_path / "loose.py"
    bad.write_text(
        "import json\n\ndef parse(text):\n    return json.loads(text)\n\n"
        "def count(text: str) -> int:\n    return json.loads(text)\n"
    )
    out = mypy(str(bad))
    assert out.returncode == 1
    assert "[no-untyped-def]" in out.stdout and "[no-any-return]" in out.stdout, out.stdout
