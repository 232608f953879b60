"""Nothing lost, nothing hung: re-runs, preemption, broken checkpoints, a full disk, an error
on one rank, unequal evaluation shards, and the engine/precision combinations no recipe runs.

Real torchrun jobs, real signals, a real (small) tmpfs that fills up, real truncated files.
The user task `faulty:FaultyTask` (tests/faulty.py) misbehaves on purpose where a test asks.
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pytest
import torch
from helpers import (
    PY,
    ROOT,
    check,
    env_for_cli,
    load_params,
    max_param_diff,
    mlflow_store,
    run_dtrain,
    spawn,
    torchrun_cmd,
    torchrun_env,
)

from dtrain import checkpoint, data
from dtrain.engines.precision import AmpPrecision
from dtrain.tasks.cnn import CNNTask
from dtrain.tasks.supervised import evaluate
from dtrain.train.config import load_config

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
# The BN-free MLP on digits, without augmentation (its shifts come from each rank's own RNG):
# fast, and a function of the global batch only.
FAULTY = ["task=faulty:FaultyTask", "model.hidden=32", "data.augment=false"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error: " in line and line.startswith("dtrain")]


def one_line(proc: subprocess.CompletedProcess) -> str:
    """dtrain's one error line; no traceback of dtrain's (torchrun's agent prints its own
    ChildFailedError traceback whenever a worker exits non-zero: that one is torchrun's)."""
    assert proc.stderr.count("Traceback") == proc.stderr.count("errors.ChildFailedError"), proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- data safety


@pytest.mark.slow
def test_rerun_never_deletes_checkpoints(tmp_path):
    out = tmp_path / "out"
    args = [
        "train",
        RECIPE,
        *FAULTY,
        "tracking.enabled=false",
        "train.max_steps=6",
        "checkpoint.every_steps=3",
        f"output_dir={out}",
    ]
    check(run_dtrain(args, cwd=tmp_path))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    again = run_dtrain(args, cwd=tmp_path)  # the same command twice: the most common thing a user does
    assert again.returncode == 2
    assert one_line(again) == (
        f"dtrain: error: output_dir={str(out)!r}: holds checkpoints of an earlier run (newest "
        "step_00000006); continue it with resume=auto, or start over with another output_dir "
        "or checkpoint.overwrite=true"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # On 2 ranks: the same line, from the one process that would start torchrun, before it does.
    ranks = run_dtrain([*args, "--nproc-per-node", "2"], cwd=tmp_path)
    assert ranks.returncode == 2 and ranks.stderr.strip() == one_line(again), ranks.stderr
    proc = check(run_dtrain([*args, "resume=auto", "train.max_steps=9"], cwd=tmp_path))
    assert "resumed at step 6" in proc.stdout
    proc = check(run_dtrain([*args, "checkpoint.overwrite=true"], cwd=tmp_path))  # starting over, on purpose
    assert "resumed" not in proc.stdout and "removed 2 checkpoint(s)" in proc.stderr


def _read_lines(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(text in line for line in lines):
            return
        assert proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"never saw {text!r}")


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_resumes_there(tmp_path):
    """Preempted at step >= 60 of 160 with checkpoint.every_steps=200: resume at that step, not 0."""
    uri = mlflow_store(tmp_path)
    args = [
        RECIPE,
        *FAULTY,
        "train.max_steps=160",
        "checkpoint.every_steps=200",
        "tracking.log_every=10",
        f"tracking.uri={uri}",
        "tracking.experiment=preempt",
        f"output_dir={tmp_path / 'out'}",
    ]
    agent = subprocess.Popen(
        torchrun_cmd(2, args[0], args[1:]),
        cwd=tmp_path,
        env=torchrun_env(env_for_cli()),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=_read_lines, args=(agent.stdout, lines), daemon=True).start()
    _wait_for(lines, "step 60/160", agent)
    t0 = time.time()
    agent.send_signal(signal.SIGTERM)  # as Kubernetes does to the container's main process
    stderr = agent.stderr.read()
    agent.wait(timeout=60)
    took = time.time() - t0
    assert agent.returncode != 0 and took < 30, (took, stderr[-3000:])  # well inside the 30 s grace period
    preempted = [line for line in lines if line.startswith("preempted by signal 15 at step")]
    assert preempted and "checkpoint written in" in preempted[0], "".join(lines)[-2000:]
    step = int(preempted[0].split("at step ")[1].split(":")[0])
    assert 60 <= step < 160
    assert checkpoint.latest(tmp_path / "out" / "checkpoints").name == f"step_{step:08d}"
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("preempt").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["dtrain.preempted_at_step"] == str(step)

    proc = check(run_dtrain(["train", *args, "resume=auto"], cwd=tmp_path, nproc=2))
    assert f"resumed at step {step} from step_{step:08d}" in proc.stdout
    run = client.get_run(run.info.run_id)  # the same run, continued and finished
    assert run.info.status == "FINISHED"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["run_id"] == run.info.run_id
    logged = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert logged == list(range(10, 161, 10))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the ignored interrupt, on purpose
def test_a_ctrl_c_ignored_inside_a_finalizer_stops_the_run_at_the_next_step(monkeypatch):
    """Python ignores an exception raised while a finalizer runs. Seen under load: Ctrl-C landed
    in SQLAlchemy's weakref callback during a garbage collection, was printed as "Exception
    ignored" and the run trained on. The interrupt is remembered and raised at the next step."""
    import os

    from dtrain.runtime import preemption

    monkeypatch.setattr(preemption, "_interrupted", False)
    monkeypatch.setattr(preemption, "_holding", False)  # an in-process run earlier in the session held signals
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *preemption.SIGNALS)}
    preemption.install()
    try:

        class Finalized:
            def __del__(self) -> None:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10_000):  # the handler runs in here: its KeyboardInterrupt is ignored
                    pass

        Finalized()
        with pytest.raises(KeyboardInterrupt):
            with preemption.step():
                pass
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _sigusr1_when(tmp_path, seen: str, *overrides: str) -> tuple[subprocess.Popen, list[str]]:
    """One process training until it prints `seen`, then SIGUSR1 (as SLURM sends it); ended."""
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "dtrain",
            "train",
            RECIPE,
            *FAULTY,
            "tracking.enabled=false",
            "train.max_steps=100000",
            *overrides,
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        env=env_for_cli(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    _wait_for(lines, seen, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 128 + signal.SIGUSR1
    return proc, lines


@pytest.mark.slow
def test_sigusr1_to_a_worker_checkpoints_and_exits(tmp_path):
    """SLURM's `--signal=USR1@60` reaches the process directly: the same stop, exit 128 + 10."""
    _, lines = _sigusr1_when(tmp_path, "step 40/100000", "tracking.log_every=20")
    assert any(line.startswith(f"preempted by signal {int(signal.SIGUSR1)}") for line in lines), lines[-5:]
    assert checkpoint.latest(tmp_path / "out" / "checkpoints") is not None


@pytest.mark.slow
def test_a_signal_during_a_long_evaluation_checkpoints_instead_of_giving_up(tmp_path):
    """The grace timer (`train.collective_timeout_s`) covers steps only: a healthy rank in a
    4 s evaluation with a 1 s grace used to exit "stuck in a step" without a checkpoint."""
    proc, lines = _sigusr1_when(
        tmp_path,
        "slow evaluation",
        "train.eval_every_steps=4",
        "model.fault=slow_eval:0:4",
        "train.collective_timeout_s=1",
    )
    assert "stuck in a step" not in proc.stderr.read()
    assert any(line.startswith(f"preempted by signal {int(signal.SIGUSR1)} at step 4") for line in lines), lines[-5:]
    assert checkpoint.latest(tmp_path / "out" / "checkpoints").name == "step_00000004"


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """One short run with checkpoints at steps 4, 8 and 12, copied fresh for each test."""
    root = tmp_path_factory.mktemp("ckpts")
    check(
        run_dtrain(
            [
                "train",
                RECIPE,
                *FAULTY,
                "tracking.enabled=false",
                "train.max_steps=12",
                "checkpoint.every_steps=4",
                "checkpoint.keep=3",
                f"output_dir={root / 'out'}",
            ],
            cwd=root,
        )
    )
    return root / "out"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_last_good_one(three_checkpoints, tmp_path):
    out = _copy(three_checkpoints, tmp_path / "out")
    ckpts = out / "checkpoints"
    state = ckpts / "step_00000012" / "model" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a crash
    shutil.rmtree(ckpts / "step_00000008" / "model")  # an engine folder missing
    proc = check(
        run_dtrain(
            [
                "train",
                RECIPE,
                *FAULTY,
                "tracking.enabled=false",
                "train.max_steps=14",
                "resume=auto",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
        )
    )
    warned = [line for line in proc.stderr.splitlines() if "resume: skipping" in line]
    assert len(warned) == 2 and "step_00000012" in warned[0] and "step_00000008" in warned[1], proc.stderr
    assert "resumed at step 4 from step_00000004" in proc.stdout


@pytest.mark.slow
def test_no_loadable_checkpoint_is_one_line_naming_the_file(three_checkpoints, tmp_path):
    out = _copy(three_checkpoints, tmp_path / "out")
    for folder in (out / "checkpoints").glob("step_*"):
        (folder / "trainer.pt").write_bytes(b"truncated")
    proc = run_dtrain(
        ["train", RECIPE, *FAULTY, "tracking.enabled=false", "resume=auto", f"output_dir={out}"], cwd=tmp_path
    )
    assert proc.returncode == 2
    line = one_line(proc)
    assert (
        line.startswith("dtrain: error: resume=auto: no checkpoint in")
        and str(out / "checkpoints" / "step_00000012" / "trainer.pt") in line
    ), line


@pytest.mark.parametrize(
    "overrides,names",
    [([*FAULTY, "model.hidden=48"], "size mismatch for 1.weight"), (["task=cnn"], "holds a different model")],
    ids=["width", "task"],
)
@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_line(three_checkpoints, tmp_path, overrides, names):
    out = _copy(three_checkpoints, tmp_path / "out")
    proc = run_dtrain(
        ["train", RECIPE, *overrides, "tracking.enabled=false", f"resume={out / 'checkpoints'}", f"output_dir={out}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert names in one_line(proc)


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB tmpfs (root only; CI runs as root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full test did not run")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("write", ["sync", "async"])
@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(small_disk, tmp_path, write):
    """Rank 0 fills the disk at step 7; the step-8 checkpoint fails on a real ENOSPC. Written
    asynchronously, the failure comes out of the writer thread when the next checkpoint (the
    last, at step 12) waits for it: the same line, the same state on disk. (Step 7: a
    background checkpoint is published after the step its ranks agreed it was written, the
    step-4 one after step 6.)"""
    uri = mlflow_store(tmp_path)  # the tracking store is on another disk
    out = small_disk / "out"
    args = [
        "train",
        RECIPE,
        *FAULTY,
        "train.max_steps=12",
        "checkpoint.every_steps=4",
        f"tracking.uri={uri}",
        "tracking.experiment=full",
        f"output_dir={out}",
        f"checkpoint.async={write == 'async'}",
    ]
    proc = run_dtrain([*args, "model.fault=fill_disk:0:7"], cwd=tmp_path, nproc=2, timeout=240)
    assert proc.returncode == 1
    line = one_line(proc)
    assert line.startswith("dtrain: error: checkpoint at step 8 not written: ") and "No space left on device" in line
    assert line.endswith("the previous checkpoint stays the latest") and str(out / "checkpoints") in line
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004"]  # no temporary folder left
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert run.info.status == "FAILED"
    if write == "async":
        return  # continuing is the same as below
    (out / "filler").unlink()  # space again: the job continues from the last good checkpoint
    proc = check(run_dtrain([*args, "resume=auto"], cwd=tmp_path, nproc=2))
    assert "resumed at step 4 from step_00000004" in proc.stdout


# --------------------------------------------------------------------------- hangs


def test_error_on_one_rank_ends_every_rank_promptly(tmp_path):
    """A data file missing on one node: that rank's line, and no rank waits for the timeout."""
    t0 = time.time()
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            *FAULTY,
            "model.fault=unreadable:1:0",
            "train.collective_timeout_s=300",
            "tracking.enabled=false",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        nproc=2,
        timeout=240,
    )
    assert proc.returncode != 0 and time.time() - t0 < 120
    line = one_line(proc)
    assert line == (
        f"dtrain[rank 1]: error: {tmp_path / 'out' / 'shard-only-on-the-other-node.bin'}: No such file or directory"
    ), proc.stderr[-2000:]


def test_exception_in_user_code_on_one_rank_ends_the_job_with_its_traceback(tmp_path):
    t0 = time.time()
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            *FAULTY,
            "model.fault=raise:1:3",
            "train.collective_timeout_s=300",
            "tracking.enabled=false",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        nproc=2,
        timeout=240,
    )
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert "RuntimeError: boom in user code on rank 1 at step 3" in proc.stderr  # torchrun's summary names it
    assert not error_lines(proc.stderr), proc.stderr[-3000:]  # rank 0, which lost its peer, adds nothing


def test_sharded_eval_runs_as_many_forwards_on_every_rank():
    """359 samples, eval batch 179, 2 ranks: shards of 180 and 179, so without padding rank 0
    would run 2 forwards and rank 1 one; padded, both run 2 and the padding is not counted."""
    for rank, real in ((0, 180), (1, 179)):
        sampler = data.ExactShardSampler(359, 2, rank)
        assert len(sampler) == 180 and sampler.num_real == real
        assert len(torch.utils.data.DataLoader(range(359), batch_size=179, sampler=sampler)) == 2
    unpadded = [len(range(r, 359, 2)) for r in (0, 1)]
    assert [-(-n // 179) for n in unpadded] == [2, 1]  # what the padding guards against
    empty = data.ExactShardSampler(1, 2, 1)  # more ranks than samples: padding only
    assert len(empty) == 1 and empty.num_real == 0


@pytest.mark.slow
def test_zero3_eval_with_unequal_shards_and_partitioned_parameters(tmp_path):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0): a forward is a
    collective. Every rank runs 2 evaluation forwards and the 359 samples count once each."""
    ds = '{"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}}'
    proc = check(
        run_dtrain(
            [
                "train",
                RECIPE,
                *FAULTY,
                "engine=deepspeed",
                "deepspeed.zero_stage=3",
                f"deepspeed.config={ds}",
                "model.eval_size=359",
                "data.eval_batch_size=179",
                "train.max_steps=4",
                "train.collective_timeout_s=120",
                "tracking.enabled=false",
                f"output_dir={tmp_path / 'out'}",
            ],
            cwd=tmp_path,
            nproc=2,
            timeout=300,
        )
    )
    ev = json.loads((tmp_path / "out" / "summary.json").read_text())["eval"]
    assert ev["samples"] == 359 and ev["forwards_rank0"] == ev["forwards_rank1"] == 2, ev
    assert "samples 359 " in proc.stdout  # an integer prints as one
    # ZeRO state is partitioned per rank: resuming it on 1 rank is refused in one line.
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            *FAULTY,
            "engine=deepspeed",
            "deepspeed.zero_stage=3",
            "train.max_steps=6",
            "tracking.enabled=false",
            "resume=auto",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "written by 2 DeepSpeed rank(s), this job has 1" in one_line(proc)


# --------------------------------------------------------------------------- combinations


def _zero0_and_ddp(rank: int, world: int, root: str) -> None:
    """The two runs of the test below, in one process group (no process start-up per run)."""
    from dtrain.runtime.distributed import DistEnv
    from dtrain.train.fit import fit

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # what a launcher sets (DeepSpeed reads it)
    common = [
        *FAULTY,
        "train.max_steps=10",
        "train.max_nonfinite_steps=3",
        "tracking.log_every=2",
        "checkpoint.every_steps=0",
        "optim.clip_grad_norm=1.0",
    ]
    for overrides in (
        [
            "engine=deepspeed",
            "deepspeed.zero_stage=0",
            "tracking.enabled=true",
            f"tracking.uri=sqlite:///{root}/mlflow.db",
            f"output_dir={root}/ds",
        ],
        ["tracking.enabled=false", f"output_dir={root}/ddp"],
    ):
        fit(
            load_config(RECIPE, [*common, *overrides]),
            DistEnv(rank=rank, world_size=world, local_world_size=world),
            torch.device("cpu"),
        )


@pytest.mark.slow
def test_deepspeed_zero0_fp32_reports_the_gradient_norm(tmp_path):
    """ZeRO stage 0 in fp32 returns no norm from its plain optimizer; dtrain measures it, so
    steps are not counted non-finite, and the run matches DDP."""
    spawn(_zero0_and_ddp, 2, str(tmp_path))
    s = json.loads((tmp_path / "ds" / "summary.json").read_text())
    norms = [
        m.value for m in mlflow.MlflowClient(mlflow_store(tmp_path)).get_metric_history(s["run_id"], "train/grad_norm")
    ]
    assert s["steps"] == 10 and len(norms) == 5 and all(0 < n < 1e3 for n in norms), norms
    assert max_param_diff(load_params(tmp_path / "ds" / "model.pt"), load_params(tmp_path / "ddp" / "model.pt")) < 1e-5


@pytest.mark.slow
def test_without_syncbn_the_metric_is_of_the_saved_model(tmp_path):
    """model.sync_bn=false on 2 ranks: each rank's BatchNorm statistics drift apart; the
    reported metric must be exactly that of model.pt (rank 0's buffers)."""
    out = tmp_path / "out"
    check(
        run_dtrain(
            [
                "train",
                RECIPE,
                "model.sync_bn=false",
                "train.max_steps=30",
                "train.eval_every_steps=0",
                "tracking.enabled=false",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
            nproc=2,
        )
    )
    reported = json.loads((out / "summary.json").read_text())["eval"]
    cfg = load_config(out / "config.yaml")
    task = CNNTask(cfg)
    _, test = task.datasets()
    model = task.build_model()
    model.load_state_dict(load_params(out / "model.pt"))
    engine = SimpleNamespace(module=model, precision=AmpPrecision("fp32", torch.device("cpu")))
    mine = evaluate(engine, task, data.eval_loader(test, 256, 1, 0, 0), torch.device("cpu"))
    assert mine["accuracy"] == pytest.approx(reported["accuracy"], abs=1e-9)
    assert mine["loss"] == pytest.approx(reported["loss"], abs=1e-6)


@pytest.mark.slow
def test_resume_on_another_world_size(tmp_path):
    """2 ranks for 20 steps, then 1 rank to 40: the same parameters as 2 ranks for 40 (the
    BN-free MLP: the math allows it exactly, up to float reassociation)."""
    common = ["train", RECIPE, *FAULTY, "train.max_steps=40", "tracking.enabled=false", "checkpoint.every_steps=0"]
    check(run_dtrain([*common, f"output_dir={tmp_path / 'straight'}"], cwd=tmp_path, nproc=2))
    check(run_dtrain([*common, "train.stop_at_step=20", f"output_dir={tmp_path / 'moved'}"], cwd=tmp_path, nproc=2))
    proc = check(run_dtrain([*common, "resume=auto", f"output_dir={tmp_path / 'moved'}"], cwd=tmp_path))
    assert "resumed at step 20" in proc.stdout and "per-rank random streams are re-derived" in proc.stderr
    a, b = load_params(tmp_path / "straight" / "model.pt"), load_params(tmp_path / "moved" / "model.pt")
    assert max_param_diff(a, b) < 1e-5
    # A global batch that changed would change what a step means: one line, not a silent drift.
    proc = run_dtrain(
        [*common, "resume=auto", "data.global_batch_size=128", f"output_dir={tmp_path / 'moved'}"], cwd=tmp_path
    )
    assert proc.returncode == 2 and one_line(proc).endswith(
        "data.global_batch_size=128: the checkpoint was trained with 64, the batch its schedule, data position and "
        "step count are in; resume with it (on fewer ranks, raise data.grad_accum_steps to keep it)"
    )


@pytest.mark.slow
def test_transformer_resume_on_other_text_is_one_line(tmp_path):
    text_a, text_b = tmp_path / "a.txt", tmp_path / "b.txt"
    text_a.write_text("def f(x):\n    return x + 1\n" * 400)
    text_b.write_text("SELECT * FROM t WHERE q = 'z';\n" * 400)
    common = [
        "train",
        str(ROOT / "recipes" / "transformer_charlm.yaml"),
        "tracking.enabled=false",
        "model.n_layer=1",
        "model.n_embd=16",
        "model.n_head=2",
        "model.block_size=16",
        "data.global_batch_size=8",
        "data.max_chars=0",
        f"output_dir={tmp_path / 'out'}",
    ]
    check(run_dtrain([*common, f"data.path={text_a}", "train.max_steps=3"], cwd=tmp_path))
    sampled = check(run_dtrain(["sample", str(tmp_path / "out"), "--prompt", "def ", "--tokens", "20"], cwd=tmp_path))
    assert sampled.stdout.startswith("def ") and len(sampled.stdout.rstrip("\n")) == 24  # sampling: the task's
    proc = run_dtrain([*common, f"data.path={text_b}", "train.max_steps=6", "resume=auto"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "its vocabulary" in one_line(proc) and "differs from the checkpoint's" in one_line(proc)


@pytest.mark.slow
def test_under_nproc_per_node_dtrains_line_is_the_last_printed_when_a_rank_fails_or_the_job_is_stopped(tmp_path):
    """`dtrain train --nproc-per-node 2` is the torchrun agent itself: after a rank's bug, and
    after SIGTERM to the job, dtrain's own line ends the output, not torchrun's failure report
    (`ChildFailedError`) or its `SignalException` traceback; the exit codes stay torchrun's."""
    args = ["train", RECIPE, *FAULTY, "tracking.enabled=false", "tracking.log_every=1", "--nproc-per-node", "2"]
    failed = run_dtrain(
        [*args, "model.fault=raise:1:3", "train.max_steps=10", f"output_dir={tmp_path / 'a'}"], tmp_path
    )
    assert failed.returncode == 1 and "ChildFailedError" not in failed.stderr, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == (
        "dtrain: error: rank 1 failed: RuntimeError: boom in user code on rank 1 at step 3 (its traceback is above)"
    )
    # SIGTERM to the job (torchrun's agent passes it on), then to one rank only (a rank's own stop).
    # The same last line either way (a rank's exit 143 used to read "failed: exit code 143").
    for folder, to_rank in (("b", False), ("c", True)):
        err, lines = _stopped(tmp_path, [*args, "train.max_steps=100000", f"output_dir={tmp_path / folder}"], to_rank)
        assert err.strip().splitlines()[-1].startswith("dtrain: stopped by SIGTERM; continue with resume=auto"), err
        assert any(line.startswith("preempted by signal 15 at step") for line in lines), lines[-5:]


def _stopped(tmp_path, args: list[str], to_rank: bool) -> tuple[str, list[str]]:
    """`dtrain *args` until step 3, then SIGTERM to it or to its rank 1: its stderr and stdout's lines."""
    job = subprocess.Popen([PY, "-m", "dtrain", *args], cwd=tmp_path, env=env_for_cli(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(job.stdout, lines), daemon=True)
    reader.start()
    _wait_for(lines, "step 3/", job)
    if to_rank:
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(job.pid).children()}
        ranks[1].send_signal(signal.SIGTERM)
    else:
        job.send_signal(signal.SIGTERM)
    assert job.stderr is not None
    err = job.stderr.read()  # to the end; stdout stays the reader thread's alone (no line split between two readers)
    job.wait(timeout=120)
    reader.join(timeout=30)
    assert job.returncode == 143 and "SignalException" not in err and "Traceback" not in err, err[-3000:]
    return err, lines
