"""`dtrain search`: Optuna studies whose trials are dtrain runs (MLflow child runs of one parent),
pruned on their intermediate evaluations, continued after a kill, shared by workers through
SQLite or a real PostgreSQL server."""

import json
import signal
import subprocess
import time

import mlflow
import optuna
import pytest
from helpers import PY, ROOT, env_for_cli, mlflow_store, run_dtrain

from dtrain.train.config import load_config

CNN = str(ROOT / "recipes" / "cnn_digits.yaml")
SHORT = [
    "train.max_steps=20",
    "train.eval_every_steps=10",
    "tracking.log_every=10",
    "data.augment=false",
    "checkpoint.every_steps=0",
]
# A good learning rate and an obviously bad one, each with and without warmup: a grid of 4.
GRID = """optim.lr: {type: categorical, choices: [0.8, 1.0e-6]}
optim.warmup_steps: {type: categorical, choices: [0, 5]}
"""


def search_cmd(tmp_path, *args, uri=None):
    uri = uri or mlflow_store(tmp_path)
    return [
        PY,
        "-m",
        "dtrain",
        "search",
        CNN,
        *SHORT,
        f"tracking.uri={uri}",
        "tracking.experiment=search",
        "--space",
        str(tmp_path / "space.yaml"),
        "--output",
        str(tmp_path / "out"),
        *args,
    ]


