"""The cluster's tracking path, end to end on one machine: launchers/mlflow_server.sh --postgres
(a real PostgreSQL cluster from the installed server binaries, `mlflow server --workers 2` on
it), four 2-rank jobs writing to it at once, `dtrain compare` reading them back, and the MLflow
UI those runs land in, rendered by a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import ROOT, check, run_dtrain

sys.path.insert(0, str(ROOT / "benchmarks"))
import tracking_load

JOBS, STEPS = 4, 12
EXPERIMENT = "load"


@pytest.fixture(scope="module")
def pg_server(postgres):
    root = Path(tempfile.mkdtemp(prefix="dtrain-mlflow-pg-"))
    os.chmod(root, 0o755)  # the cluster runs as `postgres`, which must enter this folder
    server = tracking_load.start_server("postgres", root / "server", workers=2)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def concurrent_jobs(pg_server, tmp_path_factory):
    """Four 2-rank jobs started together, each logging every step into the PostgreSQL-backed server."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("load")
    cmds = [tracking_load.job_cmd(2, pg_server.uri, EXPERIMENT, f"job{i}", tmp / f"job{i}", STEPS) for i in range(JOBS)]
    with ThreadPoolExecutor(JOBS) as pool:  # at once, as `benchmarks/tracking_load.py` starts them
        results = list(pool.map(lambda cmd: job(cmd, tmp, nproc=2), cmds))
    return tmp, results


def job(cmd: list[str], cwd: Path, nproc: int = 0, **env: str) -> subprocess.CompletedProcess:
    """The benchmark's job command (`tracking_load.job_cmd`), on warm ranks."""
    return run_dtrain(cmd[cmd.index("dtrain") + 1 :], cwd, nproc=nproc, **env)


@pytest.mark.slow
def test_four_two_rank_jobs_at_once_lose_no_metric_point_on_postgresql(pg_server, concurrent_jobs):
    tmp, results = concurrent_jobs
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "MLflow tracking" not in r.stderr, r.stderr[-2000:]  # no warning, nothing dropped
    rows = tracking_load.audit(pg_server.uri, EXPERIMENT)
    assert sorted(r["name"] for r in rows) == [f"job{i}" for i in range(JOBS)]
    for row in rows:
        assert row["status"] == "FINISHED", row["name"]
        assert row["sent"] == row["stored"] > 0, row  # every point the job's tracker sent is stored
        assert row["steps"]["train/loss"] == list(range(1, STEPS + 1)), row["name"]
        assert len(row["steps"]["eval/accuracy"]) == 1
    # The links every job printed lead to its run in this server's UI.
    for r, i in zip(results, range(JOBS)):
        run_id = json.loads((tmp / f"job{i}" / "summary.json").read_text())["run_id"]
        lines = [line for line in r.stdout.splitlines() if line.startswith("mlflow run: ")]
        assert len(lines) == 2 and all(
            f"{pg_server.uri}/#/experiments/" in line and f"/runs/{run_id} " in line for line in lines
        ), r.stdout[-2000:]
    # ... and `dtrain compare` reads them back from the same server.
    proc = check(
        run_dtrain(
            ["compare", "--experiment", EXPERIMENT, "--uri", pg_server.uri, "--output", str(tmp / "cmp")], cwd=tmp
        )
    )
    compared = json.loads((tmp / "cmp" / "comparison.json").read_text())
    assert len(compared["runs"]) == JOBS, proc.stdout


@pytest.mark.slow
def test_the_audit_sees_a_lost_point(pg_server, concurrent_jobs):
    """What the count guards against: a point missing on the server shows as sent != stored."""
    import mlflow

    (victim,) = tracking_load.audit(pg_server.uri, EXPERIMENT, names={"job0"})
    client = mlflow.MlflowClient(pg_server.uri)
    client.set_tag(victim["run_id"], "dtrain.metric_points", str(victim["sent"] + 1))  # one more claimed than kept
    try:
        (again,) = tracking_load.audit(pg_server.uri, EXPERIMENT, names={"job0"})
        assert again["sent"] == again["stored"] + 1
    finally:
        client.set_tag(victim["run_id"], "dtrain.metric_points", str(victim["sent"]))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    pytest.skip("no Chromium here (apt-get install chromium); .ci/run installs it where apt-get works")


