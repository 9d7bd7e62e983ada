"""The YOLOv3 loss over a batch of slot predictions: an IoU box loss (GIoU or CIoU) and class BCE on assigned
slots, objectness elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

from pipeline.ops.assign import Assignment, assign_batch, ignored
from pipeline.ops.boxes import SlotGrid, decode, paired_box_iou

# The box losses `box_loss` names: torchvision's, on paired boxes [N, 4] x1, y1, x2, y2.
BOX_LOSSES = {"giou": generalized_box_iou_loss, "ciou": complete_box_iou_loss}


class YOLOLoss(nn.Module):
    """Slot predictions [B, P, 5 + K] and per image targets {"boxes" [N, 4] x1, y1, x2, y2 input pixels, "labels"
    [N] 1..K, "iscrowd" [N]} -> {"loss": the weighted total to optimise, "box", "obj", "cls": each part detached}.

    Weights `box`, `obj`, `cls`; `box_loss`: "giou" or "ciou" (YOLOv5 and later: IoU with centre-distance and
    aspect-ratio terms), torchvision's implementations; `anchor_iou`: a box trains its best-shaped anchor and every
    other anchor this similar in shape (1.0: the best only); `ignore_iou`: unassigned slots whose box overlaps a
    ground truth this much get no objectness loss; `obj_balance`: objectness weight of strides 8, 16, 32 (as YOLOv5).
    Crowd regions only ignore.
    """

    def __init__(
        self,
        box: float,
        obj: float,
        cls: float,
        anchor_iou: float,
        ignore_iou: float,
        obj_balance: Sequence[float],
        box_loss: str = "giou",  # checkpoints written before the option trained GIoU
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"model.loss.box_loss={box_loss!r}: choose one of {', '.join(BOX_LOSSES)}")
        if len(obj_balance) != 3:
            raise ValueError(f"model.loss.obj_balance needs 3 weights (strides 8, 16, 32), got {list(obj_balance)}")
        self.box, self.obj, self.cls = box, obj, cls
        self.anchor_iou, self.ignore_iou, self.obj_balance = anchor_iou, ignore_iou, list(obj_balance)
        self.box_loss = BOX_LOSSES[box_loss]

    @staticmethod
    def ground_truth(targets: list[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's non-crowd boxes [N, 4], their labels [N] (1..K) and image index [N], concatenated on `device`
        image by image (crowd regions only take part in `ignored`)."""
        counts = [len(t["boxes"]) for t in targets]
        images = torch.arange(len(counts), device=device)
        image = torch.repeat_interleave(images, torch.tensor(counts, device=device), output_size=sum(counts))
        crowd = torch.cat([t["iscrowd"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device).reshape(-1, 4)
        return boxes[~crowd], torch.cat([t["labels"] for t in targets]).to(device)[~crowd], image[~crowd]

    def assign(self, grid: SlotGrid, targets: list[dict[str, Tensor]], device: torch.device) -> Assignment:
        """Which slot of which image trains on which of the batch's non-crowd boxes (`ops.assign.assign_batch`)."""
        boxes, _, image = self.ground_truth(targets, device)
        return assign_batch(boxes, image, grid, self.anchor_iou)

    def forward(
        self, pred: Tensor, grid: SlotGrid, targets: list[dict[str, Tensor]], assignment: Assignment | None = None
    ) -> dict[str, Tensor]:
        """The whole batch at once; only the ignore test loops over images (torchvision's `box_iou` is per image).
        `assignment` (from `assign`) when the caller needs it too, so it is computed once per step."""
        found = assignment if assignment is not None else self.assign(grid, targets, pred.device)
        gt_boxes, gt_labels, _ = self.ground_truth(targets, pred.device)
        boxes = decode(pred[..., :4], grid)
        detached = boxes.detach()
        # Slots whose box already overlaps a ground truth (crowd regions included) are left out of objectness.
        keep = torch.stack(
            [~ignored(detached[b], t["boxes"].to(pred.device), self.ignore_iou) for b, t in enumerate(targets)]
        )
        keep[found.image, found.slot] = True
        pos_boxes, matched = boxes[found.image, found.slot], gt_boxes[found.box]
        # Objectness learns the IoU its box reaches (YOLOv5), so scores rank detections by localisation too.
        # The IoUs' dtype: float32 under bf16/16-mixed autocast (boxes decode in float32), float64 under 64-true.
        obj_target = torch.zeros_like(pred[..., 4], dtype=pos_boxes.dtype)
        obj_target[found.image, found.slot] = paired_box_iou(pos_boxes.detach(), matched).clamp(min=0)
        bce = F.binary_cross_entropy_with_logits(pred[..., 4], obj_target, reduction="none")
        obj = pred.new_zeros(())
        ends = [*grid.offsets[1:], pred.shape[1]]
        for weight, start, end in zip(self.obj_balance, grid.offsets, ends, strict=True):
            level_keep = keep[:, start:end]
            obj = obj + weight * (bce[:, start:end] * level_keep).sum() / level_keep.sum().clamp(min=1)
        if len(pos_boxes):
            box = self.box_loss(pos_boxes, matched, reduction="mean")
            cls_target = F.one_hot(gt_labels[found.box] - 1, pred.shape[-1] - 5).to(pred.dtype)
            cls = F.binary_cross_entropy_with_logits(pred[found.image, found.slot, 5:], cls_target)
        else:  # no objects in the batch: objectness alone
            box = cls = pred.new_zeros(())
        total = self.box * box + self.obj * obj + self.cls * cls
        return {"loss": total, "box": box.detach(), "obj": obj.detach(), "cls": cls.detach()}
