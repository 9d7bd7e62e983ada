"""Benchmark: `pipeline-train experiment=shapes_yolo` on 2 CPU cores, its mAP checked by pycocotools itself.

Ours: the real entry point as a user runs it (Hydra, Lightning, MLflow, k-means anchors, multi-scale, NMS,
checkpoints) in a scratch project dir; val/map and val/map_50 per epoch are read back from MLflow with their
timestamps, so the time to reach the targets includes everything a user waits for. Then `pipeline-eval` scores
best.ckpt and writes predictions.json.
Reference: pycocotools' COCOeval on that predictions.json and the dataset's own annotation file; the table
shows its 12 numbers beside the pipeline's, and the largest difference.

    python bench/yolo_shapes.py                     # the full default training
    python bench/yolo_shapes.py --epochs 2          # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from pipeline.cli import CONF_DIR
from pipeline.metrics.detection import COCO_STATS, pycocotools_stats


def run_ours(workdir: Path, experiment: str, overrides: list[str], targets: dict[str, float]) -> dict:
    """Run pipeline-train; return wall time, per-epoch val/<key> of each target, and when all were first met."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}"}
    start = time.time()
    cmd = [sys.executable, "-m", "pipeline.cli.train", f"experiment={experiment}", *overrides]
    subprocess.run(cmd, cwd=workdir, env=env, check=True)
    wall = time.time() - start
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    history = {
        key: sorted(client.get_metric_history(run.info.run_id, f"val/{key}"), key=lambda m: m.step) for key in targets
    }
    reached = None
    for epoch, points in enumerate(zip(*history.values(), strict=True)):
        if all(m.value >= targets[key] for key, m in zip(targets, points, strict=True)):
            reached = (epoch, max(m.timestamp for m in points) / 1000 - start)
            break
    return {"wall_s": wall, "history": {k: [m.value for m in v] for k, v in history.items()}, "reached": reached}


def run_eval(workdir: Path) -> tuple[dict, Path]:
    """pipeline-eval on the run's best checkpoint; returns its metrics and the predictions.json path."""
    (run_dir,) = (workdir / "outputs" / "train" / "runs").iterdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "pipeline.cli.eval", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"]
    subprocess.run(cmd, cwd=workdir, env=env, check=True)
    (eval_dir,) = (workdir / "outputs" / "eval" / "runs").iterdir()
    return json.loads((eval_dir / "metrics.json").read_text())["metrics"], eval_dir / "predictions.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs (default: config)")
    parser.add_argument("--map", type=float, default=0.60, help="val mAP@[.5:.95] to reach")
    parser.add_argument("--map50", type=float, default=0.90, help="val mAP@0.5 to reach")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"trainer.max_epochs={args.epochs}"] if args.epochs else [])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        epochs = int(compose(config_name="train", overrides=["experiment=shapes_yolo", *overrides]).trainer.max_epochs)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "outputs").mkdir()
        ours = run_ours(workdir, "shapes_yolo", overrides, {"map": args.map, "map_50": args.map50})
        metrics, predictions = run_eval(workdir)
        annotations = workdir / "data" / "shapes" / "annotations" / "instances_val.json"
        start = time.time()
        reference = pycocotools_stats(annotations, predictions)
        reference_s = time.time() - start

    print(
        f"\nYOLO on shapes, {epochs} epochs, {torch.get_num_threads()} torch threads, overrides: {overrides or 'none'}"
    )
    print(f"wall time of pipeline-train (s): {ours['wall_s']:.1f}")
    if ours["reached"]:
        epoch, seconds = ours["reached"]
        print(f"val mAP >= {args.map} and mAP@0.5 >= {args.map50} first at epoch {epoch + 1}, {seconds:.1f} s")
    else:
        print(f"val mAP >= {args.map} and mAP@0.5 >= {args.map50}: not reached")
    print(f"best.ckpt, scored by pipeline-eval and by pycocotools on its predictions.json ({reference_s:.2f} s):")
    print(f"{'':<14}{'pipeline-eval':>16}{'pycocotools':>14}")
    for key, ref in zip(COCO_STATS, reference, strict=True):
        print(f"{key:<14}{metrics[f'val/{key}']:>16.6f}{ref:>14.6f}")
    worst = max(abs(metrics[f"val/{k}"] - r) for k, r in zip(COCO_STATS, reference, strict=True))
    print(f"largest difference: {worst:.2e}")
    for key, values in ours["history"].items():
        print(f"per-epoch val/{key}:", " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
