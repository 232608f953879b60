"""MkDocs hooks of this site: every page in docs/features/ is in the navigation, and the features
index lists the features the registry finds, so that a new feature's page needs no other edit."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

MARKER = "<!-- features-table -->"


def on_config(config: Any) -> Any:
    """Expand the nav entry `Features: features/` into the folder's pages (its index first)."""
    folder = Path(config["docs_dir"]) / "features"
    pages = sorted(p.name for p in folder.glob("*.md") if p.name != "index.md")
    for i, entry in enumerate(config["nav"]):
        if isinstance(entry, dict) and entry.get("Features") == "features/":
            config["nav"][i] = {"Features": ["features/index.md", *[f"features/{p}" for p in pages]]}
    return config


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    features = importlib.import_module("dtrain.features")
    rows = ["| feature | turned on by | its page | what it is |", "|---|---|---|---|"]
    docs = Path(page.file.abs_src_path).parent
    for f in features.registry():
        module = importlib.import_module(f.__module__)
        summary = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        name = f.__module__.rsplit(".", 1)[1]
        page_file = next((p.name for p in docs.glob("*.md") if p.stem.replace("-", "_") == name), "")
        link = f"[{name}]({page_file})" if page_file else name
        switch = f"`{f.key}.*`" if f.key else "always on"
        rows.append(f"| `{f.__name__}` | {switch} | {link} | {summary} |")
    return markdown.replace(MARKER, "\n".join(rows))
