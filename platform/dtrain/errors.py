"""Every error dtrain shows as one line: `str()` is the line, `exit_code` the process's exit.

Every command maps them in one place (`dtrain.cli.parser.main`, and `dtrain.train.job` on each
rank), so a module raises what went wrong and never prints or exits itself. They all live here,
so that `except Failure` and the exit codes read in one place. Imports nothing.
"""

from __future__ import annotations

from typing import Any

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


class ConfigError(Failure, ValueError):
    """Bad input: `key=value: what would be valid` (exit 2)."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        Failure.__init__(self, f"{key}={value!r}: {expected}" if key else expected)


class LaunchError(Failure):
    """The launcher's environment is inconsistent (exit 2)."""


class CheckpointError(Failure):
    """A checkpoint that cannot be used (exit 2)."""


class ResumeRefused(CheckpointError):
    """The checkpoint loads but cannot continue this job (another world size under ZeRO,
    another global batch, another vocabulary): no fallback to an older one helps."""


class CheckpointWriteError(WorkFailed):
    """Writing a checkpoint failed (disk full, I/O error; exit 1)."""


class TrainingError(WorkFailed):
    """Training cannot go on (e.g. gradients stay non-finite; exit 1)."""


class CompareError(Failure):
    """Nothing to compare (exit 2)."""


class TooManyFailures(WorkFailed):
    """`--max-failures` trials of a search failed in this worker (exit 1)."""


class TrialRefused(Failure):
    """A search trial refused its recipe before training (exit 2: a bad key or value, e.g.
    `--metric` naming a metric the task does not report): every further trial would too."""
