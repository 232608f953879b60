"""Where checkpoints meet other features and faults: a background write and an error, a kill
inside publication, ranks with different folder listings, a damaged file in a DCP part, and
crafted pickles in each checkpoint kind (refused: nothing of theirs runs).

Each test breaks the property on purpose where it can (the pre-fix behaviour is named)."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import PY, ROOT, check, run_dtrain, spawn

from dtrain import checkpoint
from dtrain.checkpoint import dcp

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
FAULTY = ["task=faulty:FaultyTask", "model.hidden=32", "data.augment=false", "tracking.enabled=false"]


@pytest.mark.slow
def test_a_best_that_moves_to_the_newest_leaves_no_stray_checkpoint_behind(tmp_path):
    """checkpoint.keep=1 with keep_best: step 4 was the best; step 8 is written and becomes the
    best. The rotation at step 8's publication kept step 4 (the best then); marking step 8 best
    rotates again, so step 4 goes (it was left behind, beside step 8)."""
    from dtrain.checkpoint import store

    root = tmp_path / "checkpoints"
    for step in (4, 8):
        (root / f".tmp-step_{step:08d}").mkdir(parents=True)
        store._publish(root, root / f".tmp-step_{step:08d}", root / f"step_{step:08d}", keep=1)
        if step == 4:
            store.mark_best(root, root / "step_00000004", keep=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000008"]
    store.mark_best(root, root / "step_00000008", keep=1)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000008"]


def test_error_while_a_background_write_is_in_flight_publishes_it(tmp_path):
    """Async checkpoint at step 4, inputs NaN from step 5, abort after 1 non-finite step: the
    step-4 write was still unpublished when the error came (it stayed `.tmp-step_4` and
    resume=auto started at 0). Now it is published on the way out and resumed from."""
    out = tmp_path / "out"
    args = [
        "train",
        RECIPE,
        *FAULTY,
        "train.max_steps=12",
        "checkpoint.every_steps=4",
        "checkpoint.async=true",
        "train.max_nonfinite_steps=1",
        f"output_dir={out}",
    ]
    proc = run_dtrain([*args, "model.fault=nan:0:5"], cwd=tmp_path, nproc=2)
    assert proc.returncode != 0 and "non-finite" in proc.stderr
    assert "the checkpoint of step 4, written in the background, was published" in proc.stdout + proc.stderr
    assert checkpoint.named(out / "checkpoints") == "step_00000004"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    proc = check(run_dtrain([*args, "resume=auto"], cwd=tmp_path, nproc=2))
    assert "resumed at step 4" in proc.stdout


def _checkpoint_folder(root, step):
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True)
    checkpoint.atomic_save({"trainer": {"step": step}, "rng": []}, folder / checkpoint.TRAINER)
    return folder


KILL_AT_RENAME = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from dtrain.checkpoint import store
    real = os.replace
    def replace(src, dst):
        if Path(src).name.startswith(".tmp-"):  # the new folder's rename: die just before it
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
    root = Path(sys.argv[1])
    store._publish(root, root / ".tmp-step_00000008", root / "step_00000008", keep=1)
""")


