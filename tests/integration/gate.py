"""A callback that lets a test hold a real training between epochs (imported by the training process)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl


class EpochGate(pl.Callback):
    """At the start of each epoch in `epochs`, write `<folder>/at-<epoch>` and wait for `<folder>/go-<epoch>`."""

    def __init__(self, folder: str, epochs: list[int], timeout: float = 300.0) -> None:
        self.folder, self.epochs, self.timeout = Path(folder), list(epochs), timeout

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.epochs:
            return
        (self.folder / f"at-{epoch}").touch()
        deadline = time.monotonic() + self.timeout
        while not (self.folder / f"go-{epoch}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no go-{epoch} in {self.folder} within {self.timeout:g} s")
            time.sleep(0.1)


class SignalAt(pl.Callback):
    """Send `signum` to this training process when a training batch ends at global step `step` (rank 0 only):
    an interruption at an exact point of the training, as a scheduler's SIGTERM or the OOM killer's SIGKILL."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)
