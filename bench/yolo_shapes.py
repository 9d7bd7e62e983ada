"""The detector's training: `pipeline-train experiment=shapes_yolo`, its mAP checked by pycocotools itself.

Ours: the real entry point as a user runs it (Hydra, Lightning, MLflow, k-means anchors, multi-scale, NMS,
checkpoints) in a scratch project dir; val/map and val/map_50 per epoch are read back from MLflow with their
timestamps, so the time to reach the targets (`--map` 0.60 and `--map50` 0.90) includes everything a user waits
for. Then `pipeline-eval` scores best.ckpt and writes predictions.json.
Reference: pycocotools' COCOeval on that predictions.json and the dataset's own annotation file; the table
shows its 12 numbers beside the pipeline's, and the largest difference.

    python bench/yolo_shapes.py                     # the full default training
    python bench/yolo_shapes.py --epochs 2          # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import harness
import torch

from pipeline.metrics.detection import COCO_STATS, pycocotools_stats

T = TypeVar("T")


def run_ours(project: harness.Project, experiment: str, overrides: list[str], targets: dict[str, float]) -> dict:
    """Run pipeline-train; return wall time, per-epoch val/<key> of each target, and when all were first met."""
    start = time.time()  # epoch seconds, as MLflow's timestamps
    command = [*harness.TRAIN, f"experiment={experiment}", *overrides]
    wall = harness.run_timed(command, project.root, project.env, quiet=False)
    run_id = harness.latest_run(project.uri).info.run_id
    history = {key: harness.history(project.uri, run_id, f"val/{key}") for key in targets}
    reached = None
    for epoch, points in enumerate(zip(*history.values(), strict=True)):
        if all(m.value >= targets[key] for key, m in zip(targets, points, strict=True)):
            reached = (epoch, max(m.timestamp for m in points) / 1000 - start)
            break
    return {"wall_s": wall, "history": {k: [m.value for m in v] for k, v in history.items()}, "reached": reached}


def run_eval(project: harness.Project) -> tuple[dict, Path]:
    """pipeline-eval on the run's best checkpoint; returns its metrics and the predictions.json path."""
    (run_dir,) = (project.root / "outputs" / "train" / "runs").iterdir()
    command = [sys.executable, "-m", "pipeline.cli.eval", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"]
    harness.run_timed(command, project.root, project.env, quiet=False)
    (eval_dir,) = (project.root / "outputs" / "eval" / "runs").iterdir()
    return json.loads((eval_dir / "metrics.json").read_text())["metrics"], eval_dir / "predictions.json"


def arguments(doc: str, map_: float, map50: float, what: str) -> argparse.Namespace:
    """The options of this bench and the instance model's: the training's, and the two targets of `what` mAP."""
    parser = harness.arguments(doc, summary=False)
    harness.add_training(parser)
    parser.add_argument("--map", type=float, default=map_, help=f"val {what}mAP@[.5:.95] to reach")
    parser.add_argument("--map50", type=float, default=map50, help=f"val {what}mAP@0.5 to reach")
    return harness.parse(parser)


def train_and_score(args: argparse.Namespace, experiment: str, keys: tuple[str, str],
                    reference: Callable[[Path, Path], T]) -> tuple[list[str], int, dict, dict, T]:  # fmt: skip
    """Train `experiment` in a fresh project, score best.ckpt with pipeline-eval and `reference(annotations,
    predictions.json)`; the overrides, epochs, `run_ours`'s result, eval's metrics and the reference's."""
    overrides, epochs = harness.training_overrides(args, f"experiment={experiment}")
    with harness.project() as project:
        ours = run_ours(project, experiment, overrides, dict(zip(keys, (args.map, args.map50), strict=True)))
        metrics, predictions = run_eval(project)
        annotations = project.root / "data" / "shapes" / "annotations" / "instances_val.json"
        return overrides, epochs, ours, metrics, reference(annotations, predictions)


def print_training(title: str, epochs: int, overrides: list[str], ours: dict, args: argparse.Namespace,
                   what: str) -> None:  # fmt: skip
    """The run's heading, wall time and when both `what` mAP targets were first met."""
    print(f"\n{title}, {epochs} epochs, {torch.get_num_threads()} torch threads, overrides: {overrides or 'none'}")
    print(f"wall time of pipeline-train (s): {ours['wall_s']:.1f}")
    if ours["reached"]:
        epoch, seconds = ours["reached"]
        print(f"val {what}mAP >= {args.map} and mAP@0.5 >= {args.map50} first at epoch {epoch + 1}, {seconds:.1f} s")
    else:
        print(f"val {what}mAP >= {args.map} and {what}mAP@0.5 >= {args.map50}: not reached")


def print_tail(worst: float, ours: dict) -> None:
    """The largest difference between pipeline-eval and pycocotools, then the per-epoch curves of the targets."""
    print(f"largest difference: {worst:.2e}")
    for key, values in ours["history"].items():
        print(f"per-epoch val/{key}:", " ".join(f"{v:.3f}" for v in values))


def main() -> None:
    args = arguments(__doc__, 0.60, 0.90, "")
    overrides, epochs, ours, metrics, (reference, reference_s) = train_and_score(
        args, "shapes_yolo", ("map", "map_50"), lambda gt, dt: harness.timed(partial(pycocotools_stats, gt, dt))
    )
    print_training("YOLO on shapes", epochs, overrides, ours, args, "")
    print(f"best.ckpt, scored by pipeline-eval and by pycocotools on its predictions.json ({reference_s:.2f} s):")
    print(f"{'':<14}{'pipeline-eval':>16}{'pycocotools':>14}")
    for key, ref in zip(COCO_STATS, reference, strict=True):
        print(f"{key:<14}{metrics[f'val/{key}']:>16.6f}{ref:>14.6f}")
    worst = max(abs(metrics[f"val/{k}"] - r) for k, r in zip(COCO_STATS, reference, strict=True))
    print_tail(worst, ours)


if __name__ == "__main__":
    main()
