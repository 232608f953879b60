"""The trust boundary (README, "What dtrain trusts"): files from elsewhere run no code, run
folders bring none, weights to share are safetensors, and the code is scanned (bandit).

Each attack is also shown to work where the guard is lifted (the trust flag, or the library's
own reader), so a test that passes is a guard that holds."""

import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from helpers import CNN, DDP_BASELINE, PY, ROOT, check, load_params, max_param_diff, run_dtrain

from dtrain import checkpoint
from dtrain.checkpoint import safeload
from dtrain.train.resume import TrainState

FAULTY = ["task=faulty:FaultyTask", "model.hidden=32", "data.augment=false", "tracking.enabled=false"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_deepspeed_checkpoint_from_elsewhere_loads_only_when_trusted(tmp_path):
    """DeepSpeed reads its files with torch.load(weights_only=False): a crafted
    mp_rank_00_model_states.pt runs its payload. Outside the run's own output_dir it is refused
    before DeepSpeed opens it."""
    folder = tmp_path / "received" / "step_00000004"
    (folder / "model" / "state").mkdir(parents=True)
    client = {"trainer": asdict(TrainState(step=4)), "rng": [checkpoint.rng_state()], "task": {}}
    checkpoint.atomic_save(client, folder / checkpoint.TRAINER)
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), folder / "model" / "state" / "mp_rank_00_model_states.pt")
    args = [
        "train",
        CNN,
        *FAULTY,
        "engine=deepspeed",
        "train.max_steps=6",
        f"resume={folder}",
        f"output_dir={tmp_path / 'out'}",
    ]
    proc = run_dtrain(args, cwd=tmp_path, DS_ACCELERATOR="cpu")
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "is not in this run's output_dir" in line and "checkpoint.trust=true" in line, line
    torch.load(folder / "model" / "state" / "mp_rank_00_model_states.pt", weights_only=False)  # as DeepSpeed reads it
    assert marker.exists()  # what the refusal prevented


def _run_folder_with_a_module(tmp_path, marker, task="evil:Task"):
    """A run folder as someone could hand it over: config.yaml naming a task module it carries,
    a model.safetensors and a finished checkpoint."""
    run = tmp_path / "received-run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "config.yaml").write_text(f"task: {task}\n")
    (run / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from dtrain.tasks.transformer import TransformerTask as Task\n"
    )
    safeload.save_weights({"w": torch.zeros(1)}, run / "model.safetensors")
    checkpoint.atomic_save({}, run / "checkpoints" / "step_00000001" / checkpoint.TRAINER)
    return run


def _command(name, run, tmp_path):
    return {
        "sample": ["sample", str(run)],
        "average": ["average", str(run / "checkpoints" / "step_00000001"), "--output", str(tmp_path / "a.safetensors")],
        "predict": ["predict", str(run), "x.npy", "--output", str(tmp_path / "y.npy")],
        "evaluate": ["evaluate", str(run)],
    }[name]


@pytest.mark.parametrize("command", ["sample", "average", "predict", "evaluate"])
def test_a_run_folder_does_not_bring_code_even_from_inside_it(tmp_path, monkeypatch, capsys, command):
    """A run folder's config.yaml may name a task dtrain ships; its own module (or any other) is
    imported only with --trust, wherever dtrain runs from: from inside the folder, the working
    directory holds the module (the search for a recipe's task module looks there)."""
    from dtrain.cli.parser import main

    marker = tmp_path / "pwned"
    run = _run_folder_with_a_module(tmp_path, marker)
    monkeypatch.chdir(run)
    with pytest.raises(SystemExit) as e:
        main(_command(command, run, tmp_path))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and not marker.exists() and "evil" not in sys.modules, line
    assert "is not a task dtrain ships" in line and "--trust" in line, line


def test_a_run_folder_names_no_installed_module_either(tmp_path, monkeypatch, capsys):
    """`task: this:X`: importing the standard library's `this` prints the Zen of Python; any
    installed module's import runs its code."""
    from dtrain.cli.parser import main

    run = _run_folder_with_a_module(tmp_path, tmp_path / "pwned", task="this:X")
    sys.modules.pop("this", None)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run)])
    out = capsys.readouterr()
    assert e.value.code == 2 and "this" not in sys.modules and "Beautiful" not in out.out + out.err
    assert "task='this:X': is not a task dtrain ships" in out.err.strip().splitlines()[-1], out.err


