"""Single- vs multi-rank convergence, compared from MLflow by `dtrain compare`.

Parity: the digits CNN at global batch 32 on 1 rank against global batch 256 on 2 ranks
with the linear rule and warmup ends within 1 point of test accuracy; the same 256 run
without LR scaling shows a larger gap, and compare says so.
"""

import json

import mlflow
import pytest
from helpers import ROOT, check, mlflow_store, run_dtrain

from dtrain.studies.sweep import sweep_overrides
from dtrain.train.config import load_config

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
# LR tuned for batch 32; the same number of epochs (= samples) for every run; 5 warmup epochs
# (Goyal et al.) for every run, whatever its steps per epoch.
COMMON = [
    "optim.lr=0.025",
    "optim.base_batch_size=32",
    "optim.warmup_epochs=5",
    "optim.warmup_steps=0",
    "train.epochs=30",
    "checkpoint.every_steps=0",
    "tracking.log_every=5",
    "tracking.experiment=parity",
    "model.widths=[16,32]",  # a smaller ResNet converges alike, 3x sooner
    "model.blocks_per_stage=1",
]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    uri = mlflow_store(root)
    ids = {}
    for name, nproc, extra in [
        ("1x32", 0, ["data.global_batch_size=32"]),
        ("2x256-linear", 2, ["data.global_batch_size=256"]),
        ("2x256-none", 2, ["data.global_batch_size=256", "optim.scale_rule=none"]),
    ]:
        check(
            run_dtrain(
                [
                    "train",
                    RECIPE,
                    *COMMON,
                    *extra,
                    f"tracking.uri={uri}",
                    f"tracking.run_name={name}",
                    f"output_dir={root / name}",
                ],
                cwd=root,
                nproc=nproc,
            )
        )
        ids[name] = json.loads((root / name / "summary.json").read_text())["run_id"]
    return root, uri, ids


def compare(root, uri, *args):
    return run_dtrain(["compare", "--uri", uri, "--output", str(root / "cmp"), *args], cwd=root)


@pytest.mark.slow
def test_linear_rule_keeps_parity_and_no_scaling_shows_a_gap(parity):
    root, uri, ids = parity
    proc = compare(root, uri, "--experiment", "parity")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((root / "cmp" / "comparison.json").read_text())
    v = report["verdict"]
    assert v["baseline"]["run_id"] == ids["1x32"] and v["baseline"]["world_size"] == 1
    checks = {c["run_id"]: c for c in v["checks"]}
    linear, none = checks[ids["2x256-linear"]], checks[ids["2x256-none"]]
    assert linear["within_tolerance"] and abs(linear["gap"]) <= 0.01, v
    assert -none["gap"] > max(0.01, abs(linear["gap"])) and not none["within_tolerance"], v  # a larger gap
    assert not v["ok"] and "does NOT converge like the baseline" in proc.stdout
    # The run outside the tolerance gets the command that finds where it parts from 1 rank (and only it).
    assert (
        f"dtrain check {root / '2x256-none' / 'config.yaml'} --only invariance --nproc-per-node 2 "
        f"output_dir={root / '2x256-none'}-invariance"
    ) in proc.stdout
    assert "2x256-linear/config.yaml" not in proc.stdout

    runs = {r["run_id"]: r for r in report["runs"]}
    assert runs[ids["2x256-linear"]]["scaled_lr"] == pytest.approx(0.2)  # 0.025 x 256 / 32
    assert runs[ids["2x256-none"]]["scaled_lr"] == pytest.approx(0.025)
    assert runs[ids["1x32"]]["samples"] == 30 * (1437 // 32) * 32
    for r in runs.values():
        assert r["wall_time_s"] > 0 and r["samples_per_s"] > 0 and r["final_train_loss"] > 0
    # The stdout table names every run with its world size, threads per rank, batch and LR.
    for name in ids:
        assert name in proc.stdout
    assert "threads" in proc.stdout.splitlines()[0] or any(" threads " in line for line in proc.stdout.splitlines())
    assert all(r["threads"] == 1 for r in report["runs"])  # the tests' OMP_NUM_THREADS=1, on 1 and 2 ranks
    assert (root / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Plot and JSON are also in MLflow, on a comparison run that compare itself ignores.
    client = mlflow.MlflowClient(uri)
    comp = client.get_run(report["comparison_run_id"])
    assert comp.data.tags["dtrain.kind"] == "comparison"
    assert {a.path for a in client.list_artifacts(comp.info.run_id)} == {"comparison.png", "comparison.json"}


@pytest.mark.slow
def test_compare_given_runs_only(parity):
    root, uri, ids = parity
    proc = compare(root, uri, "--runs", ids["1x32"], ids["2x256-linear"], "--fail-on-gap")
    assert proc.returncode == 0 and "converges like the baseline" in proc.stdout, proc.stdout + proc.stderr
    proc = compare(root, uri, "--runs", ids["1x32"], ids["2x256-none"], "--fail-on-gap")
    assert proc.returncode == 1


@pytest.mark.slow
def test_compare_bad_input_is_one_line(parity):
    root, uri, ids = parity
    proc = compare(root, uri, "--experiment", "nope")
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "dtrain: error: --experiment='nope': no such experiment in the tracking store"
    )
    proc = compare(root, uri, "--runs", *ids.values(), "--metric", "eval/acc")  # the runs' metrics, listed
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        "dtrain: error: --metric='eval/acc': none of the 3 runs reports it; they report eval/accuracy, eval/loss"
    ), proc.stderr


