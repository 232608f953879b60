"""When the loop writes a checkpoint (every `checkpoint.every_steps`, or when a feature asks),
what goes in it, and publishing what was written in the background (`checkpoint.async`)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from dtrain.checkpoint import store
from dtrain.config import Config, recipe, redact
from dtrain.protocols import BaseTask, Checkpointed, Clock, Engine
from dtrain.runtime import distributed
from dtrain.train.state import TrainState


class Checkpointer:
    """Knows where checkpoints live and when one is due; every rank calls it alike."""

    def __init__(
        self,
        cfg: Config,
        task: BaseTask,
        state: TrainState,
        engines: dict[str, Engine],
        parts: dict[str, Checkpointed],
        feature_states: Callable[[], dict[str, Any]],
        clock: Clock,
    ):
        self.root = Path(cfg.output_dir) / "checkpoints"
        self.engines, self.parts = engines, parts
        """What a checkpoint holds beside the trainer's state: the engines and the features' folders."""
        self.feature_states = feature_states
        every = cfg.checkpoint.every_steps
        self.every = every if isinstance(every, int) else 0  # `auto`: the goodput feature asks when
        self.keep, self.background = cfg.checkpoint.keep, cfg.checkpoint.async_
        self.task, self.state, self.clock = task, state, clock
        self.pending: store.Pending | None = None
        self.unfinished = distributed.LaggedAny()
        """Whether any rank's background write is still going, asked at one step, read at the next."""
        self.recipe = {k: redact.text(str(v)) for k, v in recipe.flatten(recipe.to_dict(cfg)).items()}
        """The recipe as strings (weights_only-loadable), for what a resume may not change."""
        self.last_state = ""
        """The trainer state the last checkpoint holds (its repr: nan equals nan)."""

    def due(self, total_steps: int) -> bool:
        step = self.state.step
        return bool(self.every) and step % self.every == 0 and step < total_steps

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def save(self, wait: bool = False, best: bool = False) -> float:
        """Write one checkpoint of the current state; returns the seconds training waited.
        Under `checkpoint.async` the files are written while training goes on, unless `wait`
        (the last checkpoint of a run, one before stopping, or the best one so far)."""
        t0 = time.perf_counter()
        self.finish()  # the previous one is published (or its failure raised) before the next starts
        now = repr(asdict(self.state))
        if self.last_state == now:  # nothing happened since (the best one's, at the end)
            return time.perf_counter() - t0
        self.last_state = now
        for engine in self.engines.values():
            engine.sync_buffers()  # what is saved is rank 0's; every rank continues from the same
        client = {
            "trainer": asdict(self.state),
            "rng": store.gather_rng_states(),
            "task": self.task.extra_state(),
            "recipe": self.recipe,
            "features": self.feature_states(),
        }
        self.pending = store.save(
            self.root, self.state.step, self.parts, client, self.keep, background=self.background and not (wait or best)
        )
        if wait or best or not self.background:
            self.finish()
        if best and distributed.is_main():
            store.mark_best(self.root, self.folder(self.state.step), self.keep)
        seconds = time.perf_counter() - t0
        c = self.clock
        c.checkpoint_s, c.checkpoints, c.last_checkpoint_s = c.checkpoint_s + seconds, c.checkpoints + 1, seconds
        c.last_checkpoint_step = self.state.step
        return seconds

    def poll(self) -> None:
        """After each step: publish a checkpoint written in the background soon after every
        rank's writes have ended, so `latest` moves promptly and a failed write is reported
        within steps. The ranks agree without waiting: asked after one step, answered after
        the next (`LaggedAny`)."""
        if self.pending is None:
            return
        unfinished = self.unfinished.read()
        if unfinished is False:
            self.finish()
        else:
            self.unfinished.start(not self.pending.written())

    def finish(self) -> None:
        """Publish the checkpoint being written, once every rank's files are on disk."""
        pending, self.pending = self.pending, None
        self.unfinished.drain()  # a question about this checkpoint must not answer for the next
        if pending is not None:
            pending.finish()
            self.clock.checkpoint_write_s += time.perf_counter() - pending.started

    def settle(self, wait_s: float) -> str:
        """On the way out after an error: a checkpoint still being written is finished and
        published when every rank's part reached the disk, else removed; returns which, to say.
        No collectives: the other ranks may have stopped anywhere."""
        pending, self.pending = self.pending, None
        return pending.settle(wait_s) if pending is not None else ""
