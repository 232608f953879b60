"""The errors dtrain shows as one line: `str()` is the line, `exit_code` the process's exit.

Every command maps them in one place (`dtrain.cli.main`, and `dtrain.train.job` on each rank), so
a module raises what went wrong and never prints or exits itself. Imports nothing.
"""

from __future__ import annotations

BAD_INPUT = 2
"""A bad recipe, override, file or launch environment: running again as is fails again."""
FAILED = 1
"""The work itself failed (training diverged, a write failed, trials failed)."""


def shown(message: str, rank: int = 0) -> str:
    """The error line as a rank prints it: `dtrain: error: ...`, `dtrain[rank 1]: error: ...`."""
    return ("dtrain: error: " if rank == 0 else f"dtrain[rank {rank}]: error: ") + message


class Failure(Exception):
    """One line for the user (`str()`), and the exit code that goes with it."""

    exit_code = BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class WorkFailed(Failure):
    """The work failed; running again may succeed (exit 1)."""

    exit_code = FAILED
