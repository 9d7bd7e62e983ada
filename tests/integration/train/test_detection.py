"""The detector end to end: anchors and mAP in MLflow, eval's predictions.json scored by pycocotools, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.metrics.detection import COCO_STATS, pycocotools_stats
from tests.helpers import TINY, run_dirs, run_main, tracking_uri, train_project

pytestmark = pytest.mark.slow

# The shapes smoke run as a detector: 64 px inputs (a multiple of 32), a narrow neck, a few epochs.
DETECTION = ["experiment=shapes_yolo", *TINY, "model.net.neck_width=32", "trainer.max_epochs=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Path:
    """One small detector training shared by the tests of this module (its own project dir and store)."""
    return train_project(tmp_path_factory.mktemp("detector"), _migrated_store, *DETECTION)


def test_training_logs_anchors_map_and_pictures(trained: Path) -> None:
    client = MlflowClient(tracking_uri(trained))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.task"] == "DetectionTask"
    assert run.data.tags["pipeline.model"] == "YOLO-vgg_tiny"
    anchors = [tuple(map(float, a.split("x"))) for a in run.data.params["anchors"].split()]
    assert len(anchors) == 9 and [w * h for w, h in anchors] == sorted(w * h for w, h in anchors)
    assert 0.5 < run.data.metrics["anchors/fit"] <= 1.0
    history = client.get_metric_history(run.info.run_id, "val/map")
    assert len(history) == 3 and all(0.0 <= m.value <= 1.0 for m in history)
    for key in ("val/map_50", "val/map_75", "val/map_small", "val/mar_100", "val/map_50_voc", "val/AP/circle"):
        assert key in run.data.metrics, key
    assert run.data.metrics["val/nonfinite_detections"] == 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"anchors.png", "val_images", "pr_curves", "best", "last"} <= artifacts
    (run_dir,) = run_dirs(trained)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stored = checkpoint["hyper_parameters"]["anchors"]
    assert [f"{w:g}x{h:g}" for w, h in stored] == run.data.params["anchors"].split()
    assert checkpoint["pipeline"]["category_ids"] == [1, 2, 3]


def test_eval_map_equals_pycocotools_on_its_own_predictions_json(trained: Path) -> None:
    (run_dir,) = run_dirs(trained)
    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", cwd=trained, check=True)
    (eval_dir,) = run_dirs(trained, "eval")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    annotations = trained / "data" / "shapes" / "annotations" / "instances_val.json"
    val_ids = {image["id"] for image in json.loads(annotations.read_text())["images"]}
    assert predictions and {p["image_id"] for p in predictions} <= val_ids
    assert {p["category_id"] for p in predictions} <= {1, 2, 3}
    assert all(len(p["bbox"]) == 4 and 0.0 <= p["score"] <= 1.0 for p in predictions)
    reference = pycocotools_stats(annotations, eval_dir / "predictions.json")
    ours = [metrics[f"val/{key}"] for key in COCO_STATS]
    assert ours == pytest.approx(reference, abs=1e-6)


def test_predict_draws_boxes_and_writes_coco_results(trained: Path) -> None:
    (run_dir,) = run_dirs(trained)
    images = trained / "data" / "shapes" / "images" / "val"
    run_main(
        "predict", f"ckpt_path={run_dir}", f"input={images}", "device=cpu", "min_score=0.0", cwd=trained, check=True
    )
    (predict_dir,) = run_dirs(trained, "predict")
    drawn = sorted((predict_dir / "boxes").glob("*.png"))
    assert len(drawn) == 8 and Image.open(drawn[0]).size == (64, 64)
    results = json.loads((predict_dir / "predictions.json").read_text())
    assert results and {r["file_name"] for r in results} <= {p.name for p in images.iterdir()}
    for r in results:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 + 1e-3 and y + h <= 64 + 1e-3 and r["score"] >= 0.0


def test_resume_continues_the_run_with_its_anchors_and_weight_average(trained: Path) -> None:
    (run_dir,) = run_dirs(trained)
    run_main("train", *DETECTION, f"ckpt_path={run_dir}", "trainer.max_epochs=4", cwd=trained, check=True)
    assert run_dirs(trained) == [run_dir]
    client = MlflowClient(tracking_uri(trained))
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    (run,) = [r for r in runs if "pipeline.kind" not in r.data.tags]  # the eval run of the test above aside
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/map")]
    assert len(steps) == 4 and steps == sorted(steps) and len(set(steps)) == 4  # one continuous step axis
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 3 and "averaging_state" in checkpoint
    assert [f"{w:g}x{h:g}" for w, h in checkpoint["hyper_parameters"]["anchors"]] == run.data.params["anchors"].split()


def test_input_sizes_not_divisible_by_32_fail_before_training(workdir: Path) -> None:
    proc = run_main("train", *DETECTION, "data.val_size=48", cwd=workdir)
    assert proc.returncode != 0
    assert "multiples of 32" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert not list((workdir / "outputs" / "train" / "runs").glob("*/checkpoints/*.ckpt"))


def test_a_fork_into_the_instance_model_takes_the_detector_weights_and_anchors_even_with_another_seed(
    trained: Path,
) -> None:
    (parent_dir,) = run_dirs(trained)
    instance = ["experiment=shapes_instance", *TINY, "model.net.neck_width=32", "model.net.mask_width=16"]
    proc = run_main("train", *instance, f"ckpt_path={parent_dir}", "resume_mode=fork", "seed=7",
                    "trainer.max_epochs=1", cwd=trained, check=True)  # fmt: skip
    parent_ckpt = torch.load(parent_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    shared = len(parent_ckpt["state_dict"])  # every detector tensor: the instance model adds its mask branch
    assert f"Fork: {shared} of " in proc.stdout and "left fresh: net.mask_lateral.0.weight (not in the checkpoint)" in (
        proc.stdout
    )
    client = MlflowClient(tracking_uri(trained))
    runs = [r for r in client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
            if "pipeline.kind" not in r.data.tags]  # fmt: skip
    fork = next(r for r in runs if "pipeline.forked_from" in r.data.tags)
    parent = next(r for r in runs if r.info.run_id != fork.info.run_id)
    assert fork.data.params["anchors"] == parent.data.params["anchors"]
    assert fork.data.tags["pipeline.fork_loaded"].startswith(f"{shared} of ")
    (fork_dir,) = [d for d in run_dirs(trained) if d != parent_dir]
    checkpoint = torch.load(fork_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert [f"{w:g}x{h:g}" for w, h in checkpoint["hyper_parameters"]["anchors"]] == parent.data.params[
        "anchors"
    ].split()
