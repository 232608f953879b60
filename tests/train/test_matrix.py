"""The combination matrix (tests/matrix.py) run for real: every cell trains straight, then
stopped at step 2 and resumed through its event, on 2 gloo ranks sharing one process group for
all cells (a 1-rank group for the cells resumed on another world size); the resumed run ends
in the straight run's state. The table in docs/engines.md is the one `python tests/support/matrix.py` prints."""

from __future__ import annotations

import json
from pathlib import Path

import matrix
import pytest
import torch
from helpers import ROOT, load_params, max_param_diff, spawn

# Same world size: the same operations in the same order, so float rounding cannot differ.
# Another world size: reductions reassociate (fp32 ~1e-7 per step; bf16 / fp16 carry it further).
TOLERANCE = {"same": 1e-6, "fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}


def _fit(rank: int, world: int, overrides: list[str], refusal_to: str = "") -> None:
    """One run; with `refusal_to`, a run that must be refused at resume: its line goes there."""
    from dtrain.errors import ResumeRefused
    from dtrain.runtime.distributed import DistEnv
    from dtrain.train.config import load_config
    from dtrain.train.fit import fit

    cfg = load_config(matrix.LM, overrides)
    try:
        outcome = fit(cfg, DistEnv(rank=rank, world_size=world, local_world_size=world), torch.device("cpu"))
        assert not refusal_to, f"{overrides}: not refused"
        assert outcome.status in ("finished", "stopped"), outcome
    except ResumeRefused as e:
        if not refusal_to:
            raise
        if rank == 0:
            Path(refusal_to).write_text(str(e))


def _phase(rank: int, world: int, runs: list[tuple[list[str], str]]) -> None:
    """Every run, in order, in this one process group (a failing run fails the phase)."""
    import os

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # what a launcher sets (DeepSpeed reads it)
    for overrides, refusal_to in runs:
        _fit(rank, world, overrides, refusal_to)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    cells = matrix.cells()
    init, anchor = root / "init.pt", root / "anchor"
    _write_init(init)
    # A finished run of the same task: what `ewc.from` anchors to.
    two_rank: list[tuple[list[str], str]] = [([*matrix.BASE, "train.max_steps=2", f"output_dir={anchor}"], "")]
    one_rank: list[tuple[list[str], str]] = []
    for c in cells:
        base = [*c.overrides(str(init), str(anchor)), f"output_dir={root / c.name}"]
        two_rank.append(([*c.overrides(str(init), str(anchor)), f"output_dir={root / (c.name + '-straight')}"], ""))
        two_rank.append(([*base, f"train.stop_at_step={matrix.STOP_AT}"], ""))
        resume = ([*base, "resume=auto", *c.resume_overrides()], "")
        (one_rank if c.event == matrix.ONE_RANK else two_rank).append(resume)
    # What the check guards against: cell 0 resumed with another data order (seed) must differ.
    broken = root / "broken"
    two_rank.append(([*cells[0].overrides(), f"output_dir={broken}", f"train.stop_at_step={matrix.STOP_AT}"], ""))
    two_rank.append(([*cells[0].overrides(), f"output_dir={broken}", "resume=auto", "seed=7"], ""))
    # A ZeRO checkpoint on another world size: refused when it resumes (the table's one such line).
    zero = next(c for c in cells if c.engine.startswith("zero"))
    one_rank.append(
        (
            [*zero.overrides(str(init), str(anchor)), f"output_dir={root / zero.name}", "resume=auto"],
            str(root / "zero-refusal.txt"),
        )
    )
    spawn(_phase, 2, two_rank)
    spawn(_phase, 1, one_rank)
    return root, cells, init


def _write_init(path):
    """The weights `model.init_from` starts from: the model at another seed."""
    from dtrain.tasks import get_task
    from dtrain.train.config import load_config

    cfg = load_config(matrix.LM, [*matrix.BASE, "seed=123"])
    torch.manual_seed(123)
    task = get_task(cfg.task)(cfg)
    task.datasets()  # (the vocabulary sizes the model)
    model = task.models()["model"].module
    torch.save(model.state_dict(), path)


def test_every_pair_the_engines_accept_is_in_a_cell():
    assert not matrix.pairs_uncovered()


def test_the_docs_carry_the_generated_table():
    assert matrix.table() in (ROOT / "docs" / "engines.md").read_text(), (
        "run python tests/support/matrix.py and paste its table into docs/engines.md"
    )


@pytest.mark.slow
def test_every_cell_resumes_to_the_straight_runs_state(results):
    root, cells, _ = results
    report = []
    for c in cells:
        straight = load_params(root / f"{c.name}-straight" / "model.pt")
        diff = max_param_diff(straight, load_params(root / c.name / "model.pt"), buffers=True)
        tol = TOLERANCE[c.precision] if c.event == matrix.ONE_RANK else TOLERANCE["same"]
        report.append((c.name, c.describe(), diff, tol))
    bad = [r for r in report if not r[2] <= r[3]]
    assert not bad, "\n".join(f"{n} {d}: {diff:.3g} > {tol:g}" for n, d, diff, tol in bad)
    summary = json.loads((root / cells[0].name / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] < summary["initial_loss"]
    init = torch.load(results[2], weights_only=True)["tok.weight"]
    for c in [c for c in cells if "init_from+freeze" in c.features]:
        # Frozen: still the loaded weights (DeepSpeed in bf16 holds a frozen parameter in bf16 only).
        held = init.to(torch.bfloat16).float() if c.engine.startswith("zero") and c.precision == "bf16" else init
        assert torch.equal(load_params(root / c.name / "model.pt")["tok.weight"], held), c.describe()


@pytest.mark.slow
def test_the_check_sees_a_resume_that_went_wrong(results):
    root, cells, _ = results
    straight = load_params(root / f"{cells[0].name}-straight" / "model.pt")
    assert max_param_diff(straight, load_params(root / "broken" / "model.pt")) > 1e-3


@pytest.mark.slow
def test_a_zero_checkpoint_on_another_world_size_is_refused_in_one_line(results):
    root, _, _ = results
    line = matrix.refusal({"engine": "zero0", "event": matrix.ONE_RANK})
    assert (root / "zero-refusal.txt").read_text() == line
