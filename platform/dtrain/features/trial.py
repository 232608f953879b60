"""The trainer's side of a search: a run that is one trial of an Optuna study (`trial.*` keys,
set by `dtrain search`) reports its eval metric after each evaluation and stops when the
study's pruner says so. Rank 0 talks to the study's storage; every rank learns the decision."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from dtrain.runtime import distributed
from dtrain.config import TrialConfig
from dtrain.errors import ConfigError


STORAGE_ENV = "DTRAIN_TRIAL_STORAGE"


@dataclass(frozen=True)
class Pruned:
    """The study's pruner stopped this trial after the evaluation at `step`."""

    step: int
    value: float


def make_pruner(name: str, startup: int = 3) -> Any:
    """median: worse than the median of earlier trials at the same step, once `startup` trials
    have completed (before that there is no median worth the name); hyperband: successive
    halving over brackets; none: never. A trial's own warm-up is `TrialReporter`'s."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


class TrialReporter:
    def __init__(self, cfg: TrialConfig):
        self.metric = cfg.metric
        self.warmup = cfg.prune_warmup
        self.reports = 0
        self.trial: Any = None
        if distributed.is_main():
            import optuna

            # The search hands the storage URL over in the environment, where a password in it is
            # not in the process list or the trial's config (`trial.storage` holds it masked).
            storage = os.environ.get(STORAGE_ENV) or cfg.storage
            study = optuna.load_study(study_name=cfg.study, storage=storage,
                                      pruner=make_pruner(cfg.pruner, cfg.prune_startup))
            self.trial = optuna.trial.Trial(study, cfg.trial_id)

    def report(self, metrics: dict[str, float], step: int) -> Pruned | None:
        """After an evaluation: report; `Pruned` on every rank if the pruner says so (collective)."""
        if self.metric not in metrics:
            raise ConfigError("trial.metric", self.metric, f"not an eval metric of this task ({', '.join(metrics)})")
        value = metrics[self.metric]
        prune = False
        self.reports += 1
        if self.trial is not None:
            self.trial.report(value, step)
            # The first evaluations of a run with warmup or a high LR are noisy: none of them
            # prunes it (a non-finite value always does: nothing recovers from it).
            warm = self.reports > self.warmup
            prune = (warm and bool(self.trial.should_prune())) or not math.isfinite(value)
        return Pruned(step, value) if distributed.broadcast_object(prune) else None
