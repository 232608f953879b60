"""`early_stop.*` and `checkpoint.keep_best`: watch an eval metric, keep the checkpoint of its
best evaluation (`checkpoints/best`, never rotated away), and with `early_stop.metric` end
training after `early_stop.patience` evaluations without improvement (model.pt then holds the
best evaluation's weights, unless `early_stop.restore_best=false`).

`checkpoint.keep_best` alone watches the task's headline metric (`Task.headline_metric()`)
and never stops training; model.pt stays the last weights. The best value, its step and its
checkpoint are this feature's state, so they resume with the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dtrain.config.schema import non_negative, positive
from dtrain.engines.optim import improvement
from dtrain.errors import ConfigError
from dtrain.protocols import Feature, Run

KEEP_BEST = "checkpoint.keep_best (the task's headline_metric())"


@dataclass
class EarlyStopConfig:
    metric: str = ""
    """Eval metric to watch (as in summary.json's `eval`, e.g. loss or accuracy). Each time it
    improves a checkpoint is written and marked `best` (never rotated away); after
    `early_stop.patience` evaluations without improvement training ends. Empty: off."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (loss) or higher (accuracy) is better."""
    patience: int = 3
    """Evaluations without improvement before stopping."""
    min_delta: float = 0.0
    """An improvement must beat the best by more than this."""
    restore_best: bool = True
    """model.pt holds the weights of the best evaluation (else those training ended with)."""

    def validate(self) -> None:
        positive(self, "early_stop", "patience")
        non_negative(self, "early_stop", "min_delta")


class EarlyStop(Feature):
    key, config_class, order = "early_stop", EarlyStopConfig, 20  # restores the best before others keep weights
    matrix = {
        "early_stop": ("early_stop.metric=loss", "early_stop.patience=100", "train.eval_every_steps=2"),
        "keep_best": ("checkpoint.keep_best=true", "train.eval_every_steps=2"),
    }

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.early_stop.metric or cfg.checkpoint.keep_best)

    @classmethod
    def switch(cls, cfg: Any) -> tuple[str, Any]:
        return ("early_stop.metric", cfg.early_stop.metric) if cfg.early_stop.metric else ("checkpoint.keep_best", True)

    def __init__(self, run: Run):
        c: EarlyStopConfig = run.cfg.early_stop
        self.stops = bool(c.metric)
        if self.stops:
            self.metric, self.mode, self.key_name = c.metric, c.mode, "early_stop.metric"
        else:
            name, higher = run.task.headline_metric()
            self.metric, self.mode, self.key_name = name, "max" if higher else "min", KEEP_BEST
        self.cfg = c
        self.best_value = math.nan
        self.best_step = self.evals_since_best = 0
        self.best_checkpoint = ""
        """The folder of the best evaluation's checkpoint (absolute: a run resumed into another
        `output_dir` still finds it in the one it came from)."""

    def setup(self, run: Run) -> None:
        names = run.metric_names()
        if self.metric not in names:
            raise ConfigError(
                self.key_name, self.metric, f"not an eval metric of this task; it reports {', '.join(names) or 'none'}"
            )

    def after_eval(self, run: Run, metrics: dict[str, float]) -> None:
        if run.step < run.settled_from:  # another kind of model than the run makes (not pruned yet)
            return
        value, improved = improvement(
            metrics, self.key_name, self.metric, self.best_value, self.mode, self.cfg.min_delta if self.stops else 0.0
        )
        if improved:
            self.best_value, self.best_step, self.evals_since_best = value, run.step, 0
            self.best_checkpoint = str(run.checkpoint_folder(run.step).resolve())
            run.request_checkpoint(best=True)
            return
        self.evals_since_best += 1
        if self.stops and self.evals_since_best >= self.cfg.patience:
            run.stop(
                f"early_stop: {self.metric} has not improved on {self.best_value:.4g} (step {self.best_step}) "
                f"for {self.evals_since_best} evaluations"
            )

    def end(self, run: Run, status: str) -> None:
        if status != "finished" or not self.stops or not self.cfg.restore_best or self.best_step == run.step:
            return
        best = Path(self.best_checkpoint) if self.best_checkpoint else None
        if best is None:
            run.say(
                f"early_stop: no evaluation gave a finite {self.metric}; model.pt holds the weights of step {run.step}"
            )
        elif run.load_weights(best):
            run.say(
                f"early_stop: model.pt from step {self.best_step} ({self.metric} {self.best_value:.4g}) "
                f"of {best.parent}"
            )
        else:
            run.say(
                f"early_stop: the best checkpoint (step {self.best_step}) is not there any more ({best}); "
                f"model.pt holds the weights of step {run.step}"
            )

    def summary(self, run: Run) -> dict[str, Any]:
        out: dict[str, Any] = {
            "best": {
                "metric": self.metric,
                "value": self.best_value,
                "step": self.best_step,
                "checkpoint": self.best_checkpoint,
            }
        }
        if self.stops:
            out["early_stop"] = {
                "metric": self.metric,
                "best_value": self.best_value,
                "best_step": self.best_step,
                "stopped_early": self.evals_since_best >= self.cfg.patience,
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "best_checkpoint": self.best_checkpoint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_step = float(state["best_value"]), int(state["best_step"])
        self.evals_since_best, self.best_checkpoint = int(state["evals_since_best"]), str(state["best_checkpoint"])
