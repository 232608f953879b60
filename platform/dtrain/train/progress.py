"""Rank 0's progress display: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from dtrain.config import redact


class Progress:
    """Other ranks construct it with enabled=False and stay quiet."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar: Any = None
        self.tty = enabled and sys.stderr.isatty()

    def update(self, step: int, total: int, metrics: dict[str, float], eta_s: float) -> None:
        if not self.enabled:
            return
        short = {
            "epoch": metrics["train/epoch"],
            "loss": metrics["train/loss"],
            "lr": metrics["train/lr"],
            "samples/s": metrics["train/samples_per_s"],
        }
        if self.tty:
            if self.bar is None:  # from the step this attempt resumed at
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=True)
        else:
            print(
                f"step {step}/{total} epoch {short['epoch']:.2f} loss {short['loss']:.4f} lr {short['lr']:.4g} "
                f"grad_norm {metrics['train/grad_norm']:.3g} samples/s {short['samples/s']:.1f} "
                f"eta {eta_s:.0f}s",
                flush=True,
            )

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        text = redact.text(text)
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
