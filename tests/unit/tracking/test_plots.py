"""The figures: each is an RGB uint8 picture; the segmentation confusion matrix is row-normalised by true pixels;
LossCurves keeps the whole run's history across a resume and logs its figure to MLflow; TaskOutbox logs what a task
hands over (figures from setup and from its own on_validation_epoch_end, params, metrics) and asks for validation
figures every N epochs and at the last validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from pipeline.metrics.segmentation import ConfusionMatrixIoU, iou_from_confmat
from pipeline.tasks.common import Outbox
from pipeline.tracking.plots import LossCurves, TaskOutbox
from pipeline.viz import confusion_matrix_figure, iou_bar_figure, row_normalised, training_curves_figure
from tests.helpers import tracking_uri

NAMES = ["background", "circle", "square", "triangle"]


def _is_picture(image: np.ndarray) -> None:
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # something is drawn


def _masks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [2, 16, 16] without class 3 ("triangle") and with void pixels; predictions that use every class."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (2, 16, 16), generator=generator)
    target[:, :2] = 255
    pred = torch.randint(0, 4, (2, 16, 16), generator=generator)
    return pred, target


def test_segmentation_rows_sum_to_one_where_the_class_has_pixels() -> None:
    pred, target = _masks(0)
    metric = ConfusionMatrixIoU(4)
    metric.update(pred, target)
    shares = row_normalised(metric.compute_confmat())
    # Reference: counts of (true, predicted) straight from the masks, void dropped, divided by each class's pixels.
    keep = target != 255
    for true in range(4):
        pixels = int((target[keep] == true).sum())
        for predicted in range(4):
            both = int(((target[keep] == true) & (pred[keep] == predicted)).sum())
            if pixels:
                assert shares[true, predicted] == pytest.approx(both / pixels)
    np.testing.assert_allclose(shares[:3].sum(1), 1.0)
    assert np.isnan(shares[3]).all()  # no true "triangle" pixel: no row


def test_each_figure_is_an_rgb_uint8_picture() -> None:
    pred, target = _masks(1)
    metric = ConfusionMatrixIoU(4)
    metric.update(pred, target)
    confmat = metric.compute_confmat()
    _is_picture(confusion_matrix_figure(confmat, NAMES, "confusion"))
    _is_picture(confusion_matrix_figure(torch.zeros(4, 4, dtype=torch.long), NAMES, "nothing yet", unit="boxes"))
    many = [f"class {i}" for i in range(40)]  # no cell annotations past 30 classes
    _is_picture(confusion_matrix_figure(torch.randint(0, 50, (40, 40)), many, "40 classes"))
    per_class = iou_from_confmat(confmat)["per_class_IoU"]
    _is_picture(iou_bar_figure(per_class, NAMES, "IoU"))
    _is_picture(iou_bar_figure(torch.full((4,), float("nan")), NAMES, "no pixels at all"))
    losses = {"train/loss": [1.0, 0.6, 0.4], "val/loss": [float("nan"), 0.7, 0.5]}
    _is_picture(training_curves_figure([0, 1, 2], losses, {"lr-SGD": [0.1, 0.05, 0.025]}))
    _is_picture(training_curves_figure([0], {}, {"lr-SGD/pg1": [0.0], "lr-SGD/pg2": [0.1]}))


class _Regression(pl.LightningModule):
    """A linear regression logging train/loss (step and epoch) and val/loss, with a halving learning rate; records
    its own step losses."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.step_losses: dict[int, list[float]] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.step_losses.setdefault(self.current_epoch, []).append(float(loss.detach()))
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("val/loss", loss, batch_size=len(batch[0]))

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def _fit(workdir: Path, epochs: int, run_id: str | None, ckpt: Path | None) -> tuple[LossCurves, _Regression, str]:
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).split([2, 1], dim=1)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    curves, module = LossCurves(every_n_epochs=None), _Regression()
    logger = MLFlowLogger(experiment_name="plots", tracking_uri=tracking_uri(workdir), run_id=run_id,
                          artifact_location=str(workdir / "artifacts"))  # fmt: skip
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=[curves],
                         default_root_dir=workdir, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader, loader, ckpt_path=ckpt)
    return curves, module, logger.run_id


