"""The COCO evaluation of a detection or instance validation, in original pixels: mAP per IoU type, the detection
confusion matrix with background, and the prediction records for predictions.json, gathered over DDP ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from pipeline.metrics.detection import CocoMAP
from pipeline.ops.confusion import detection_confusion
from pipeline.ops.masks import encode_rle


class CocoEvaluator(nn.Module):
    """One validation: `reset(collect)`, then `update` per batch, then `compute` once on every rank (collectives).

    Predictions per image {"boxes" [D, 4] xywh original pixels, "scores" [D], "labels" [D] 1..K[, "masks" bool
    [D, H, W]]}; targets the batches' "gt" (xywh, "labels", "iscrowd", "area"[, "masks"]). `map` (`CocoMAP` over
    `iou_types`) syncs across ranks itself. The confusion matrix (`ops.confusion.detection_confusion`, int64
    [C, C], rows predicted, columns true, index 0 background) counts the detections scoring >= `shown_score` at
    IoU 0.5. With `collect` (pipeline-eval) each detection is also kept as a record {"image_id", "label", "bbox",
    "score"[, "segmentation" RLE]}.
    """

    def __init__(self, num_classes: int, iou_types: tuple[str, ...], shown_score: float) -> None:
        super().__init__()
        self.num_classes, self.iou_types, self.shown_score = num_classes, iou_types, shown_score
        self.map = CocoMAP(iou_types=iou_types)
        self.reset()

    def reset(self, collect: bool = False) -> None:
        """Start a validation; `collect`: keep the prediction records."""
        self.collect, self.records = collect, []
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)  # this rank's counts

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], image_ids: list[int]) -> None:
        for pred, target, image_id in zip(preds, targets, image_ids, strict=True):
            self.confusion += detection_confusion(
                box_convert(pred["boxes"], "xywh", "xyxy"), pred["scores"], pred["labels"],
                box_convert(target["boxes"], "xywh", "xyxy"), target["labels"], target["iscrowd"],
                self.num_classes, self.shown_score,
            )  # fmt: skip
            if self.collect:
                self.records += _records(image_id, pred)
        self.map.update(preds, targets)

    def compute(self, world_size: int, sum_over_ranks: Callable[[Tensor], Tensor]) -> dict[str, dict]:
        """{iou type: `CocoMAP.summary`} of the whole validation (every rank's images). Afterwards `confusion` holds
        the sum over the ranks (`sum_over_ranks`: the trainer strategy's reduction, a collective) and, when
        collecting under `world_size` > 1 ranks, `records` every rank's, sorted by image id. Resets `map`."""
        stats = {iou_type: self.map.summary(iou_type) for iou_type in self.iou_types}  # synced across DDP ranks
        if self.collect and world_size > 1:  # every rank holds its shard: gather them all
            shards: list[list[dict]] = [[] for _ in range(world_size)]
            torch.distributed.all_gather_object(shards, self.records)
            self.records = sorted((r for shard in shards for r in shard), key=lambda r: r["image_id"])
        self.map.reset()
        self.confusion = sum_over_ranks(self.confusion).cpu()
        return stats


def _records(image_id: int, pred: dict[str, Tensor]) -> list[dict]:
    """One image's detections as plain records for predictions.json (labels, not yet category ids)."""
    records = [
        {"image_id": image_id, "label": int(label), "bbox": box, "score": float(score)}
        for box, score, label in zip(
            pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(), strict=True
        )
    ]
    if "masks" in pred:
        for record, mask in zip(records, pred["masks"], strict=True):
            record["segmentation"] = encode_rle(mask)
    return records
