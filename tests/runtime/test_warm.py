"""The suite's warm ranks (tests/support/warm.py) start as torchrun's do: the same environment,
argv, path, threads and warning filters, and a hash seed of their own per rank."""

import json

import pytest
import warm
from helpers import PY, env_for_cli, run_dtrain

from dtrain.runtime.launch import torchrun_env, torchrun_launcher

# Differ from job to job under either launcher.
PER_JOB = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "DUMP_TO"}


def _started(tmp_path, name, nproc, cold: bool) -> dict[str, dict]:
    out = tmp_path / name
    out.mkdir()
    env = torchrun_env(env_for_cli(DUMP_TO=str(out)))
    if cold:
        import subprocess

        cmd = [*torchrun_launcher(nproc), "-m", "envdump", "a", "b"] if nproc else [PY, "-m", "envdump", "a", "b"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    else:
        proc = warm.run(["a", "b"], tmp_path, env, nproc=nproc, module="envdump")
    assert proc.returncode == 0, proc.stderr
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


def differences(cold: dict[str, dict], hot: dict[str, dict]) -> list[str]:
    """What a warm rank sees that the same rank under torchrun does not (or the other way)."""
    found = [] if cold.keys() == hot.keys() else [f"ranks {sorted(cold)} vs {sorted(hot)}"]
    for rank in sorted(cold.keys() & hot.keys()):
        a, b = cold[rank], hot[rank]
        for key in sorted(a["env"].keys() | b["env"].keys()):
            if key in PER_JOB and key in a["env"] and key in b["env"]:
                continue
            if a["env"].get(key) != b["env"].get(key):
                found.append(f"{rank} ${key}: {a['env'].get(key)!r} vs {b['env'].get(key)!r}")
        for key in ("argv", "path0", "cwd", "threads", "filters"):
            if a[key] != b[key]:
                found.append(f"{rank} {key}: {a[key]!r} vs {b[key]!r}")
    return found


@pytest.mark.parametrize("nproc", [0, 2])
def test_a_warm_rank_sees_what_a_rank_under_torchrun_sees(tmp_path, nproc, monkeypatch):
    cold = _started(tmp_path, "cold", nproc, cold=True)
    hot = _started(tmp_path, "warm", nproc, cold=False)
    assert len(hot) == max(nproc, 1) and differences(cold, hot) == []
    if nproc:  # each rank its own interpreter's hash seed, as separate processes have
        assert cold["rank0"]["hash"] != cold["rank1"]["hash"] and hot["rank0"]["hash"] != hot["rank1"]["hash"]
        # What the comparison guards against: a variable torchrun sets, left out. (The next job's
        # rank 0 is another interpreter: a resumed run's rank 0 hashes unlike the run it resumes.)
        real = warm._worker_env
        monkeypatch.setattr(warm, "_worker_env", lambda *a: {k: v for k, v in real(*a).items() if k != "GROUP_RANK"})
        broken = _started(tmp_path, "broken", nproc, cold=False)
        assert differences(cold, broken) == ["rank0 $GROUP_RANK: '0' vs None", "rank1 $GROUP_RANK: '0' vs None"]
        assert broken["rank0"]["hash"] != hot["rank0"]["hash"]


def test_a_failing_warm_rank_ends_the_job_as_under_torchrun(tmp_path):
    # A refusal on every rank: exit 1, as torchrun's agent reports a failed worker.
    proc = run_dtrain(["train", "no-such.yaml"], tmp_path, nproc=2)
    assert proc.returncode == 1 and "no-such.yaml" in proc.stderr
