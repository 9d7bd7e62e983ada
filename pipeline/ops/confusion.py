"""Detection confusion matrix: which class each confident detection took, with background for misses and false
alarms."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou


def detection_confusion(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    pred_labels: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_crowd: Tensor,
    num_classes: int,
    min_score: float,
    iou_threshold: float = 0.5,
) -> Tensor:
    """One image's detection confusion counts as int64 [C, C] on the CPU: rows the predicted class, columns the
    true class (ultralytics' ConfusionMatrix layout); index 0 is background, 1..C-1 the labels.

    Boxes are (x1, y1, x2, y2) [N, 4]; labels 1..C-1; `gt_crowd` [G] bool marks crowd regions. The rule is COCOeval's
    greedy matching made class-agnostic, so a box on the wrong class lands off the diagonal: detections scoring
    >= `min_score` are taken best score first (equal scores in their given order); each takes the still-unmatched
    non-crowd ground truth of highest `box_iou` >= `iou_threshold` (of equal IoUs the last in the given order, as
    COCOeval) and counts (its label, that ground truth's label). A detection that takes none counts (its label,
    background), unless it covers a crowd region by intersection over the detection's own area >= `iou_threshold`
    (COCOeval's crowd rule, so a detection that mAP ignores is ignored here too; a crowd region takes any number of
    them). Each non-crowd ground truth left unmatched counts (background, its label); crowd regions never count as
    missed. A duplicate of a found object therefore counts as a false alarm, (its label, background).
    """
    keep = pred_scores >= min_score
    order = torch.argsort(pred_scores[keep], descending=True, stable=True)
    boxes, labels = pred_boxes[keep][order].float(), pred_labels[keep][order]
    crowd = gt_crowd.bool()
    truth, truth_labels, regions = gt_boxes[~crowd].float(), gt_labels[~crowd], gt_boxes[crowd].float()
    ious = box_iou(boxes, truth).tolist()
    # Intersection over the detection's area, against every crowd region at once.
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    covered = (rb - lt).clamp(min=0).prod(2) / box_area(boxes).clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    in_crowd = (covered >= iou_threshold).any(1).tolist()
    pred_list, truth_list = labels.tolist(), truth_labels.tolist()
    bad = [label for label in pred_list + truth_list if not 1 <= label < num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} outside 1..{num_classes - 1} (0 is background) in a confusion-matrix update")
    taken = [False] * len(truth_list)
    cells = []  # predicted * C + true
    for d, row in enumerate(ious):
        best, match = iou_threshold, None
        for g, iou in enumerate(row):
            if not taken[g] and iou >= best:  # >=: among equal IoUs the last wins, as in COCOeval
                best, match = iou, g
        if match is not None:
            taken[match] = True
            cells.append(pred_list[d] * num_classes + truth_list[match])
        elif not in_crowd[d]:
            cells.append(pred_list[d] * num_classes)
    cells += [label for label, hit in zip(truth_list, taken, strict=True) if not hit]
    index = torch.tensor(cells, dtype=torch.long)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
