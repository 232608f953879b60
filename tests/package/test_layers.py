"""The package's shape, kept true: every module sits in one layer of the README's Architecture
table and imports only its own layer or those below; no import cycle, counting imports inside
functions; no function over 50 lines. One `ast` walk, no import of the code it reads."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "platform"

LAYERS: list[tuple[str, list[str]]] = [  # bottom up: the folders of platform/dtrain/, as `ls` shows them
    ("interfaces", ["dtrain", "dtrain.protocols", "dtrain.errors"]),
    ("runtime", ["dtrain.runtime"]),
    ("config", ["dtrain.config"]),
    ("services", ["dtrain.data", "dtrain.checkpoint", "dtrain.tracking"]),
    ("engines and tasks", ["dtrain.engines", "dtrain.tasks"]),
    ("features", ["dtrain.features"]),
    ("train", ["dtrain.train"]),
    ("studies and postrun", ["dtrain.studies", "dtrain.postrun"]),
    ("cli", ["dtrain.cli", "dtrain.__main__"]),
]
NOTHING_OF_DTRAIN = ("dtrain.protocols", "dtrain.errors")
MAX_FUNCTION_LINES = 50


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under `root` (a source root holding packages)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `mods` it imports, anywhere in it (inside functions too)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` folders up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import sub` imports the module `sub`; `from pkg import name`, pkg itself
                targets = [f"{base}.{a.name}" for a in node.names]
                targets += [] if all(t in mods for t in targets) else [base]
            else:
                continue
            for target in targets:
                while target and target not in mods:  # `from pkg import name`: the module, else pkg
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int | None:
    """The layer of the longest listed prefix of `module` (`dtrain.engines.ddp` -> `dtrain.engines`)."""
    best: tuple[int, int] | None = None
    for i, (_, names) in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return best[0] if best else None


def upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = layer_of(src), layer_of(dst)
            if a is not None and b is not None and b > a:
                bad.append(f"{src} ({LAYERS[a][0]}) imports {dst} ({LAYERS[b][0]})")
            if src in NOTHING_OF_DTRAIN:
                bad.append(f"{src} imports {dst}: it imports nothing of dtrain")
    return bad


def long_functions(mods: dict[str, Path]) -> list[str]:
    return [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, path in mods.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


@pytest.fixture(scope="module")
def package() -> tuple[dict[str, Path], dict[str, set[str]]]:
    mods = modules(SOURCE)
    return mods, imports(mods)


def test_every_module_has_a_layer_and_imports_only_downward(package):
    mods, graph = package
    assert not [m for m in mods if layer_of(m) is None], "place the new module in LAYERS and the README's table"
    assert upward(graph) == []


def test_no_import_cycle_even_inside_functions(package):
    assert cycles(package[1]) == []


def test_no_function_over_fifty_lines(package):
    assert long_functions(package[0]) == []


def test_the_walk_finds_a_back_import_inside_a_function(tmp_path):
    """What the checks guard against, made on purpose: a data module importing the loop inside a
    function (a cycle and an upward import), and a 51-line function."""
    for folder in ("dtrain", "dtrain/data", "dtrain/train"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "dtrain/train/fit.py").write_text("from dtrain.data import loaders\n")
    (tmp_path / "dtrain/data/loaders.py").write_text(
        "def f():\n    from dtrain.train.fit import fit\n" + "    x = 1\n" * 49
    )
    mods = modules(tmp_path)
    graph = imports(mods)
    assert cycles(graph) == [["dtrain.data.loaders", "dtrain.train.fit"]]
    assert upward(graph) == ["dtrain.data.loaders (services) imports dtrain.train.fit (train)"]
    assert long_functions(mods) == ["dtrain.data.loaders.f: 51 lines"]