def render(url: str, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`: 15 s of virtual time lets the single-page app fetch and draw."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=15000",
            "--window-size=1600,900",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_runs_table_and_compare_view_show_one_and_two_rank_runs(pg_server, concurrent_jobs, tmp_path):
    tmp, _ = concurrent_jobs
    check(job(tracking_load.job_cmd(1, pg_server.uri, EXPERIMENT, "one-rank", tmp_path / "one", STEPS), tmp_path))
    (job0,) = tracking_load.audit(pg_server.uri, EXPERIMENT, names={"job0"})
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    exp_id = _experiment_id(pg_server.uri)
    runs_view = f"{pg_server.uri}/#/experiments/{exp_id}/runs"
    dom = render(runs_view, "--dump-dom").stdout
    for name in ("one-rank", "job0", "job3"):
        assert f">{name}<" in dom, f"{name} not in the rendered runs table ({len(dom)} chars)"
    ids = [summary["run_id"], job0["run_id"]]
    compare = (
        f"{pg_server.uri}/#/compare-runs?runs={quote(json.dumps(ids, separators=(',', ':')))}"
        f"&experiments={quote(json.dumps([exp_id]))}"
    )
    dom = render(compare, "--dump-dom").stdout
    assert ">one-rank<" in dom and ">job0<" in dom and "train/loss" in dom
    assert ">job1<" not in dom  # the compare view shows the two runs asked for, not the table
    shot = Path(os.environ.get("DTRAIN_UI_SCREENSHOT", tmp_path / "runs.png"))
    render(runs_view, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def _experiment_id(uri: str) -> str:
    import mlflow

    return str(mlflow.MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id)


def _pg_port(server_dir: Path) -> str:
    opts = (server_dir / "postgres" / "postmaster.opts").read_text().replace('"', "").split()
    return opts[opts.index("-p") + 1]


@pytest.mark.slow
def test_the_local_postgresql_asks_every_user_for_a_password(pg_server):
    """It was initialised with `-A trust`: any local user was its superuser without a password
    (and could run `COPY ... TO PROGRAM` as `postgres`). Now: scram-sha-256, the socket in the
    cluster's 0700 folder, and MLflow's role owns its database and nothing more."""
    port, folder = _pg_port(pg_server.root), pg_server.root / "postgres"
    as_nobody = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    for host in ("127.0.0.1", str(folder)):
        proc = subprocess.run(
            [*as_nobody, "psql", "-w", "-h", host, "-p", port, "-U", "postgres", "-c", "SELECT 1"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0 and ("no password supplied" in proc.stderr or "Permission denied" in proc.stderr), (
            proc.stderr
        )
    env = {**os.environ, "PGPASSFILE": str(pg_server.root / "secrets" / "pgpass")}
    psql = ["psql", "-w", "-h", "127.0.0.1", "-p", port, "-U", "mlflow", "-d", "mlflow", "-tA", "-c"]
    role = subprocess.run(
        [*psql, "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'mlflow'"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert role.stdout.strip() == "f|f|f", role.stderr
    copy = subprocess.run([*psql, "COPY (SELECT 1) TO PROGRAM 'id'"], env=env, capture_output=True, text=True)
    assert copy.returncode != 0 and "must be superuser" in copy.stderr, copy.stderr
    secrets = pg_server.root / "secrets"
    assert oct(secrets.stat().st_mode & 0o777) == "0o700"
    passwords = [p.read_text().strip() for p in secrets.glob("*.password")]
    assert len(passwords) == 2
    logs = [p for p in pg_server.root.parent.rglob("*") if p.is_file() and secrets not in p.parents]
    assert not [p for p in logs if any(pw.encode() in p.read_bytes() for pw in passwords)]


@pytest.mark.slow
def test_an_mlflow_server_with_auth_takes_runs_only_with_credentials(tmp_path):
    """`--auth` (always on beyond loopback): MLflow's basic-auth app. A job with the job user's
    credentials in its environment, or in the tracking URI's `user:password@` form, is tracked
    (the password then shows up nowhere); one without them trains untracked, with a warning.
    The job user writes to its own experiments only: it cannot write to the admin's experiment
    or create a user. The store's files are the server user's alone: `nobody` reads none."""
    import urllib.error
    import urllib.request

    import mlflow

    shared = Path(tempfile.mkdtemp(prefix="dtrain-mlflow-auth-"))
    os.chmod(shared, 0o755)  # a folder every local user may enter: the store's own modes must guard it
    server = tracking_load.start_server("sqlite", shared / "server", 1, 120, "--auth")
    try:
        launcher_log = (shared / "server-launcher.log").read_text()
        secrets = shared / "server" / "secrets"
        admin, job_pw = ((secrets / f"mlflow-{who}.password").read_text().strip() for who in ("admin", "job"))
        assert "MLFLOW_TRACKING_USERNAME=dtrain MLFLOW_TRACKING_PASSWORD=$(cat " in launcher_log
        assert admin not in launcher_log and job_pw not in launcher_log
        request = urllib.request.Request(
            f"{server.uri}/api/2.0/mlflow/experiments/create",
            method="POST",
            data=b'{"name": "anonymous"}',
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 401
        creds = {"MLFLOW_TRACKING_USERNAME": "dtrain", "MLFLOW_TRACKING_PASSWORD": job_pw}
        cmd = tracking_load.job_cmd(1, server.uri, "auth", "with", tmp_path / "with", 2)
        ok = job(cmd, tmp_path, **creds)
        assert ok.returncode == 0 and "MLflow tracking" not in ok.stderr, ok.stderr[-2000:]
        in_uri = server.uri.replace("http://", f"http://dtrain:{job_pw}@")
        cmd = tracking_load.job_cmd(1, in_uri, "auth", "in-uri", tmp_path / "in-uri", 2)
        ok = job(cmd, tmp_path)
        assert ok.returncode == 0 and "MLflow tracking" not in ok.stderr, ok.stderr[-2000:]
        assert job_pw not in ok.stdout + ok.stderr
        assert not [p for p in (tmp_path / "in-uri").rglob("*") if p.is_file() and job_pw.encode() in p.read_bytes()]
        cmd = tracking_load.job_cmd(1, server.uri, "auth", "without", tmp_path / "without", 2)
        anon = job(cmd, tmp_path)
        assert anon.returncode == 0 and "training without it" in anon.stderr, anon.stderr[-2000:]

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin)  # (restored after)
        client = mlflow.MlflowClient(server.uri)
        runs = client.search_runs([client.get_experiment_by_name("auth").experiment_id])
        assert sorted((r.info.run_name, r.info.status) for r in runs) == [("in-uri", "FINISHED"), ("with", "FINISHED")]
        params = next(r for r in runs if r.info.run_name == "in-uri").data.params
        assert params["tracking.uri"].startswith("http://dtrain:***@") and job_pw not in str(params)
        admins = client.create_experiment("admins-own")
        os.environ.update(creds)
        with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|403"):
            client.create_run(admins)
        with pytest.raises(Exception, match="PERMISSION_DENIED|403|ermission"):
            from mlflow.server import get_app_client

            get_app_client("basic-auth", tracking_uri=server.uri).create_user("intruder", "Intruder-pw-123")
        assert client.create_run(client.create_experiment("jobs-own")).info.status == "RUNNING"

        for folder in (shared / "server", tmp_path / "with"):  # the store, and a run's own folder
            modes: dict[bool, set[str]] = {True: set(), False: set()}
            for p in [folder, *folder.rglob("*")]:
                modes[p.is_dir()].add(oct(p.stat().st_mode & 0o777))
            assert modes == {True: {"0o700"}, False: {"0o600"}}, (folder, modes)
        peek = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(shared / "server" / "mlflow.db")],
                              capture_output=True)  # fmt: skip
        assert peek.returncode != 0 and b"Permission denied" in peek.stderr, peek.stderr
    finally:
        server.stop()
        shutil.rmtree(shared, ignore_errors=True)
