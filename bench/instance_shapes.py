"""Benchmark: `pipeline-train experiment=shapes_instance` on 2 CPU cores, its mask mAP checked by pycocotools itself.

Ours: the real entry point as a user runs it (Hydra, Lightning, MLflow, k-means anchors, multi-scale, mask
branch, checkpoints) in a scratch project dir; val/segm_map and val/segm_map_50 per epoch are read back from
MLflow with their timestamps, so the time to reach the targets includes everything a user waits for. Then
`pipeline-eval` scores best.ckpt and writes predictions.json (boxes + RLE masks).
Reference: pycocotools' COCOeval(iouType="segm") and ("bbox") on that predictions.json and the dataset's own
annotation file; the table shows its numbers beside the pipeline's, and the largest difference.

    python bench/instance_shapes.py                     # the full default training
    python bench/instance_shapes.py --epochs 2          # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).parent))
from yolo_shapes import run_eval, run_ours  # noqa: E402 (the detector bench's runners, shared)

from pipeline.cli import CONF_DIR  # noqa: E402
from pipeline.metrics.detection import COCO_STATS, pycocotools_stats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs (default: config)")
    parser.add_argument("--map", type=float, default=0.55, help="val mask mAP@[.5:.95] to reach")
    parser.add_argument("--map50", type=float, default=0.85, help="val mask mAP@0.5 to reach")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"trainer.max_epochs={args.epochs}"] if args.epochs else [])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=shapes_instance", *overrides])
    epochs = int(cfg.trainer.max_epochs)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "outputs").mkdir()
        ours = run_ours(workdir, "shapes_instance", overrides, {"segm_map": args.map, "segm_map_50": args.map50})
        metrics, predictions = run_eval(workdir)
        annotations = workdir / "data" / "shapes" / "annotations" / "instances_val.json"
        reference = {kind: pycocotools_stats(annotations, predictions, kind) for kind in ("segm", "bbox")}

    print(f"\nInstance segmentation on shapes, {epochs} epochs, {torch.get_num_threads()} torch threads, "
          f"overrides: {overrides or 'none'}")  # fmt: skip
    print(f"wall time of pipeline-train (s): {ours['wall_s']:.1f}")
    if ours["reached"]:
        epoch, seconds = ours["reached"]
        print(f"val mask mAP >= {args.map} and mAP@0.5 >= {args.map50} first at epoch {epoch + 1}, {seconds:.1f} s")
    else:
        print(f"val mask mAP >= {args.map} and mask mAP@0.5 >= {args.map50}: not reached")
    print("best.ckpt, scored by pipeline-eval and by pycocotools on its predictions.json:")
    print(f"{'':<14}{'eval segm':>12}{'pycocotools':>14}{'eval bbox':>12}{'pycocotools':>14}")
    worst = 0.0
    for i, key in enumerate(COCO_STATS):
        segm, bbox = metrics[f"val/segm_{key}"], metrics[f"val/{key}"]
        print(f"{key:<14}{segm:>12.6f}{reference['segm'][i]:>14.6f}{bbox:>12.6f}{reference['bbox'][i]:>14.6f}")
        worst = max(worst, abs(segm - reference["segm"][i]), abs(bbox - reference["bbox"][i]))
    print(f"largest difference: {worst:.2e}")
    for key, values in ours["history"].items():
        print(f"per-epoch val/{key}:", " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
