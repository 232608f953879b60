"""`trial.*`: a run that is one trial of an Optuna study (`dtrain search` sets these keys)
reports its eval metric to the study after each evaluation, and ends when the study's pruner
says so (Optuna calls such a trial "pruned"; the run is halted, not finished: no model.pt, and
`pruned.json` tells the search). Rank 0 talks to the study's storage; every rank learns the
decision.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from dtrain.config.schema import non_negative
from dtrain.errors import ConfigError
from dtrain.protocols import Feature, Run
from dtrain.runtime import distributed
from dtrain.runtime.files import atomic_write

STORAGE_ENV = "DTRAIN_TRIAL_STORAGE"
PRUNED = "pruned.json"
"""Written in the trial's output_dir when its study stopped it: {"pruned_at_step", "value"}."""


@dataclass
class TrialConfig:
    """Set by `dtrain search` when it runs this job as one trial of an Optuna study."""

    storage: str = ""
    """The study's Optuna storage URL. Empty: this run is not a trial."""
    study: str = ""
    """The study's name in that storage."""
    trial_id: int = -1
    """The trial's id in the storage."""
    metric: str = ""
    """The eval metric (without `eval/`) reported to the study after each evaluation."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Optuna's pruner: decides, after each report, whether the study stops the trial early."""
    prune_startup: int = 3
    """The median pruner stops no trial until this many trials have completed."""
    prune_warmup: int = 1
    """This trial's first evaluations after which the study never stops it (a non-finite value always does)."""

    def validate(self) -> None:
        non_negative(self, "trial", "prune_startup", "prune_warmup")


def make_pruner(name: str, startup: int = 3) -> Any:
    """Optuna's pruner. median: worse than the median of earlier trials at the same step, once
    `startup` trials have completed (before that there is no median worth the name);
    hyperband: successive halving over brackets; none: never. A trial's own warm-up is `Trial`'s."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


class Trial(Feature):
    key, config_class, order = "trial", TrialConfig, 30

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.trial.storage)

    def __init__(self, run: Run):
        self.cfg: TrialConfig = run.cfg.trial
        self.reports = 0
        self.stopped_at: tuple[int, float] | None = None
        self.trial: Any = None
        if distributed.is_main():
            import optuna

            # The search hands the storage URL over in the environment, where a password in it is
            # not in the process list or the trial's config (`trial.storage` holds it masked).
            storage = os.environ.get(STORAGE_ENV) or self.cfg.storage
            study = optuna.load_study(
                study_name=self.cfg.study, storage=storage, pruner=make_pruner(self.cfg.pruner, self.cfg.prune_startup)
            )
            self.trial = optuna.trial.Trial(study, self.cfg.trial_id)

    def setup(self, run: Run) -> None:
        names = run.metric_names()
        if self.cfg.metric not in names:
            raise ConfigError(
                "trial.metric",
                self.cfg.metric,
                f"not an eval metric of this task; it reports {', '.join(names) or 'none'}",
            )

    def after_eval(self, run: Run, metrics: dict[str, float]) -> None:
        """Report; every rank learns whether the study stops the trial (collective)."""
        value = metrics[self.cfg.metric]
        stop = False
        self.reports += 1
        if self.trial is not None:
            self.trial.report(value, run.step)
            # The first evaluations of a run with warmup or a high LR are noisy: none of them
            # stops it (a non-finite value always does: nothing recovers from it).
            warm = self.reports > self.cfg.prune_warmup
            stop = (warm and bool(self.trial.should_prune())) or not math.isfinite(value)
        if distributed.broadcast_object(stop):
            self.stopped_at = (run.step, value)
            run.stop(f"trial pruned after step {run.step} ({self.cfg.metric} {value:.4g})", halt=True)

    def end(self, run: Run, status: str) -> None:
        if status == "halted" and self.stopped_at is not None and distributed.is_main():
            step, value = self.stopped_at
            text = json.dumps({"pruned_at_step": step, "value": value}) + "\n"
            atomic_write(run.output_dir / PRUNED, lambda tmp: tmp.write_text(text))
