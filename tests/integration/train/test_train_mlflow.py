"""End to end through the real entry points: training writes MLflow records; eval and predict use the checkpoint."""

from __future__ import annotations

import json
from hashlib import sha1
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.data.coco import CocoSemanticSource
from tests.helpers import TINY, assert_checkpoints_uploaded, run_dirs, run_main, tracking_uri

pytestmark = pytest.mark.slow


def _only_run(workdir: Path):
    client = MlflowClient(tracking_uri(workdir))
    experiment = client.get_experiment_by_name("pipeline")
    training = [r for r in client.search_runs([experiment.experiment_id]) if "pipeline.kind" not in r.data.tags]
    assert len(training) == 1, [r.info.run_id for r in training]
    return client, experiment, training[0]


def test_one_epoch_writes_run_params_metrics_config_and_checkpoints(workdir: Path):
    """Also the final checkpoints in the SQLite store when the run ends (merged from test_tracking_server.py's
    test_final_checkpoints_are_in_the_sqlite_store_when_the_run_ends, which trained the same 2 epochs)."""
    proc = run_main("train", *TINY, "trainer.max_epochs=2", "tags=[mine]", cwd=workdir, check=True)
    assert "mlflow ui --backend-store-uri" in proc.stdout
    # The runs-table link sorts by the monitored metric's best value, best first (MLflow's UI reads it from the URL).
    assert "/runs?orderByKey=metrics.%60best%2Fval%2FmIoU%60&orderByAsc=false)" in proc.stdout

    client, experiment, run = _only_run(workdir)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.net.variant"] == "8s"
    assert params["trainer.max_epochs"] == "2"
    assert params["data.spec.image_size"] == "64"
    assert run.data.tags["pipeline.task"] == "SegmentationTask" and run.data.tags["pipeline.tag.mine"] == "1"
    (run_dir,) = run_dirs(workdir)
    # Named by what sets it apart (model, data, overrides), then 4 hex digits of its run dir.
    assert run.data.tags["pipeline.model"] == "FCN-8s-vgg_tiny" and run.info.run_name.startswith(
        "FCN-8s-vgg_tiny-shapes-"
    )
    # TINY's overrides in the order given, loader workers and logging cadence left out, cut to fit the column.
    assert run.info.run_name.startswith("FCN-8s-vgg_tiny-shapes-num_train16-num_val8-image_size64-bs4-train_sizes")
    assert len(run.info.run_name) <= 85 and "num_workers" not in run.info.run_name
    assert run.info.run_name.endswith("-" + sha1(str(run_dir).encode()).hexdigest()[:4])
    assert "trainer.max_epochs=2" in run.data.tags["pipeline.overrides"]
    assert run.data.tags["mlflow.source.git.commit"]
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(i.tags[0].value for i in inputs) == ["train", "val"] and {i.dataset.name for i in inputs} == {
        "shapes"
    }

    miou = client.get_metric_history(run.info.run_id, "val/mIoU")
    assert len(miou) == 2 and all(0.0 <= m.value <= 1.0 for m in miou)
    assert client.get_metric_history(run.info.run_id, "train/loss_step")

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "last", "best", "val_images"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "last")} >= {"last/last.ckpt"}
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
    assert config["model"]["net"]["variant"] == "8s"

    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (workdir / "data" / "shapes" / "annotations" / "instances_train.json").is_file()
    # artifacts live next to the database, not in ./mlruns of whatever directory the command ran in
    assert list((workdir / "outputs" / "mlartifacts").rglob("last.ckpt")) and not (workdir / "mlruns").exists()
    # the final checkpoints are in the SQLite store when the run ends
    assert_checkpoints_uploaded(client, run.info.run_id, run_dir, workdir / "downloaded")


def _miou(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = 255) -> float:
    """The FCN paper's mean IU from one numpy confusion matrix over all pixels (void excluded)."""
    keep = gt != ignore
    cm = np.bincount(gt[keep].astype(int) * num_classes + pred[keep], minlength=num_classes**2)
    cm = cm.reshape(num_classes, num_classes)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    return float(np.mean(np.diag(cm)[union > 0] / union[union > 0]))


def test_eval_and_predict_from_a_checkpoint(workdir: Path):
    # Validation letterboxes the 64 px images to 96 px and scores at 64 px, as predict outputs them
    run_main("train", *[o for o in TINY if not o.startswith("data.val_size")], "data.val_size=96", cwd=workdir,
             check=True)  # fmt: skip
    (run_dir,) = run_dirs(workdir)
    _, _, train_run = _only_run(workdir)

    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", cwd=workdir, check=True)
    (eval_dir,) = run_dirs(workdir, "eval")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["val/mIoU"] <= 1.0
    client = MlflowClient(tracking_uri(workdir))
    (eval_run,) = client.search_runs(
        [train_run.info.experiment_id], filter_string="tags.`pipeline.kind` = 'evaluation'"
    )
    assert eval_run.data.tags["pipeline.train_run_id"] == train_run.info.run_id
    assert eval_run.data.metrics["val/mIoU"] == metrics["val/mIoU"]

    images = workdir / "data" / "shapes" / "images" / "val"
    run_main(
        "predict",
        f"ckpt_path={run_dir}/checkpoints/last.ckpt",
        f"input={images}",
        "device=cpu",
        cwd=workdir,
        check=True,
    )
    (predict_dir,) = run_dirs(workdir, "predict")
    masks = sorted((predict_dir / "masks").glob("*.png"))
    assert len(masks) == 8 and len(list((predict_dir / "overlays").glob("*.png"))) == 8
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (64, 64) and mask.max() < 4
    # val/mIoU describes what predict writes: predict's masks scored by numpy against the annotation file
    source = CocoSemanticSource(images, workdir / "data" / "shapes" / "annotations" / "instances_val.json")
    gt, pred = [], []
    for index, image_id in enumerate(source.image_ids):
        gt.append(source.load(index)[1])
        name = Path(source.coco.imgs[image_id]["file_name"]).stem
        pred.append(np.asarray(Image.open(predict_dir / "masks" / f"{name}.png")))
    expected = _miou(np.stack(gt), np.stack(pred), 4)
    # eval runs batches of 4, predict one image at a time: float sums in another order may flip a rare pixel
    assert metrics["val/mIoU"] == pytest.approx(expected, abs=2e-3)
    assert "val/mIoU_letterbox" in metrics


def test_missing_checkpoint_is_an_error_not_a_fresh_start(workdir: Path):
    proc = run_main("train", *TINY, f"ckpt_path={workdir / 'nope.ckpt'}", cwd=workdir)
    assert proc.returncode != 0
    assert "does not exist; refusing to start from scratch" in proc.stderr
    assert not (workdir / "outputs" / "train").exists()
