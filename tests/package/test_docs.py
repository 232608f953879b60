"""The documentation is a site: `mkdocs build --strict` (a broken link, a missing page or a
reference to code that is not there fails it), every training feature has its page and is listed,
and the README stays a front door."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build(root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = build(ROOT, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_the_site_builds_strictly_and_lists_every_feature(site):
    from dtrain import features

    index = (site / "features" / "index.html").read_text()
    for f in features.registry():
        assert f"<code>{f.__name__}</code>" in index, f"{f.__name__} is not in the features table"
    assert (site / "reference" / "protocols" / "index.html").exists()


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_a_broken_link_fails_the_build(tmp_path):
    """What --strict guards against, made on purpose: a page linking to one that is not there."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# x\n\nSee [the missing page](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: x\nstrict: true\n")
    assert build(tmp_path, tmp_path / "site").returncode != 0
