"""Atomic checkpoints, exact resume, and what happens when either goes wrong.

Layout under `output_dir/checkpoints/`:

    step_00000020/        one complete checkpoint:
        trainer.pt          loop position, every rank's RNG state, task state, MLflow run id
        model/              each engine's files (DDP: state.pt; DeepSpeed: its own layout);
        g/ d/               a GAN has two engines
    step_00000040/
    latest                name of the newest complete one

A checkpoint is written into `.tmp-step_XXXXXXXX/` and renamed into place only when every
rank has written its part, then `latest` is replaced (write + rename). A crash or a full
disk mid-write leaves (or, on an error, removes) a `.tmp-*` folder that is never read: the
previous checkpoint stays `latest`. `resume=auto` takes the newest checkpoint that loads and
falls back past broken ones with a warning. Nothing here deletes a checkpoint except the
`checkpoint.keep` rotation of the run that wrote them (and `checkpoint.overwrite=true`).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils._pytree import tree_map_only

from dtrain.errors import (
    CheckpointError as CheckpointError,
)
from dtrain.errors import (
    CheckpointWriteError as CheckpointWriteError,
)
from dtrain.errors import (
    ResumeRefused as ResumeRefused,
)
from dtrain.protocols import Checkpointed
from dtrain.runtime import distributed
from dtrain.runtime.files import atomic_write, first_line

log = logging.getLogger("dtrain")

LATEST = "latest"
BEST = "best"
"""Names the checkpoint of the best evaluation (`early_stop.metric`); rotation keeps it."""
TRAINER = "trainer.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically and durably (fsync before the rename)."""

    def write(tmp: Path) -> None:
        # Unbuffered: a full disk surfaces in torch's writer as the OSError that caused it
        # (torch reports it as a RuntimeError "unexpected pos", with the OSError as context).
        with open(tmp, "wb", buffering=0) as f:
            torch.save(obj, f)
            os.fsync(f.fileno())

    atomic_write(path, write)


_writer: ThreadPoolExecutor | None = None


def save_in_background(obj: Any, path: Path) -> Future[None]:
    """`atomic_save` of a CPU copy of `obj`, on a writer thread: the caller may go on changing
    the original (the next optimizer step) while the copy goes to disk."""
    global _writer
    copy = tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), obj)
    if _writer is None:
        _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtrain-checkpoint")
    return _writer.submit(atomic_save, copy, path)


def io_error_line(e: BaseException, where: Path) -> str:
    """An I/O failure as "path: cause", looking through torch's wrapping for the OSError."""
    cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
    if cause is None:
        return f"{where}: {first_line(e)}"
    return f"{cause.filename or where}: {cause.strerror or first_line(cause)}"


def load_file(path: Path, device: torch.device | str = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, no pickled code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        raise CheckpointError(f"cannot load {path}: {first_line(e)}") from None


def save(
    root: Path, step: int, engines: dict[str, Any], client_state: dict[str, Any], keep: int, background: bool = False
) -> Pending:
    """Collective: every rank calls it. Returns the checkpoint, to `finish()` (at once, or
    with `background` once the engines' writes, going on in threads, are wanted done).

    An I/O error on any rank (disk full, read-only file system, quota) ends in a
    `CheckpointWriteError` on every rank, the temporary folder removed and `latest`
    untouched: the ranks agree on success with one all-reduce instead of a barrier, so a
    rank that failed never leaves the others waiting.
    """
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    error = ""
    futures: list[Future[Any]] = []
    try:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as e:
        error = io_error_line(e, tmp)
    if distributed.agree(not error):
        try:
            for name, engine in engines.items():
                future = engine.save(tmp / name, background=background)
                if future is not None:
                    futures.append(future)
            if distributed.is_main():
                atomic_save(client_state, tmp / TRAINER)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            error = io_error_line(e, tmp)
    return Pending(root, step, tmp, final, keep, futures, error)


class Pending:
    """A checkpoint being written: `finish` waits for its files, then publishes it."""

    def __init__(
        self, root: Path, step: int, tmp: Path, final: Path, keep: int, futures: list[Future[Any]], error: str
    ):
        self.root, self.step, self.tmp, self.final, self.keep = root, step, tmp, final, keep
        self.futures, self.error = futures, error
        self.started = time.perf_counter()

    def written(self) -> bool:
        """This rank's writes have ended (well or not)."""
        return all(f.done() for f in self.futures)

    def finish(self) -> Path:
        """Collective: wait for every rank's writes, then rename into place and move `latest`."""
        error = self.error
        for future in self.futures:
            try:
                future.result()
            except Exception as e:  # the writer thread's failure, e.g. the disk filled meanwhile
                error = error or io_error_line(e, self.tmp)
        error = distributed.first_error(error)  # the same words on every rank
        if distributed.is_main():
            if error:
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                try:
                    _publish(self.root, self.tmp, self.final, self.keep)
                except OSError as e:
                    error = io_error_line(e, self.root)
        error = distributed.first_error(error)
        if error:
            raise CheckpointWriteError(
                f"checkpoint at step {self.step} not written: {error}; the previous checkpoint stays the latest"
            )
        return self.final

    def settle(self, wait_s: float = 60.0) -> str:
        """Without collectives (an error may have stopped other ranks anywhere): wait for this
        rank's writes and mark its part done; rank 0 then waits up to `wait_s` for every rank's
        mark and publishes the checkpoint when all are there. Returns what happened, to say."""
        ok = not self.error
        for future in self.futures:
            try:
                future.result(timeout=wait_s)
            except Exception:  # a failed or stalled write: this rank's part is not there
                ok = False
        if ok:
            try:
                (self.tmp / WRITTEN.format(distributed.rank())).touch()
            except OSError:
                ok = False
        if not distributed.is_main():
            return ""
        marks = [self.tmp / WRITTEN.format(r) for r in range(distributed.world_size())]
        deadline = time.monotonic() + wait_s
        while ok and not all(m.exists() for m in marks) and time.monotonic() < deadline:
            time.sleep(0.2)
        if ok and all(m.exists() for m in marks):
            for m in marks:
                m.unlink()
            try:
                _publish(self.root, self.tmp, self.final, self.keep)
                return f"the checkpoint of step {self.step}, written in the background, was published"
            except OSError as e:
                return f"the checkpoint of step {self.step} could not be published: {io_error_line(e, self.root)}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        return f"the checkpoint of step {self.step}, being written in the background, was incomplete and removed"


WRITTEN = ".written-rank{}"
"""A rank's marker in a temporary folder: its part of the checkpoint is on disk (`settle`)."""


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rank 0: rename the complete folder into place, point `latest` at it, rotate old ones.

    At every instant some complete checkpoint is named: the same step written again (a resumed
    run re-saving) first moves the old folder aside (`.old-step_X`, still complete, and found
    by `candidates` while `step_X` is missing), and only the new one's rename replaces it."""
    aside = root / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)  # a directory rename is atomic on POSIX file systems
    atomic_write(root / LATEST, lambda p: p.write_text(final.name + "\n"))
    shutil.rmtree(aside, ignore_errors=True)
    rotate(root, keep)


