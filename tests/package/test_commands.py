"""Every command the docs, the README, a recipe's header or an example's docstring print is one a
user can paste: `dtrain` parses it as written (`dtrain.cli.parser.parse`, what `dtrain` itself
runs), the recipe it names loads with its overrides, and an example script's own parser takes
its arguments. The commands the docs show being refused (a misspelt key, a batch that does not
split) are refused. Parsing and loading only: what the commands then do is tested where each
command is."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from dtrain.cli.parser import parse
from dtrain.errors import Failure

SOURCES = [
    *sorted(ROOT.glob("docs/**/*.md")),
    ROOT / "README.md",
    *sorted(ROOT.glob("recipes/*.yaml")),
    *sorted(ROOT.glob("examples/**/*.py")),
    *sorted(ROOT.glob("examples/**/*.md")),
    *sorted(ROOT.glob("examples/**/*.yaml")),
]
# Placeholders a user fills in: `...`, an optional `[--flag]`, a shell variable, an UPPERCASE name.
PLACEHOLDER = re.compile(r"\.\.\.|\[--|\$[A-Z]|\b[A-Z][A-Z_]{3,}\b")
# Shown in the docs with the line they are refused with.
REFUSED = {"optim.lrr=0.1": "optim.lrr", "data.global_batch_size=63": "data.global_batch_size"}
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(dtrain|python) \S")


def _lines(path: Path) -> list[str]:
    """The command lines `path` shows: in a Markdown file's code blocks, in a recipe's or a
    script's comments and docstring; `\\` continuations joined."""
    text = path.read_text()
    if path.suffix == ".md":
        text = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
    found, held = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if path.suffix in (".yaml", ".py"):
            line = re.sub(r"^#\s*", "", line)
        line = (held + " " + re.sub(r"^\$\s*", "", line)).strip()
        held = line[:-1] if line.endswith("\\") else ""
        if not held and COMMAND.match(line):
            found.append(line)
    return found


def documented() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), line) for p in SOURCES for line in _lines(p)]


DOCUMENTED = documented()


def _file(source: str, path: str) -> Path | None:
    """The file a documented path (a recipe, a script) names: beside an example's own files, else from the
    repository's root (a user's own `recipe.yaml` in the guides is not here)."""
    for base in (ROOT / source).parent, ROOT:
        if (base / path).is_file():
            return base / path
    return None


def test_the_docs_print_commands():
    """What the collection guards against: finding nothing (a changed code-fence style)."""
    found = DOCUMENTED
    assert len(found) >= 40 and sum(line.startswith("dtrain train") for _, line in found) >= 10, found


DTRAIN = [x for x in DOCUMENTED if x[1].startswith("dtrain ")]
SCRIPTS = [x for x in DOCUMENTED if x[1].startswith("python ")]


@pytest.mark.parametrize("source,line", DTRAIN, ids=[f"{s}:{i}" for i, (s, _) in enumerate(DTRAIN)])
def test_a_documented_dtrain_command_parses_and_its_recipe_loads(source, line):
    from dtrain import data
    from dtrain.train.config import load_config

    if PLACEHOLDER.search(line):
        pytest.skip("holds a placeholder")
    argv = shlex.split(line, comments=True)[1:]
    args = parse(argv)  # exits 2 with argparse's line on a command dtrain would not take
    recipe = _file(source, args.recipe) if getattr(args, "recipe", None) else None
    if recipe is None:
        return
    refused = [key for override, key in REFUSED.items() if override in args.overrides]
    try:
        cfg = load_config(recipe, list(args.overrides))
        data.plan_batches(cfg, getattr(args, "nproc_per_node", 0) or 1)
    except Failure as e:
        if "no such" in str(e) and not refused:
            return  # a file the guide's earlier step makes (a data table, a teacher run): keys and values taken
        assert refused and refused[0] in str(e), f"{source}: `{line}`: {e}"
    else:
        assert not refused, f"{source}: `{line}` is shown refused, and was not"


def _parsed_by_its_script(script: Path, argv: list[str]) -> argparse.Namespace:
    """The script's own parser on `argv`: the script runs as `__main__` up to its parse."""

    class Parsed(Exception):
        pass

    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_intermixed_args")}

    def stop(name):
        def parsed(self, *a, **k):
            raise Parsed(originals[name](self, *a, **k))

        return parsed

    old_argv = sys.argv
    try:
        for name in originals:
            setattr(argparse.ArgumentParser, name, stop(name))
        sys.argv = [str(script), *argv]
        runpy.run_path(str(script), run_name="__main__")
    except Parsed as e:
        return e.args[0]
    finally:
        sys.argv = old_argv
        for name, fn in originals.items():
            setattr(argparse.ArgumentParser, name, fn)
    raise AssertionError(f"{script} never parsed its arguments")


@pytest.mark.parametrize("source,line", SCRIPTS, ids=[f"{s}:{i}" for i, (s, _) in enumerate(SCRIPTS)])
def test_a_documented_example_command_parses(source, line):
    argv = shlex.split(line, comments=True)[1:]
    if PLACEHOLDER.search(line) or not argv[0].endswith(".py"):
        pytest.skip("holds a placeholder, or is not a script of this repository")
    script = _file(source, argv[0])
    assert script is not None, f"{source}: `{line}`: no such script"
    _parsed_by_its_script(script, argv[1:])


def test_a_command_dtrain_would_not_take_fails_here():
    """What the parse guards against, shown: a misspelt option, to dtrain and to an example."""
    with pytest.raises(SystemExit):
        parse(["train", "recipes/cnn_digits.yaml", "--nprocs-per-node", "2"])
    script = ROOT / "examples" / "ray" / "train_on_ray.py"
    with pytest.raises(SystemExit):
        _parsed_by_its_script(script, ["recipes/cnn_digits.yaml", "--nodes", "2", "train.epochs=2"])
