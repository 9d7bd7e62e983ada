"""YOLOv3 target assignment: one prediction slot per ground-truth box, and the slots left out of objectness."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from pipeline.ops.anchors import shape_iou
from pipeline.ops.boxes import SlotGrid


class Assignment(NamedTuple):
    """Which slot trains on which box, for a whole batch: image [U], slot [U] (0..P-1 in that image) and box [U]
    (row of the batch's boxes, as given to `assign_batch`), sorted by (image, slot)."""

    image: Tensor
    slot: Tensor
    box: Tensor


def assign_batch(boxes: Tensor, image: Tensor, grid: SlotGrid, anchor_iou: float = 1.0) -> Assignment:
    """Slots of a batch's ground-truth boxes [N, 4] (x1, y1, x2, y2, input pixels), box n in image `image[n]`.

    Each box goes to the cell holding its centre, at the stride and anchor (of `grid.level_anchors`) whose
    shape best matches it (YOLOv3), and also at every other anchor whose shape IoU with it reaches `anchor_iou`
    (YOLOv4's multi-anchor assignment; 1.0 keeps YOLOv3's single anchor). Two boxes of one image landing in one
    slot keep the earlier box, so every slot has one target. One pass over the batch (as YOLOv5's
    `build_targets`), not a loop over its images.
    """
    if len(boxes) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return Assignment(empty, empty, empty)
    num_anchors = grid.level_anchors.shape[1]
    ious = shape_iou(boxes[:, 2:] - boxes[:, :2], grid.level_anchors.reshape(-1, 2))  # [N, S * A]
    chosen = ious >= anchor_iou
    chosen[torch.arange(len(boxes)), ious.argmax(1)] = True
    box_index, best = chosen.nonzero(as_tuple=True)
    boxes = boxes[box_index]
    level, anchor = best // num_anchors, best % num_anchors
    stride = torch.tensor(grid.level_strides, device=boxes.device, dtype=boxes.dtype)[level]
    heights = torch.tensor([h for h, _ in grid.shapes], device=boxes.device)[level]
    widths = torch.tensor([w for _, w in grid.shapes], device=boxes.device)[level]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    cell_x = torch.minimum((centre[:, 0] / stride).floor().long().clamp(min=0), widths - 1)
    cell_y = torch.minimum((centre[:, 1] / stride).floor().long().clamp(min=0), heights - 1)
    num_slots = len(grid.strides)
    keys = image.to(boxes.device)[box_index] * num_slots + grid.index(level, anchor, cell_y, cell_x)
    # First box per (image, slot): unique() sorts the keys; the smallest box index among equal keys wins.
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(unique),), len(box_index), dtype=torch.long, device=boxes.device)
    first.scatter_reduce_(0, inverse, box_index, reduce="amin")
    return Assignment(unique // num_slots, unique % num_slots, first)


def assign(boxes: Tensor, grid: SlotGrid, anchor_iou: float = 1.0) -> tuple[Tensor, Tensor]:
    """One image's `assign_batch`: ground-truth boxes [G, 4] -> (slot [U], box index [U])."""
    found = assign_batch(boxes, torch.zeros(len(boxes), dtype=torch.long, device=boxes.device), grid, anchor_iou)
    return found.slot, found.box


def ignored(pred_boxes: Tensor, gt_boxes: Tensor, threshold: float) -> Tensor:
    """Slots [P] whose decoded box [P, 4] overlaps any ground truth [G, 4] above `threshold` IoU (YOLOv3's ignore)."""
    if len(gt_boxes) == 0:
        return torch.zeros(len(pred_boxes), dtype=torch.bool, device=pred_boxes.device)
    return box_iou(pred_boxes, gt_boxes).amax(1) > threshold
