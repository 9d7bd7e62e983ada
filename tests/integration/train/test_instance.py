"""Instance segmentation end to end: box and mask mAP in MLflow, eval's RLE predictions.json scored by pycocotools,
coloured overlays from predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.metrics.detection import COCO_STATS, pycocotools_stats
from tests.helpers import TINY, run_dirs, run_main, tracking_uri, train_project

pytestmark = pytest.mark.slow

INSTANCE = ["experiment=shapes_instance", *TINY, "model.net.neck_width=32", "model.net.mask_width=16",
            "trainer.max_epochs=3"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Path:
    """One small instance-segmentation training shared by the tests of this module."""
    return train_project(tmp_path_factory.mktemp("instance"), _migrated_store, *INSTANCE)


def test_training_logs_box_and_mask_map_and_pictures(trained: Path) -> None:
    client = MlflowClient(tracking_uri(trained))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.task"] == "InstanceTask"
    for key in ("val/map", "val/map_50", "val/segm_map", "val/segm_map_50", "val/segm_map_75", "val/segm_mar_100",
                "val/segm_map_small", "val/segm_AP/circle", "train/loss_mask_epoch"):  # fmt: skip
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "val/segm_map")
    assert len(history) == 3 and all(0.0 <= m.value <= 1.0 for m in history)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"val_images", "pr_curves", "best", "last"} <= artifacts
    (picture,) = [a for a in client.list_artifacts(run.info.run_id, "val_images") if a.path.endswith("002.png")]
    assert picture.file_size > 0


def test_eval_mask_map_equals_pycocotools_on_its_own_predictions_json(trained: Path) -> None:
    (run_dir,) = run_dirs(trained)
    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", cwd=trained, check=True)
    (eval_dir,) = run_dirs(trained, "eval")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    assert predictions
    for p in predictions:
        assert {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(p)
        assert p["segmentation"]["size"] == [64, 64] and isinstance(p["segmentation"]["counts"], str)
    annotations = trained / "data" / "shapes" / "annotations" / "instances_val.json"
    for kind, prefix in (("segm", "val/segm_"), ("bbox", "val/")):
        reference = pycocotools_stats(annotations, eval_dir / "predictions.json", kind)
        ours = [metrics[prefix + key] for key in COCO_STATS]
        assert ours == pytest.approx(reference, abs=1e-6), kind
    # A 3-epoch run scores near 0; tests/unit/test_mask_metrics.py compares non-trivial numbers on the same path.


def test_predict_writes_instance_overlays_and_rle_results(trained: Path) -> None:
    (run_dir,) = run_dirs(trained)
    images = trained / "data" / "shapes" / "images" / "val"
    run_main(
        "predict", f"ckpt_path={run_dir}", f"input={images}", "device=cpu", "min_score=0.0", cwd=trained, check=True
    )
    (predict_dir,) = run_dirs(trained, "predict")
    drawn = sorted((predict_dir / "overlays").glob("*.png"))
    assert len(drawn) == 8 and Image.open(drawn[0]).size == (64, 64)
    results = json.loads((predict_dir / "predictions.json").read_text())
    assert results and {r["file_name"] for r in results} <= {p.name for p in images.iterdir()}
    for r in results:
        mask = mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        assert mask.shape == (64, 64)
        if mask.any():  # the mask lies within its box (pasted along it)
            x, y, w, h = r["bbox"]
            rows, cols = np.nonzero(mask)
            assert cols.min() >= np.floor(x) and cols.max() < np.ceil(x + w) + 1e-3
            assert rows.min() >= np.floor(y) and rows.max() < np.ceil(y + h) + 1e-3
