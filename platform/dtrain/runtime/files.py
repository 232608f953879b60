"""What every module that writes files or reports errors needs: files private to their user,
atomic writes, an exception as one line. Imports nothing heavy (no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its message's first line, else its type."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


PRIVATE = 0o077
"""The permission bits a private process never grants: every bit of the group's and others'."""
_users_umask: int | None = None


def keep_private(private: bool = True) -> None:
    """What this process (and what it starts) writes from now on: readable and writable by its
    user alone (the umask's group and other bits all set: folders 0700, files 0600), or, not
    `private`, as the user's own umask says (e.g. 002 for a group's shared folder).

    A run's folder holds its data's statistics, its weights and its recipe, and a local MLflow
    store every param: on a host many users share, those are not everyone's to read."""
    global _users_umask
    current = os.umask(PRIVATE)
    if _users_umask is None:
        _users_umask = current
    os.umask(_users_umask | PRIVATE if private else _users_umask)


def _umask() -> int:
    current = os.umask(PRIVATE)
    os.umask(current)
    return current


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` then rename over `path`: a reader sees the old file or the new one, never
    half. The temporary name is per process, so ranks writing the same file do not collide.
    The file gets the mode the umask gives a new file, whatever mode `write` created it with
    (some writers create 0600, some 0644)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
