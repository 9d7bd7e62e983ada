"""Detections from slot predictions: score = objectness x class probability, threshold, class-aware NMS."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms


def select_detections(
    boxes: Tensor,
    objectness: Tensor,
    class_logits: Tensor,
    score_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_detections: int = 100,
    pre_nms_top_k: int = 1000,
) -> tuple[Tensor, Tensor, Tensor]:
    """One image's slots -> (boxes [D, 4], scores [D], labels [D] in 0..K-1), best score first.

    boxes [P, 4] decoded (x1, y1, x2, y2); objectness [P] and class_logits [P, K] are logits. Every (slot, class)
    pair above `score_threshold` is a candidate (so one box may carry two classes); the `pre_nms_top_k` best go
    through NMS per class, and the `max_detections` best survivors are kept.
    """
    scores = torch.sigmoid(objectness)[:, None] * torch.sigmoid(class_logits)  # [P, K]
    slot, label = torch.nonzero(scores > score_threshold, as_tuple=True)
    candidate_scores = scores[slot, label]
    if len(candidate_scores) > pre_nms_top_k:
        top = candidate_scores.topk(pre_nms_top_k).indices
        slot, label, candidate_scores = slot[top], label[top], candidate_scores[top]
    candidate_boxes = boxes[slot]
    keep = batched_nms(candidate_boxes.float(), candidate_scores.float(), label, iou_threshold)[:max_detections]
    return candidate_boxes[keep], candidate_scores[keep], label[keep]