@pytest.mark.slow
def test_sweep_world_sizes_one_two_four_keeping_the_per_rank_batch(tmp_path):
    """Weak scaling, as a job grows from 1 GPU to N: 64 per rank at every size, so the global
    batch and the linear-rule LR grow 4-fold while the steps shrink (the same samples). 4 ranks
    on a 2-core machine: slow, but it must work, and under FSDP2 as under DDP (the parity runs
    above): sharded on 2 and 4 ranks, one unit of everything on 1."""
    uri = mlflow_store(tmp_path)
    proc = check(
        run_dtrain(
            [
                "sweep-world-sizes",
                RECIPE,
                "--world-sizes",
                "1,2,4",
                "--keep",
                "per-rank",
                "train.max_steps=10",
                "engine=fsdp",
                "tracking.log_every=5",
                "train.eval_every_steps=10",
                f"tracking.uri={uri}",
                "tracking.experiment=sweep",
                f"output_dir={tmp_path / 'sweep'}",
            ],
            cwd=tmp_path,
        )
    )
    report = json.loads((tmp_path / "sweep" / "comparison" / "comparison.json").read_text())
    runs = sorted(report["runs"], key=lambda r: r["world_size"])
    assert [r["world_size"] for r in runs] == [1, 2, 4]
    assert [r["global_batch"] for r in runs] == [64, 128, 256]
    assert [r["scaled_lr"] for r in runs] == pytest.approx([0.2 * 64 / 256 * k for k in (1, 2, 4)])
    assert "cnn_digits-4x" in proc.stdout
    summaries = [json.loads((tmp_path / "sweep" / f"ws{n}" / "summary.json").read_text()) for n in (1, 2, 4)]
    assert [s["steps"] for s in summaries] == [10, 5, 2] and {s["engine"] for s in summaries} == {"fsdp"}


def test_weak_scaling_shrinks_what_is_counted_in_steps():
    cfg = load_config(
        RECIPE,
        ["train.max_steps=40", "train.eval_every_steps=10", "checkpoint.every_steps=0", "data.grad_accum_steps=2"],
    )
    assert sweep_overrides(cfg, 4, 1, "global") == []
    assert sweep_overrides(cfg, 4, 2, "per-rank") == [
        "data.global_batch_size=128",
        "train.max_steps=20",
        "train.eval_every_steps=5",
        "optim.warmup_steps=25",
    ]
    # An LR stated for the recipe's own batch (no base batch): the rule scales from that batch.
    unstated = load_config(RECIPE, ["optim.base_batch_size=0", "train.max_steps=40"])
    assert sweep_overrides(unstated, 2, 1, "per-rank")[:2] == ["data.global_batch_size=128", "optim.base_batch_size=64"]


def test_baseline_is_the_newest_one_rank_run():
    """Two finished 1-rank runs: the one started last is the baseline, whatever its batch or id
    (choosing by largest global batch, then run id, would take the older one here)."""
    from dtrain.tracking.compare import RunInfo, verdict

    def run(run_id: str, world: int, batch: int, start: int, final: float) -> RunInfo:
        return RunInfo(
            run_id,
            run_id,
            "FINISHED",
            world,
            batch,
            0.1,
            "linear",
            10,
            10 * batch,
            1.0,
            1.0,
            0.1,
            final,
            start_time_ms=start,
        )

    older = run("ffff", 1, 64, start=1_000, final=0.90)
    newer = run("0000", 1, 32, start=2_000, final=0.95)
    v = verdict([older, newer, run("aaaa", 2, 64, start=3_000, final=0.94)], "eval/accuracy", 0.02, True, None)
    assert v["baseline"]["run_id"] == "0000" and "newest" in v["baseline"]["chosen_as"]
    gaps = {c["run_id"]: c["gap"] for c in v["checks"]}
    assert gaps["aaaa"] == pytest.approx(-0.01) and gaps["ffff"] == pytest.approx(-0.05)


def test_the_plot_marks_sparse_curves_and_shades_the_tolerance_band(tmp_path, monkeypatch):
    """Runs with 3 evaluations each: markers on every point, the verdict's band on the metric's
    panels, one legend for the figure (a run's label and the band's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtrain.tracking.compare import RunInfo, plot, verdict

    def run(world: int, accs: list[float]) -> RunInfo:
        curve = [(64 * (i + 1), float(i + 1), a) for i, a in enumerate(accs)]
        return RunInfo(
            f"r{world}",
            f"{world}x",
            "FINISHED",
            world,
            64,
            0.05,
            "linear",
            3,
            192,
            3.0,
            64.0,
            0.5,
            accs[-1],
            start_time_ms=world,
            curves={"eval/accuracy": curve, "train/loss": curve},
        )

    runs = [run(1, [0.5, 0.8, 0.9]), run(2, [0.4, 0.7, 0.85])]
    result = verdict(runs, "eval/accuracy", 0.01, True, None)
    seen = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # the figure as written, to look into
        seen["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plot(runs, "eval/accuracy", tmp_path / "c.png", result)
    fig = seen["fig"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert lines and all(line.get_marker() == "o" for line in lines)
    band = [p for p in fig.axes[1].patches]  # axes[0][1]: the metric against samples seen
    assert len(band) == 1 and band[0].get_label().startswith("within tolerance 0.01")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()][-1] == "within tolerance 0.01 of the baseline"
