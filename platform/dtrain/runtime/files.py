"""Two small things every module that writes files or reports errors needs: atomic writes
and an exception as one line. Imports nothing heavy (no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its message's first line, else its type."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then rename over `path`: a reader sees the old file or the new one, never
    half. The temporary name is per process, so ranks writing the same file do not collide."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
