"""Tables through Hugging Face `datasets` (the `hf` extra): `data.path` naming Parquet, Arrow,
JSON Lines or CSV files (a file, or a folder of one kind), or a folder that `save_to_disk`
wrote.

A table is opened memory-mapped (Arrow on disk: never read whole, pages come in as samples are
asked for) and read as a map-style dataset, row by row, so it goes through dtrain's own sampler:
sharded over the ranks, exact on mid-epoch resume, each sample's augmentation drawn from its own
stream (`dtrain.data`), the same at any world size. Files other than Arrow are converted once
into `datasets`' cache by local rank 0 of each machine while the others wait.

Splits: a `save_to_disk` DatasetDict's `validation` (else `test`) split is held out; otherwise
the last `data.val_fraction` of the rows, in file order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from dtrain.errors import ConfigError
from dtrain.runtime import distributed, optional

BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def is_table(path: str | os.PathLike[str]) -> bool:
    """Whether `data.path` names something this module reads (so a task can offer both kinds)."""
    p = Path(path)
    if p.is_dir():
        return (p / "dataset_dict.json").is_file() or (p / "dataset_info.json").is_file() or bool(_files(p))
    return p.suffix in BUILDERS


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.suffix in BUILDERS and f.is_file())


def open_splits(path: str, val_fraction: float, key: str = "data.path") -> tuple[Any, Any]:
    """(train, held-out) `datasets.Dataset`s of the table at `path`."""
    hf = optional.datasets(key, path)
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, path, "no such file or folder")
    with distributed.local_first():
        try:
            if (p / "dataset_dict.json").is_file():
                tables = hf.load_from_disk(str(p))
                held = next((s for s in ("validation", "test") if s in tables), None)
                if "train" not in tables or held is None:
                    raise ConfigError(
                        key,
                        path,
                        f"has splits {sorted(tables)}: a save_to_disk folder needs train and validation (or test)",
                    )
                return tables["train"], tables[held]
            if (p / "dataset_info.json").is_file():
                table = hf.load_from_disk(str(p))
            else:
                files = _files(p) if p.is_dir() else [p]
                kinds = {BUILDERS.get(f.suffix) for f in files}
                if not files or None in kinds or len(kinds) > 1:
                    raise ConfigError(
                        key, path, f"needs files of one kind: {', '.join(sorted(BUILDERS))} (or a save_to_disk folder)"
                    )
                table = hf.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
        except (OSError, ValueError) as e:  # unreadable or malformed files: the datasets library names them
            raise ConfigError(key, path, f"cannot be read as a table: {str(e).splitlines()[0][:300]}") from None
    n = len(table)
    keep = n - max(1, round(n * val_fraction))
    if keep < 1:
        raise ConfigError(key, path, f"has {n} rows: too few to hold out data.val_fraction={val_fraction}")
    return table.select(range(keep)), table.select(range(keep, n))


def columns(table: Any, wanted: dict[str, str], path: str) -> None:
    """Each `key: column` of `wanted` names a column of `table`, or one line naming the key."""
    for key, column in wanted.items():
        if column not in table.column_names:
            raise ConfigError(key, column, f"is not a column of {path} (its columns: {', '.join(table.column_names)})")


class Rows(Dataset[Any]):
    """Row i of a `datasets.Dataset`, made a sample by `transform(row)`. Pickles small: a
    memory-mapped table travels to loader workers as the paths of its Arrow files."""

    def __init__(self, table: Any, transform: Callable[[dict[str, Any]], Any], limit: int = 0):
        self.table, self.transform = table, transform
        self.n = min(len(table), limit) if limit else len(table)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.table[int(i)])