def rotate(root: Path, keep: int) -> None:
    """Rank 0: remove all but the `keep` newest checkpoints and the one `best` names."""
    best = (root / BEST).read_text().strip() if (root / BEST).exists() else ""
    for old in sorted(root.glob("step_*"))[:-keep]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def mark_best(root: Path, folder: Path, keep: int) -> None:
    """Rank 0: point `best` at a published checkpoint (which rotation then never removes), and
    rotate again: the checkpoint that was the best is an old one like any other now."""
    atomic_write(root / BEST, lambda p: p.write_text(folder.name + "\n"))
    rotate(root, keep)


def load(
    folder: Path, parts: Mapping[str, Checkpointed], validate: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Restore every part (engine, EMA) from `folder` (after `validate(client state)`); returns
    the trainer's client state."""
    client: dict[str, Any] = load_file(folder / TRAINER)
    if validate is not None:
        validate(client)
    for name, part in parts.items():
        if not (folder / name).is_dir() and part.required:
            raise CheckpointError(f"{folder} has no {name}/ (incomplete, or a checkpoint of another task)")
        part.load(folder / name)
    return client


def load_newest(
    root: Path, parts: Mapping[str, Checkpointed], validate: Callable[[dict[str, Any]], None]
) -> tuple[Path, dict[str, Any]]:
    """`resume=auto`: the newest checkpoint under `root` that loads on every rank.

    A broken one (truncated file, missing engine folder, another model) is skipped with a
    warning naming it; when none loads, the newest one's error is raised. Collective.
    """
    # Rank 0 lists, every rank loads what it chose: on a network file system a rank's listing
    # may be stale, and ranks resuming from different steps would train on silently.
    found: list[Path] = distributed.broadcast_object(candidates(root))
    first_error = ""
    for folder in found:
        try:
            client = load(folder, parts, validate)
            error = ""
        except ResumeRefused:
            raise
        except CheckpointError as e:
            error = str(e)
        error = distributed.first_error(error)
        if not error:
            return folder, client
        first_error = first_error or error
        log.warning("resume: skipping %s: %s", folder.name, error)
    raise CheckpointError(f"resume=auto: no checkpoint in {root} loads; the newest: {first_error}")


def candidates(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, newest first (the one `latest` names leads). A
    folder moved aside by `_publish` counts while its new version is not in place."""
    done = [p for p in root.glob("step_*") if p.is_dir()]
    done += [p for p in root.glob(".old-step_*") if p.is_dir() and not (root / p.name[len(".old-") :]).exists()]
    done.sort(key=lambda p: p.name.removeprefix(".old-"), reverse=True)
    pointed = named(root)
    if pointed:
        newest = root / pointed
        if not newest.exists() and (root / f".old-{pointed}").is_dir():
            newest = root / f".old-{pointed}"
        if newest in done:
            done.remove(newest)
            done.insert(0, newest)
    return done


def named(root: Path) -> str:
    """The folder name `latest` holds ("" when there is none)."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.exists() else ""


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = candidates(root)
    return found[0] if found else None


def resolve(resume: str, root: Path) -> Path:
    """An explicit `resume` path -> checkpoint folder (a checkpoints/ folder: its newest)."""
    p = Path(resume)
    if p.is_file():
        p = p.parent
    newest = latest(p) if (p / LATEST).exists() or list(p.glob("step_*")) else p  # a checkpoints/ folder: its newest
    if newest is None or not newest.is_dir():
        raise CheckpointError(f"resume={resume!r}: no checkpoint there")
    return newest


def clear(root: Path) -> int:
    """Remove an earlier run's checkpoints (`checkpoint.overwrite=true` only; rank 0). Returns how many."""
    found = list(root.glob("step_*")) + list(root.glob(".tmp-step_*")) + list(root.glob(".old-step_*"))
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    (root / LATEST).unlink(missing_ok=True)
    (root / BEST).unlink(missing_ok=True)
    return len([p for p in found if p.name.startswith("step_")])


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams as tensors and plain values (weights_only-loadable)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, on every rank (rank 0 saves them all)."""
    local = rng_state()
    if not torch.distributed.is_initialized():
        return [local]
    out: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(out, local)
    return out
