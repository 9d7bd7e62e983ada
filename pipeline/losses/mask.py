"""The instance net's loss: the YOLOv3 loss plus Mask R-CNN's mask loss on sampled RoIs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.losses.yolo import YOLOLoss
from pipeline.ops.assign import Assignment
from pipeline.ops.boxes import SlotGrid, decode, paired_box_iou
from pipeline.ops.masks import mask_targets
from pipeline.ops.roi import sample_rois


class MaskYOLOLoss(YOLOLoss):
    """`YOLOLoss` (its keyword arguments) plus `mask` x the per-pixel BCE of the ground-truth class's mask logits
    [28, 28] against the instance masks RoIAligned along each mask RoI.

    Mask RoIs: the ground-truth boxes plus the detector's boxes of the slots assigned to them that overlap their
    ground truth by `positive_iou` (as Mask R-CNN's positive proposals), at most `rois_per_image`, drawn at random
    where there are more with each target's "generator". Targets add "masks" uint8 [N, S, S] to YOLOLoss's.
    Returns YOLOLoss's dict with "mask" (detached) and the weighted mask term in "loss".
    """

    def __init__(self, mask: float, rois_per_image: int, positive_iou: float, **detector: Any) -> None:
        super().__init__(**detector)
        self.mask, self.rois_per_image, self.positive_iou = mask, rois_per_image, positive_iou

    def forward(  # type: ignore[override]
        self,
        pred: Tensor,
        grid: SlotGrid,
        targets: list[dict[str, Tensor]],
        mask_logits: Callable[[list[Tensor]], Tensor],
    ) -> dict[str, Tensor]:
        """`mask_logits`: the net's per-class mask logits [R, K, M, M] for per image RoIs [R_b, 4] (input pixels)."""
        assignment = self.assign(grid, targets, pred.device)  # the detector's positives are also mask RoIs
        losses = super().forward(pred, grid, targets, assignment)
        mask = self.mask_loss(pred, grid, targets, assignment, mask_logits)
        losses["loss"] = losses["loss"] + self.mask * mask
        losses["mask"] = mask.detach()
        return losses

    def mask_rois(
        self, pred: Tensor, grid: SlotGrid, targets: list[dict[str, Tensor]], assignment: Assignment
    ) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """Per image mask RoIs [R_b, 4]; for all of them the owning instance (row of the batch's non-crowd masks),
        its label 1..K, and those masks [N, S, S].

        At most `rois_per_image` per image: the ground-truth boxes (a uniform random subset where there are more,
        `ops.roi.sample_rois`), then detector boxes assigned to them, drawn the same way, in the room left.
        """
        cap = self.rois_per_image
        boxes = decode(pred[..., :4].detach(), grid)
        per_image = torch.bincount(assignment.image, minlength=len(pred)).tolist()  # assignment is sorted by image
        rois, owners, labels, masks = [], [], [], []
        start = 0  # the image's first row among the batch's non-crowd boxes
        for b, (target, slots, box) in enumerate(
            zip(targets, assignment.slot.split(per_image), assignment.box.split(per_image), strict=True)
        ):
            generator, crowd = target["generator"], target["iscrowd"]
            gt, gt_labels, gt_masks = (target[k][~crowd].to(pred.device) for k in ("boxes", "labels", "masks"))
            index = box - start
            chosen = sample_rois(len(gt), cap, generator).to(pred.device)
            positive = paired_box_iou(boxes[b, slots], gt[index]) >= self.positive_iou
            extra = torch.nonzero(positive).flatten()
            extra = extra[sample_rois(len(extra), cap - len(chosen), generator).to(extra.device)]
            rois.append(torch.cat([gt[chosen], boxes[b, slots[extra]]]))
            owner = torch.cat([chosen, index[extra]])
            owners.append(owner + start)
            labels.append(gt_labels[owner])
            masks.append(gt_masks)
            start += len(gt)
        return rois, torch.cat(owners), torch.cat(labels), torch.cat(masks)

    def mask_loss(
        self,
        pred: Tensor,
        grid: SlotGrid,
        targets: list[dict[str, Tensor]],
        assignment: Assignment,
        mask_logits: Callable[[list[Tensor]], Tensor],
    ) -> Tensor:
        """BCE of the ground-truth class's mask logits against the RoIAligned instance masks (0 without RoIs)."""
        rois, owners, labels, masks = self.mask_rois(pred, grid, targets, assignment)
        logits = mask_logits(rois)
        if len(logits) == 0:  # keeps the mask head in the graph (DDP needs every parameter used)
            return logits.sum()
        mask_target = mask_targets(masks, torch.cat(rois), owners, logits.shape[-1])
        picked = logits[torch.arange(len(logits), device=logits.device), labels - 1]
        return F.binary_cross_entropy_with_logits(picked, mask_target)