def test_loss_curves_cover_the_whole_run_after_a_resume_and_reach_mlflow(workdir: Path) -> None:
    curves, first, run_id = _fit(workdir, 2, None, None)
    assert sorted(curves.history) == [0, 1]
    client = MlflowClient(tracking_uri(workdir))
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/training_curves.png"]
    (checkpoint,) = workdir.rglob("*.ckpt")
    resumed, second, _ = _fit(workdir, 3, run_id, checkpoint)
    history = resumed.history
    assert sorted(history) == [0, 1, 2]  # epochs 0 and 1 from the checkpoint's callback state
    step_losses = {**first.step_losses, **second.step_losses}
    for epoch, values in history.items():
        assert values["lr-SGD"] == pytest.approx(0.1 * 0.5**epoch)  # the rate each epoch started with
        assert values["train/loss"] == pytest.approx(np.mean(step_losses[epoch]), rel=1e-6)  # equal batch sizes
        assert np.isfinite(values["val/loss"])
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val/loss")}
    assert sorted(logged.values()) == pytest.approx(sorted(v["val/loss"] for v in history.values()))
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/training_curves.png"]


def test_loss_curves_refuse_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        LossCurves(every_n_epochs=0)


class _Reporting(_Regression):
    """A task that hands a figure, a param and a metric over in setup, and a figure per validation in its own
    on_validation_epoch_end (which Lightning runs after the callbacks')."""

    def __init__(self) -> None:
        super().__init__()
        self.outbox = Outbox()
        self.picture = np.full((120, 130, 3), 200, dtype=np.uint8)

    def setup(self, stage: str) -> None:
        self.outbox.figures["anchors.png"] = self.picture
        self.outbox.params["anchors"] = "8x8 16x16"
        self.outbox.metrics["anchors/fit"] = 0.75

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.outbox.figures[f"val_images/epoch_{self.current_epoch:03d}.png"] = self.picture


def test_the_task_outbox_reaches_mlflow_and_is_emptied(workdir: Path) -> None:
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).split([2, 1], dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    module = _Reporting()
    logger = MLFlowLogger(experiment_name="outbox", tracking_uri=tracking_uri(workdir),
                          artifact_location=str(workdir / "artifacts"))  # fmt: skip
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=logger, callbacks=[TaskOutbox()],
                         default_root_dir=workdir, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader, loader)
    client = MlflowClient(tracking_uri(workdir))
    run = client.get_run(logger.run_id)
    assert run.data.params["anchors"] == "8x8 16x16" and run.data.metrics["anchors/fit"] == 0.75
    assert [a.path for a in client.list_artifacts(logger.run_id) if not a.is_dir] == ["anchors.png"]
    logged = [a.path for a in client.list_artifacts(logger.run_id, "val_images")]
    assert logged == ["val_images/epoch_000.png", "val_images/epoch_001.png"]
    assert module.outbox == Outbox()  # drained: nothing left behind


class _Drawing(_Reporting):
    """A task that hands over a validation figure only when its outbox asks for figures, as the tasks do."""

    def setup(self, stage: str) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.outbox.draw:
            self.outbox.figures[f"val_images/epoch_{self.current_epoch:03d}.png"] = self.picture


class _StopAfterEpoch(pl.Callback):
    """Ask the trainer to stop during epoch `epoch`, as Lightning's Timer does when `max_time` runs out."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize(("max_epochs", "stop", "drawn"), [(7, None, [2, 5, 6]), (7, 3, [2, 3]), (2, None, [1])])
def test_validation_figures_every_n_epochs_and_at_the_last_validation(workdir: Path, max_epochs, stop, drawn):
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)).split([2, 1], dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    logger = MLFlowLogger(experiment_name="outbox", tracking_uri=tracking_uri(workdir),
                          artifact_location=str(workdir / "artifacts"))  # fmt: skip
    callbacks = [TaskOutbox(every_n_epochs=3), *([_StopAfterEpoch(stop)] if stop is not None else [])]
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=logger, callbacks=callbacks,
                         default_root_dir=workdir, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(_Drawing(), loader, loader)
    logged = [a.path for a in MlflowClient(tracking_uri(workdir)).list_artifacts(logger.run_id, "val_images")]
    assert logged == [f"val_images/epoch_{e:03d}.png" for e in drawn]
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        TaskOutbox(every_n_epochs=0)