@pytest.mark.slow
def test_python_m_dtrain_from_inside_a_run_folder_imports_its_module_only_with_trust(tmp_path):
    """The same from a shell: `python -m dtrain` puts the working directory first on the Python
    path, so from inside the folder its module is importable; it is refused all the same, and
    imported with --trust (what the refusal prevents)."""
    marker = tmp_path / "pwned"
    run = _run_folder_with_a_module(tmp_path, marker)
    proc = run_dtrain(_command("predict", run, tmp_path), cwd=run)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-2000:]
    assert "is not a task dtrain ships" in proc.stderr.strip().splitlines()[-1]
    run_dtrain([*_command("predict", run, tmp_path), "--trust"], cwd=run)
    assert marker.exists()


def test_only_the_folder_a_task_module_is_found_in_joins_the_python_path(tmp_path, monkeypatch):
    from dtrain.train.config import load_config

    before = list(sys.path)
    load_config(CNN)  # a built-in task: nothing is added
    assert sys.path == before
    (tmp_path / "mytask_x1.py").write_text("from dtrain.tasks.cnn import CNNTask as Task\n")
    (tmp_path / "recipe.yaml").write_text("task: mytask_x1:Task\n")
    monkeypatch.chdir(ROOT)
    try:
        load_config(tmp_path / "recipe.yaml")
        assert [p for p in sys.path if p not in before] == [str(tmp_path)]
    finally:
        sys.path[:] = before
        sys.modules.pop("mytask_x1", None)


def test_model_safetensors_holds_model_pt_and_init_from_reads_it(tiny_runs, tmp_path):
    run = tiny_runs("ddp", *DDP_BASELINE)  # the engines' shared baseline run
    pt, st = load_params(run / "model.pt"), safeload.load_weights(run / "model.safetensors")
    assert set(pt) == set(st) and max_param_diff(pt, st, buffers=True) == 0
    shutil.copy(run / "model.safetensors", tmp_path / "shared.safetensors")
    proc = check(
        run_dtrain(
            [
                "train",
                str(ROOT / "recipes" / "transformer_charlm.yaml"),
                "train.max_steps=1",
                "tracking.enabled=false",
                "model.n_layer=2",
                "model.n_embd=64",
                "model.n_head=4",
                "model.block_size=64",
                "data.global_batch_size=16",
                "data.max_chars=200000",
                "train.eval_every_steps=0",
                f"model.init_from={tmp_path / 'shared.safetensors'}",
                f"output_dir={tmp_path / 'out'}",
            ],
            cwd=tmp_path,
        )
    )
    assert f"loaded {len(pt)} of {len(pt)} tensors" in proc.stdout


def test_a_truncated_safetensors_file_is_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:40])
    with pytest.raises(ValueError):
        safeload.load_weights(tmp_path / "m.safetensors")


def test_bandit_finds_nothing_in_the_platform():
    """Every ignore is justified where it stands (`# nosec BXXX # why`)."""
    pytest.importorskip("bandit")
    proc = subprocess.run(
        [PY, "-m", "bandit", "-q", "-r", str(ROOT / "platform" / "dtrain"), "-c", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    nosec = subprocess.run(
        ["grep", "-rn", "--include=*.py", "nosec", str(ROOT / "platform" / "dtrain")], capture_output=True, text=True
    ).stdout
    reasons = [line.split("nosec", 1)[1].partition("#")[2].strip() for line in nosec.splitlines()]
    assert reasons and all(len(r) > 10 for r in reasons), nosec  # each says why


@pytest.mark.parametrize("name", ["trainer.pt", "model/state.pt", "model.pt"])
def test_a_crafted_plain_checkpoint_file_is_refused_and_runs_nothing(tmp_path, name):
    """trainer.pt, DDP's state.pt and model.pt load with weights_only=True (dtrain's one loader
    for them, `checkpoint.load_file`; `safeload.load_weights` for init_from / sample)."""
    from dtrain.errors import CheckpointError

    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot load"):
        checkpoint.load_file(path)
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type: what matters is that nothing ran)
        safeload.load_weights(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what weights_only prevents
    assert marker.exists()