def finished(summary):
    return [t for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED")]


@pytest.mark.slow
def test_a_grid_search_prunes_survives_a_kill_and_tracks_every_trial(tmp_path):
    (tmp_path / "space.yaml").write_text(GRID)
    # Seed 5 orders the grid good, good, bad, bad: the first trial sets the bar the bad ones miss.
    cmd = search_cmd(tmp_path, "--sampler", "grid", "--trials", "4", "--prune-startup", "1", "seed=5")
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env_for_cli(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not (tmp_path / "out" / "trial_001").exists() and time.time() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGTERM)  # during trial 1
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "continues it" in err.strip().splitlines()[-1], err
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [p for p in ps if "dtrain train" in p and str(tmp_path) in p], ps  # its trial was stopped too

    again = subprocess.run(cmd, cwd=tmp_path, env=env_for_cli(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    states = [t["state"] for t in summary["trials"]]
    assert len(finished(summary)) == 4 and states.count("FAIL") == 1, states  # the killed trial
    assert "PRUNED" in states and len(states) == len({t["number"] for t in summary["trials"]})
    assert all(
        t["params"]["optim.lr"] > 1e-3
        for t in summary["trials"]
        if t["state"] == "COMPLETE" and t["value"] == summary["best"]["value"]
    )
    assert "search: trial" in again.stdout and "pruned" in again.stdout
    best = load_config(tmp_path / "out" / "best.yaml")  # a recipe that loads
    assert best.optim.lr == summary["best"]["params"]["optim.lr"]
    assert (tmp_path / "out" / "history.png").exists()

    client = mlflow.MlflowClient(mlflow_store(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("search").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dtrain.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    # One per finished trial (the killed one has one too if it got as far as starting its run).
    assert len(children) in (4, 5) and parent.info.status == "FINISHED"
    assert {r.info.run_name for r in children} >= {f"cnn_digits-search-trial-{t['number']}" for t in finished(summary)}
    pruned = [r for r in children if "dtrain.halted_at_step" in r.data.tags]
    assert pruned and all(r.info.status == "KILLED" for r in pruned)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"search.json", "best.yaml"}
    assert parent.data.metrics["best_value"] == pytest.approx(summary["best"]["value"])


@pytest.mark.slow
def test_failing_trials_stop_the_search_and_every_trial_starts_in_a_clean_folder(tmp_path):
    """A recipe whose every trial fails used to run forever (failures never count toward
    --trials); a stale pruned.json in a reused trial folder marked the failed trial PRUNED."""
    (tmp_path / "space.yaml").write_text("optim.lr: {type: float, low: 0.1, high: 1.0}\n")
    stale = tmp_path / "out" / "trial_000"
    stale.mkdir(parents=True)
    (stale / "pruned.json").write_text('{"pruned_at_step": 10, "value": 0.5}\n')
    proc = subprocess.run(
        search_cmd(tmp_path, "--trials", "1", "--max-failures", "2", "task=faulty:FaultyTask", "model.fault=raise:0:2"),
        cwd=tmp_path,
        env=env_for_cli(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" not in proc.stderr.split("boom in user code")[-1]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("dtrain: error: search: 2 trials failed (--max-failures=2); the last: trial 1 exited"), line
    assert proc.stdout.count("search: trial") == 2 and "pruned" not in proc.stdout
    assert [p.name.split(".")[0] for p in (tmp_path / "out").glob("trial_000.earlier-*")] == ["trial_000"]
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    assert [t["state"] for t in summary["trials"]] == ["FAIL", "FAIL"]


@pytest.mark.slow
def test_a_stopped_search_kills_a_trial_that_ignores_the_stop(tmp_path):
    """A trial stuck in a step with a grace timer longer than the search waits never exits
    on SIGTERM; it was left running, orphaned. Now it is SIGKILLed after --stop-grace."""
    (tmp_path / "space.yaml").write_text("optim.lr: {type: float, low: 0.1, high: 1.0}\n")
    search = subprocess.Popen(
        search_cmd(
            tmp_path,
            "--trials",
            "1",
            "--stop-grace",
            "2",
            "task=faulty:FaultyTask",
            "model.fault=hang:0:2",
            "train.collective_timeout_s=100000",
        ),
        cwd=tmp_path,
        env=env_for_cli(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def trial_processes():
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        return [p for p in ps if "dtrain train" in p and str(tmp_path / "out" / "trial_000") in p]

    deadline = time.time() + 120
    while not trial_processes() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(8)  # well into its hanging second step
    t0 = time.time()
    search.send_signal(signal.SIGTERM)
    search.communicate(timeout=60)
    assert search.returncode == 130 and time.time() - t0 < 30
    assert not trial_processes()


@pytest.mark.slow
def test_a_metric_the_task_does_not_report_stops_the_search_after_one_trial(tmp_path):
    (tmp_path / "space.yaml").write_text("optim.lr: {type: float, low: 0.1, high: 1.0}\n")
    proc = subprocess.run(
        search_cmd(tmp_path, "--trials", "3", "--metric", "eval/acc"),
        cwd=tmp_path,
        env=env_for_cli(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("dtrain: error: search: trial 0 refused the recipe"), lines
    assert any(
        "trial.metric='acc': not an eval metric of this task; it reports accuracy, loss" in line for line in lines
    )
    assert "step 1/" not in proc.stdout


@pytest.mark.slow
def test_two_workers_share_a_study_of_two_rank_trials_on_postgresql(tmp_path, postgres):
    (tmp_path / "space.yaml").write_text(
        "optim.lr: {type: float, low: 0.1, high: 1.0, log: true}\n"
        "optim.weight_decay: {type: float, low: 0.0, high: 1.0e-3}\n"
        "optim.warmup_steps: {type: int, low: 0, high: 10}\n"
    )
    # A password in the URL (this test server trusts loopback, so any works) reaches no file, MLflow
    # param or trial command line: trials get the URL in their environment.
    secret = "s3cret-pw-9f1c"
    storage = postgres.replace("postgres@", f"postgres:{secret}@")
    cmd = search_cmd(
        tmp_path,
        "--trials",
        "3",
        "--storage",
        storage,
        "--study",
        "shared",
        "--pruner",
        "none",
        "--nproc-per-node",
        "2",
    )
    workers = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env_for_cli(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    commands: set[str] = set()
    while any(w.poll() is None for w in workers):
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        # The searches' own command line holds it (warned); so does a child between its fork and
        # its exec, which shows its parent's command line for that moment (seen under load).
        commands.update(line.split(None, 1)[1] for line in ps if "dtrain" in line and " search " not in line)
        time.sleep(0.5)
    outs = [w.communicate(timeout=600) for w in workers]
    assert any("trial.storage=" in c for c in commands) and not any(secret in c for c in commands), [
        c for c in commands if secret in c
    ]
    assert all("holds a password" in err for _, err in outs)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert "postgres:***@" in (tmp_path / "out" / "trial_000" / "config.yaml").read_text()
    assert all(w.returncode == 0 for w in workers), [e[-2000:] for _, e in outs]
    study = optuna.load_study(study_name="shared", storage=postgres)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and sum(t.state.name == "COMPLETE" for t in study.trials) >= 3
    # Each worker ran some of them (one line per trial it finished), and no trial folder twice.
    ran = [out.count("search: trial") for out, _ in outs]
    assert all(n >= 1 for n in ran), ran
    assert sorted(p.name for p in (tmp_path / "out").glob("trial_*")) == [f"trial_{n:03d}" for n in sorted(numbers)]
    for n in numbers:  # every trial ran on 2 ranks
        assert json.loads((tmp_path / "out" / f"trial_{n:03d}" / "summary.json").read_text())["world_size"] == 2


def test_a_key_the_task_does_not_have_is_refused_before_any_trial(tmp_path):
    (tmp_path / "space.yaml").write_text("model.norm: {type: categorical, choices: [layernorm, rmsnorm]}\n")
    proc = run_dtrain(
        [
            "search",
            CNN,
            "--space",
            str(tmp_path / "space.yaml"),
            "--output",
            str(tmp_path / "out"),
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("dtrain: error: space.model.norm=") and "unknown key" in line, line
    assert not (tmp_path / "out" / "trial_000").exists()


def test_space_conditions_and_types(tmp_path):
    """`when:` searches a key only where its condition holds; values keep their types."""
    from dtrain.studies.search.space import load_space, suggest

    cfg = load_config(CNN, ["tracking.enabled=false"])
    path = tmp_path / "space.yaml"
    path.write_text(
        "optim.name: {type: categorical, choices: [sgd, adamw]}\n"
        "optim.momentum: {type: float, low: 0.5, high: 0.99, when: {optim.name: sgd}}\n"
        "optim.warmup_steps: {type: int, low: 0, high: 100, step: 10}\n"
    )
    params = load_space(path, cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        values = suggest(params, study.ask(), {})
        seen.add(values["optim.name"])
        assert ("optim.momentum" in values) == (values["optim.name"] == "sgd")
        assert isinstance(values["optim.warmup_steps"], int) and values["optim.warmup_steps"] % 10 == 0
    assert seen == {"sgd", "adamw"}
    path.write_text("optim.lr: {type: float, low: 0.1, high: 1.0, logg: true}\n")
    with pytest.raises(Exception, match=r"space\.optim\.lr=.*unknown field\(s\) logg"):
        load_space(path, cfg)


def test_plots_name_the_metric_and_a_best_value_at_a_range_edge_is_warned(tmp_path):
    from dtrain.studies.search import edge_warnings, plots
    from dtrain.studies.search.space import Param

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(
        lambda t: (
            -((t.suggest_float("optim.lr", 1e-4, 1.0, log=True) - 0.01) ** 2) + 0 * t.suggest_int("model.width", 8, 64)
        ),
        n_trials=8,
    )
    made = {p.name for p in plots(study, tmp_path, "eval/accuracy")}
    assert made == {"history.png", "slice.png", "importances.png"}
    one = optuna.create_study()
    one.optimize(lambda t: t.suggest_float("optim.lr", 0.0, 1.0), n_trials=3)
    (tmp_path / "one").mkdir()
    assert {p.name for p in plots(one, tmp_path / "one", "eval/loss")} == {"history.png", "slice.png"}

    space = [
        Param("optim.lr", "float", 1e-4, 1.0, log=True),
        Param("model.width", "int", 8, 64),
        Param("optim.name", "categorical", choices=["sgd", "adamw"]),
    ]
    assert edge_warnings(space, {"params": {"optim.lr": 0.01, "model.width": 32, "optim.name": "sgd"}}) == []
    (line,) = edge_warnings(space, {"params": {"optim.lr": 1.2e-4, "model.width": 32, "optim.name": "sgd"}})
    assert line.startswith("search: warning: the best optim.lr=0.00012 lies at the low edge of its range")
    assert edge_warnings(space, None) == []


@pytest.mark.parametrize("warmup, startup, pruned_at", [(1, 3, 2), (0, 3, 1), (1, 5, None)])
def test_a_trial_is_pruned_only_after_the_warm_up(tmp_path, warmup, startup, pruned_at):
    """The defaults (3 completed trials, the first evaluation free) keep the median pruner from
    cutting a trial at its first, noisy report; warm-up 0 shows the cut they prevent, and
    5 startup trials (more than have completed) none at all."""
    from helpers import FakeRun

    from dtrain.features.trial import Trial, make_pruner
    from dtrain.train.config import load_config

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(
        storage=storage, study_name="s", direction="maximize", pruner=make_pruner("median", startup)
    )
    for value in (0.8, 0.85, 0.9):  # three trials completed, each reporting at steps 10 and 20
        t = study.ask()
        t.report(value - 0.1, 10)
        t.report(value, 20)
        study.tell(t, value)
    trial_id = study.ask()._trial_id
    run = FakeRun(
        load_config(
            CNN,
            [
                f"trial.storage={storage}",
                "trial.study=s",
                f"trial.trial_id={trial_id}",
                "trial.metric=accuracy",
                f"trial.prune_startup={startup}",
                f"trial.prune_warmup={warmup}",
            ],
        ),
        metrics=["accuracy"],
    )
    reporter = Trial(run)
    stops = []
    for step in (10, 20):  # far below the median
        run.step = step
        reporter.after_eval(run, {"accuracy": 0.1})
        stops.append(run.stopped is not None and run.stopped[1])
    first = next((i + 1 for i, s in enumerate(stops) if s), None)  # the loop stops at the first
    assert first == pruned_at
