"""The instance model's training: `pipeline-train experiment=shapes_instance`, its mask mAP checked by pycocotools.

Ours: the real entry point as a user runs it (Hydra, Lightning, MLflow, k-means anchors, multi-scale, mask
branch, checkpoints) in a scratch project dir; val/segm_map and val/segm_map_50 per epoch are read back from
MLflow with their timestamps, so the time to reach the targets (`--map` 0.55 and `--map50` 0.85) includes
everything a user waits for. Then
`pipeline-eval` scores best.ckpt and writes predictions.json (boxes + RLE masks).
Reference: pycocotools' COCOeval(iouType="segm") and ("bbox") on that predictions.json and the dataset's own
annotation file; the table shows its numbers beside the pipeline's, and the largest difference.

    python bench/instance_shapes.py                     # the full default training
    python bench/instance_shapes.py --epochs 2          # a quick look
"""

from __future__ import annotations

from yolo_shapes import arguments, print_tail, print_training, train_and_score

from pipeline.metrics.detection import COCO_STATS, pycocotools_stats


def main() -> None:
    args = arguments(__doc__, 0.55, 0.85, "mask ")
    overrides, epochs, ours, metrics, reference = train_and_score(
        args, "shapes_instance", ("segm_map", "segm_map_50"),
        lambda gt, dt: {kind: pycocotools_stats(gt, dt, kind) for kind in ("segm", "bbox")})  # fmt: skip
    print_training("Instance segmentation on shapes", epochs, overrides, ours, args, "mask ")
    print("best.ckpt, scored by pipeline-eval and by pycocotools on its predictions.json:")
    print(f"{'':<14}{'eval segm':>12}{'pycocotools':>14}{'eval bbox':>12}{'pycocotools':>14}")
    worst = 0.0
    for i, key in enumerate(COCO_STATS):
        segm, bbox = metrics[f"val/segm_{key}"], metrics[f"val/{key}"]
        print(f"{key:<14}{segm:>12.6f}{reference['segm'][i]:>14.6f}{bbox:>12.6f}{reference['bbox'][i]:>14.6f}")
        worst = max(worst, abs(segm - reference["segm"][i]), abs(bbox - reference["bbox"][i]))
    print_tail(worst, ours)


if __name__ == "__main__":
    main()
