"""Figures a training run keeps in MLflow: the loss and learning-rate curves of the whole run, and what the task
hands over through its outbox (validation pictures, PR curves, confusion matrices, anchors)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.trainer.states import TrainerFn

from pipeline.tasks.common import Outbox
from pipeline.tracking.runs import log_image
from pipeline.viz import training_curves_figure


class LossCurves(pl.Callback):
    """The whole run's per-epoch `train/loss_epoch`, `val/loss` (where logged) and the learning rate of each
    optimizer's param group at each epoch's start, drawn as one figure, the MLflow artifact
    `plots/training_curves.png`.

    Drawn (rank 0) after every `every_n_epochs`-th epoch (null: never during training) and when training ends;
    each drawing replaces the last, so the run holds one file. The history is the callback's state, saved in every
    checkpoint, so a resumed run's figure covers the epochs before the resume too. Nothing runs per step: values
    are read once per epoch from the metrics Lightning has already reduced.
    """

    LOSSES = {"train/loss": "train/loss_epoch", "val/loss": "val/loss"}  # curve name: metric read

    def __init__(self, every_n_epochs: int | None = 10) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs}: give a positive number of epochs, or null")
        self.every_n_epochs = every_n_epochs
        self.history: dict[int, dict[str, float]] = {}  # epoch: {curve name: value}
        self._drawn: dict[int, dict[str, float]] | None = None  # the history last drawn

    def _record(self, epoch: int, values: dict[str, float]) -> None:
        self.history.setdefault(epoch, {}).update(values)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rates = {}
        for optimizer in trainer.optimizers:  # named as LearningRateMonitor names its metrics
            name = f"lr-{type(optimizer).__name__}"
            groups = optimizer.param_groups
            for index, group in enumerate(groups):
                rates[name if len(groups) == 1 else f"{name}/pg{index + 1}"] = float(group["lr"])
        self._record(trainer.current_epoch, rates)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._read(trainer, ["val/loss"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer, ["train/loss"])  # before the epoch's checkpoints: Lightning runs checkpointing last
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer)

    def _read(self, trainer: pl.Trainer, curves: list[str]) -> None:
        metrics = trainer.callback_metrics
        found = {c: float(metrics[self.LOSSES[c]]) for c in curves if self.LOSSES[c] in metrics}
        self._record(trainer.current_epoch, found)

    def _draw(self, trainer: pl.Trainer) -> None:
        """Render and log the figure on rank 0, unless nothing changed since the last drawing."""
        if not trainer.is_global_zero or not self.history or self.history == self._drawn:
            return
        epochs = sorted(self.history)
        names = sorted({name for values in self.history.values() for name in values})
        series = {n: [self.history[e].get(n, float("nan")) for e in epochs] for n in names}
        losses = {n: v for n, v in series.items() if n in self.LOSSES}
        rates = {n: v for n, v in series.items() if n not in self.LOSSES}
        log_image(trainer.logger, training_curves_figure(epochs, losses, rates), "plots/training_curves.png")
        self._drawn = {e: dict(v) for e, v in self.history.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"history": {e: dict(v) for e, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(e): dict(v) for e, v in state_dict["history"].items()}


class TaskOutbox(pl.Callback):
    """Logs what the task put in its `outbox` (`pipeline.tasks.common.Outbox`) to the run: each figure as an image
    artifact at its path, params and metrics by name; then empties the outbox.

    Drained when fitting starts (a task's `setup` runs before `on_fit_start`: the detector's anchors) and after each
    validation: in `on_validation_end`, since Lightning calls callbacks' `on_validation_epoch_end` before the
    module's, where the task renders its figures. While fitting, the task draws validation figures (pictures, PR
    curves, confusion matrices) after every `every_n_epochs`-th epoch and at the last validation (the epochs or the
    time budget ran out); metrics are logged at every validation.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs}: give a positive number of epochs")
        self.every_n_epochs = every_n_epochs

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outbox: Outbox | None = getattr(pl_module, "outbox", None)
        if outbox is not None:  # Lightning calls this before the module's own hooks
            outbox.draw = trainer.state.fn != TrainerFn.FITTING or self._last(trainer) or (
                (trainer.current_epoch + 1) % self.every_n_epochs == 0
            )  # fmt: skip

    @staticmethod
    def _last(trainer: pl.Trainer) -> bool:
        """Whether this validation ends the fit: its epochs, steps or time budget (Lightning's Timer, which asks the
        trainer to stop and then validates once more) have run out."""
        epochs, steps = trainer.max_epochs, trainer.max_steps
        return (
            trainer.should_stop
            or (epochs is not None and epochs >= 0 and trainer.current_epoch + 1 >= epochs)
            or (steps is not None and steps >= 0 and trainer.global_step >= steps)
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drain(trainer, pl_module)

    def _drain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outbox: Outbox | None = getattr(pl_module, "outbox", None)
        if outbox is None:
            return
        taken, logger = outbox.take(), trainer.logger
        for artifact_file, image in taken.figures.items():
            log_image(logger, image, artifact_file)
        if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
            for key, value in taken.params.items():
                logger.experiment.log_param(logger.run_id, key, value)
            for key, value in taken.metrics.items():
                logger.experiment.log_metric(logger.run_id, key, value)
