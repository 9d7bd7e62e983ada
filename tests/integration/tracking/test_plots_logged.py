"""After a tiny training of each family the MLflow run holds its plots: one file per figure in `plots/`, replaced
each epoch; the training curves' history (in the checkpoint) equals what the run logged; the detection confusion
matrix of a validation equals pycocotools' matching of that validation's detections against the annotation file,
and under two DDP processes equals one process's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.training.loading import load_task
from tests.helpers import ROOT, TINY, cocoeval_confusion, run_cli, run_dirs, run_main, tracking_uri

pytestmark = pytest.mark.slow

FAMILIES = {
    "segmentation": [*TINY, "trainer.max_epochs=2"],
    "detection": ["experiment=shapes_yolo", *TINY, "model.net.neck_width=32"],
    "instance": ["experiment=shapes_instance", *TINY, "model.net.neck_width=32", "model.net.mask_width=16"],
}
PLOTS = {
    "segmentation": {"confusion_matrix.png", "iou_per_class.png", "training_curves.png"},
    "detection": {"confusion_matrix.png", "training_curves.png"},
    "instance": {"confusion_matrix.png", "training_curves.png"},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_training_logs_its_plots(workdir: Path, family: str) -> None:
    run_main("train", *FAMILIES[family], cwd=workdir, check=True)
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == PLOTS[family]  # one file per figure, whatever the number of epochs
    for name in plots:
        image = Image.open(client.download_artifacts(run.info.run_id, f"plots/{name}"))
        assert image.mode == "RGB" and min(image.size) > 100, name
    if family != "segmentation":
        assert [a.path for a in client.list_artifacts(run.info.run_id, "pr_curves")] == ["pr_curves/epoch_000.png"]
    (run_dir,) = run_dirs(workdir)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    history = checkpoint["callbacks"]["LossCurves"]["history"]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss_epoch")}
    assert sorted(history) == list(range(len(logged)))
    assert [history[e]["train/loss"] for e in sorted(history)] == pytest.approx([logged[s] for s in sorted(logged)])
    val = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert [history[e]["val/loss"] for e in sorted(history)] == pytest.approx(val)
    rates = [key for key in history[0] if key.startswith("lr-")]  # named as LearningRateMonitor's metrics
    assert rates
    for key in rates:
        monitor = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        assert [history[e][key] for e in sorted(history)] == pytest.approx(monitor), key
    if family != "segmentation":
        _check_confusion(run_dir / "checkpoints" / "last.ckpt", workdir, val_size=96)


def _check_confusion(checkpoint: Path, workdir: Path, val_size: int) -> torch.Tensor:
    """Validate the checkpoint in this process counting every detection (a tiny training has no confident one; the
    score threshold is tested in tests/unit/test_confusion.py) and compare its matrix with COCOeval's, from the
    detections the validation kept and the annotation file; returns the matrix."""
    task, cfg, _ = load_task(checkpoint)
    task.evaluator.shown_score = 0.0
    cfg.data.val_size = val_size  # above 64, the letterbox scales: the matrix must be counted in original pixels
    datamodule = instantiate(cfg.data, targets=task.TARGETS)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(task, datamodule=datamodule, verbose=False)
    annotations = json.loads((workdir / "data/shapes/annotations/instances_val.json").read_text())
    label = {category: index for index, category in enumerate(datamodule.category_ids, start=1)}
    images = []
    for image in annotations["images"]:
        gts = [[x, y, x + w, y + h, label[a["category_id"]], a["iscrowd"]] for a in annotations["annotations"]
               if a["image_id"] == image["id"] for x, y, w, h in [a["bbox"]]]  # fmt: skip
        dets = [[x, y, x + w, y + h, r["score"], r["label"]] for r in task.evaluator.records
                if r["image_id"] == image["id"] for x, y, w, h in [r["bbox"]]]  # fmt: skip
        gts = sorted(gts, key=lambda g: g[4])  # COCOeval lists them class by class: equal IoUs go alike
        images.append((np.array(dets, dtype=np.float64).reshape(-1, 6), np.array(gts, dtype=np.float64).reshape(-1, 6)))
    reference = cocoeval_confusion(images, task.evaluator.shown_score, classes=len(label) + 1)
    assert reference[1:].sum() > 0  # some detections count
    np.testing.assert_array_equal(task.evaluator.confusion.numpy(), reference)
    return task.evaluator.confusion


class KeepConfusion(pl.Callback):
    """For the DDP run: count every detection, and save rank 0's matrix of each validation to $CONFUSION_FILE."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.evaluator.shown_score = 0.0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            torch.save(pl_module.evaluator.confusion, os.environ["CONFUSION_FILE"])


@pytest.mark.distributed
def test_two_ddp_processes_sum_their_confusion_matrices(workdir: Path) -> None:
    # 7 validation images: the ranks hold 4 and 3; the matrix logged must be the one of all 7.
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.spec.num_val=7"]
    keep = f"+callbacks.keep._target_={__name__}.KeepConfusion"
    env = {"CONFUSION_FILE": str(workdir / "confusion.pt"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    run_cli("train", *FAMILIES["detection"], *ddp, keep, cwd=workdir, env=env)
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/confusion_matrix.png",
        "plots/training_curves.png",
    }
    (run_dir,) = run_dirs(workdir)
    single = _check_confusion(run_dir / "checkpoints" / "last.ckpt", workdir, val_size=64)
    np.testing.assert_array_equal(torch.load(workdir / "confusion.pt", weights_only=True).numpy(), single.numpy())
