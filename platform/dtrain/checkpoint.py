"""Atomic checkpoints and exact resume.

Layout under `output_dir/checkpoints/`:

    step_00000020/        one complete checkpoint:
        trainer.pt          loop position, every rank's RNG state, task state, MLflow run id
        model/              each engine's files (DDP: state.pt; DeepSpeed: its own layout);
        g/ d/               a GAN has two engines
    step_00000040/
    latest                name of the newest complete one

A checkpoint is written into `.tmp-step_XXXXXXXX/` and renamed into place only when every
rank has finished writing, then `latest` is replaced (write + rename). A crash mid-write
leaves a `.tmp-*` folder that is never read, never a half checkpoint named as latest.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain import distributed

LATEST = "latest"
TRAINER = "trainer.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; str() is the one line to show."""


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path: Path, device: torch.device | str = "cpu") -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, no pickled code."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"resume: {path} is missing (not a dtrain checkpoint?)") from None
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"resume: cannot load {path}: {first[:200]}") from None


def save(root: Path, step: int, engines: dict[str, Any], client_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    for name, engine in engines.items():
        engine.save(tmp / name)
    if distributed.is_main():
        atomic_save(client_state, tmp / TRAINER)
    distributed.barrier()
    if distributed.is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # a directory rename is atomic on POSIX file systems
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(folder: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Restore every engine from `folder`; returns the trainer's client state."""
    client = load_file(folder / TRAINER)
    for name, engine in engines.items():
        if not (folder / name).is_dir():
            raise CheckpointError(f"resume: {folder} has no {name}/ (a checkpoint of another task?)")
        engine.load(folder / name)
    return client


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    pointer = root / LATEST
    if pointer.exists():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    done = sorted(root.glob("step_*"))
    return done[-1] if done else None


def resolve(resume: str, root: Path) -> Path | None:
    """`resume` setting -> checkpoint folder (None: fresh start)."""
    if not resume:
        return None
    if resume == "auto":
        return latest(root)
    p = Path(resume)
    if p.is_file():
        p = p.parent
    if (p / LATEST).exists() or list(p.glob("step_*")):
        p = latest(p)  # a checkpoints/ folder was given: take its newest
    if p is None or not p.is_dir():
        raise CheckpointError(f"resume={resume!r}: no checkpoint there")
    return p


def clear(root: Path) -> int:
    """Remove an earlier run's checkpoints before a fresh start (rank 0). Returns how many."""
    found = list(root.glob("step_*")) + list(root.glob(".tmp-step_*"))
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    (root / LATEST).unlink(missing_ok=True)
    return len([p for p in found if p.name.startswith("step_")])


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This rank's RNG streams as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
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