def test_a_kill_inside_publication_leaves_a_complete_checkpoint_named(tmp_path):
    """keep=1, step 8 written again (a resumed run re-saving it), the process SIGKILLed just
    before the new folder's rename. Before: the old folder was already deleted, `latest` named
    nothing and resume=auto started at step 0. Now the old one is aside and still found."""
    root = tmp_path / "checkpoints"
    _checkpoint_folder(root, 8)
    (root / checkpoint.LATEST).write_text("step_00000008\n")
    shutil.copytree(root / "step_00000008", root / ".tmp-step_00000008")
    proc = subprocess.run([PY, "-c", KILL_AT_RENAME, str(root)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (root / "step_00000008").exists()  # killed inside the window
    found = checkpoint.candidates(root)
    assert [p.name for p in found] == [".old-step_00000008"]
    assert checkpoint.load(found[0], {})["trainer"]["step"] == 8
    # `latest` naming a missing folder with nothing else there is an error, never a fresh start.
    shutil.rmtree(found[0])
    out = tmp_path / "out"
    shutil.copytree(root, out / "checkpoints")
    proc = run_dtrain(["train", RECIPE, *FAULTY, "resume=auto", f"output_dir={out}"], cwd=tmp_path)
    assert proc.returncode == 2 and "names step_00000008, which is missing" in proc.stderr, proc.stderr[-2000:]


def _stale_listing(rank, world, roots, results):
    # Rank 1's view of the folder lacks the newest checkpoint (a stale network-FS listing).
    folder, _ = checkpoint.load_newest(roots[rank], {}, lambda client: None)
    results.put((rank, folder.name))


def test_every_rank_loads_the_checkpoint_rank_0_chose(tmp_path):
    shared, stale = tmp_path / "shared", tmp_path / "stale"
    for step in (4, 8):
        _checkpoint_folder(shared, step)
    _checkpoint_folder(stale, 4)
    queue = torch.multiprocessing.get_context("spawn").Manager().Queue()
    spawn(_stale_listing, 2, [shared, stale], queue)
    chosen = dict(queue.get() for _ in range(2))
    assert chosen == {0: "step_00000008", 1: "step_00000008"}  # before: rank 1 took step_00000004


@pytest.fixture(scope="module")
def fsdp_ema_run(tmp_path_factory):
    """A 2-rank FSDP2 run with EMA, checkpoints at steps 4 and 8 (DCP parts `model/`, `ema/`)."""
    root = tmp_path_factory.mktemp("fsdp_ema")
    out = root / "out"
    check(
        run_dtrain(
            [
                "train",
                RECIPE,
                *FAULTY,
                "engine=fsdp",
                "ema.decay=0.9",
                "train.max_steps=8",
                "checkpoint.every_steps=4",
                "checkpoint.keep=2",
                f"output_dir={out}",
            ],
            cwd=root,
            nproc=2,
        )
    )
    return out


def _copy(run, dest):
    shutil.copytree(run, dest)
    return dest


@pytest.mark.slow
def test_a_truncated_dcp_shard_falls_back_to_the_previous_checkpoint(fsdp_ema_run, tmp_path):
    """A truncated `ema/__0_0.distcp` gave a CheckpointException traceback; now it is skipped
    like a damaged `state.pt`, and the run resumes from step 4."""
    out = _copy(fsdp_ema_run, tmp_path / "out")
    shard = out / "checkpoints" / "step_00000008" / "ema" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    proc = check(
        run_dtrain(
            [
                "train",
                RECIPE,
                *FAULTY,
                "engine=fsdp",
                "ema.decay=0.9",
                "train.max_steps=10",
                "resume=auto",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
            nproc=2,
        )
    )
    assert "resume: skipping step_00000008" in proc.stderr and "resumed at step 4" in proc.stdout
    assert "Traceback" not in proc.stderr


class _Payload:
    """Unpickling this runs a command (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("part", ["model/.metadata", "ema/.metadata"])
@pytest.mark.slow
def test_a_crafted_dcp_metadata_is_refused_and_runs_nothing(fsdp_ema_run, tmp_path, part):
    """The same file made `os.system` run on resume=auto (DCP reads `.metadata` with pickle)."""
    out = _copy(fsdp_ema_run, tmp_path / "out")
    marker = tmp_path / "pwned"
    (out / "checkpoints" / "step_00000008" / part).write_bytes(pickle.dumps(_Payload(marker)))
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            *FAULTY,
            "engine=fsdp",
            "ema.decay=0.9",
            "train.max_steps=10",
            "resume=auto",
            f"output_dir={out}",
        ],
        cwd=tmp_path,
        nproc=2,
    )
    assert not marker.exists(), "the crafted pickle ran"
    assert proc.returncode == 0 and "references posix.system" in proc.stderr and "Traceback" not in proc.stderr
    assert "resumed at step 4" in proc.stdout
    # The guard is what stops it: torch's own reader runs the payload.
    from torch.distributed.checkpoint import FileSystemReader

    with pytest.raises(AttributeError):  # os.system's exit code is no Metadata: after it ran
        FileSystemReader(out / "checkpoints" / "step_00000008" / part.split("/")[0]).read_metadata()
    assert marker.exists()


def test_a_crafted_metadata_file_is_one_line_without_torchs_tracebacks(tmp_path, caplog):
    """DCP's loader logs an unreadable `.metadata` with its traceback twice before it raises
    (25 lines before dtrain's one); dtrain's load keeps the line alone."""
    import logging

    from torch.distributed.checkpoint import state_dict_loader, state_dict_saver

    marker = tmp_path / "pwned"
    state_dict_saver.save({"x": torch.zeros(2)}, checkpoint_id=tmp_path / "ck", no_dist=True)
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    caplog.set_level(logging.WARNING)
    with pytest.raises(RuntimeError, match="references posix.system"):
        dcp.dcp_load({"x": torch.zeros(2)}, tmp_path / "ck", no_dist=True)
    assert not marker.exists() and not [r for r in caplog.records if r.exc_info]
    with pytest.raises(BaseException):  # noqa: B017 (DCP's own loader, with dtrain's safe reader: the tracebacks)
        state_dict_loader.load({"x": torch.zeros(2)}, storage_reader=dcp.SafeReader(tmp_path / "ck"), no_dist=True)
    assert len([r for r in caplog.records if r.exc_info]) == 2 and not marker.exists()


def test_crafted_bytes_inside_a_shard_are_refused(tmp_path):
    """A non-tensor value in a DCP shard is read with weights_only=True (DCP's default planner
    unpickles it freely)."""
    from torch.distributed.checkpoint import state_dict_saver

    marker = tmp_path / "pwned"
    state_dict_saver.save({"x": _Payload(marker)}, checkpoint_id=tmp_path / "ck", no_dist=True)
    assert not marker.exists()
    with pytest.raises(Exception) as e:
        dcp.dcp_load({"x": 0}, tmp_path / "ck", no_dist=True)
    assert not marker.exists() and "not plain data" in dcp.first_cause(e.value)


def test_cifar_pickles_load_numbers_and_refuse_code(tmp_path):
    import numpy as np

    from dtrain.config import ConfigError
    from dtrain.data import images

    batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1, 2]}
    for name in ("data_batch_1", "test_batch"):
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    train, test = images.cifar10(tmp_path)
    assert len(train) == 2 and len(test) == 2
    marker = tmp_path / "pwned"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [1]}))
    with pytest.raises(ConfigError, match="posix.system"):
        images.cifar10(tmp_path)
    assert not marker.exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
