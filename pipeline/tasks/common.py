"""What every task shares: primitive hyper-parameters, optimizers built from config, and the
outbox through which it hands figures, params and metrics to the tracking layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from pipeline.tasks.schedules import WarmupCosine, run_length


def to_primitive(value: Any) -> Any:
    """OmegaConf containers as plain dicts/lists (resolved); anything else unchanged."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def build_optimizers(task: pl.LightningModule) -> Any:
    """The optimizer (and scheduler) of `task.hparams.optimizer`/`scheduler` config dicts, for configure_optimizers.

    A `WarmupCosine` also gets the trainer's run length (steps, time budget and clock) and is stepped per optimizer
    step, whatever `scheduler_interval` says: its warm-up and progress count steps.
    """
    optimizer = instantiate(task.hparams.optimizer, params=task.parameters())
    if not task.hparams.scheduler:
        return optimizer
    interval = task.hparams.scheduler_interval
    if issubclass(get_class(task.hparams.scheduler["_target_"]), WarmupCosine):
        scheduler = instantiate(task.hparams.scheduler, optimizer=optimizer, run=run_length(task.trainer))
        interval = "step"
    else:
        scheduler = instantiate(task.hparams.scheduler, optimizer=optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def schedule_from_config(checkpoint: dict, scheduler: dict | None) -> None:
    """On resume, a scheduler's settings (`T_max`, `eta_min`, …) come from this run's config, its progress from
    the checkpoint (edits `checkpoint["lr_schedulers"]` before Lightning restores them).

    Lightning restores a scheduler's whole state, settings included: a cosine schedule continued with more epochs
    (`T_max: ${trainer.max_epochs}`) would keep the old length and climb back to the base rate (a warm restart).
    """
    settings = {k: v for k, v in (scheduler or {}).items() if not k.startswith("_")}
    for state in checkpoint.get("lr_schedulers", []):
        state.update({k: v for k, v in settings.items() if k in state})


@dataclass
class Outbox:
    """What a task hands over for the run's record, for a tracking callback to log (`pipeline.tracking.plots.
    TaskOutbox`): figures (artifact path -> RGB uint8 [H, W, 3]), params (name -> text) and metrics (name -> value).

    Tasks fill it on global rank zero only. Tasks stay free of the tracking layer: they never see the logger.
    `draw`: whether this validation's figures are wanted (the tracking callback sets it before each validation:
    rendering them costs time that small data sets feel); tasks hand over validation figures only then.
    """

    figures: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    draw: bool = True

    def take(self) -> Outbox:
        """Everything handed over so far, leaving the outbox empty."""
        taken = Outbox(self.figures, self.params, self.metrics, self.draw)
        self.figures, self.params, self.metrics = {}, {}, {}
        return taken
