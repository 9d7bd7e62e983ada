"""A callback that lets a test hold a real training between epochs (imported by the training process)."""

from __future__ import annotations

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
