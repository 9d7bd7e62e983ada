"""YOLOv3 box coding over a flat list of prediction slots, and the letterbox mapping back to image pixels (boxes
and dense maps).

A detector with S output strides and A anchors per stride predicts, per image, P = sum_s A * H_s * W_s slots,
flattened stride by stride, then anchor, row, column (the order `flatten_levels` produces). `SlotGrid`
describes every slot once: its cell, stride and anchor size, so decoding and target assignment are plain
tensor arithmetic over [P] vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_area

# Largest exp(t) a size offset may reach (torchvision's detection box coders clamp at log(1000 / 16) too):
# keeps an untrained head from producing inf boxes.
MAX_SIZE_LOG = math.log(1000.0 / 16)
# Centre offsets are sigmoid outputs in (0, 1); encoding clamps into this open interval so logit stays finite.
_OFFSET_EPS = 1e-6


@dataclass(frozen=True)
class SlotGrid:
    """Per-slot geometry for one input size: cells [P, 2] (x, y), strides [P], anchors [P, 2] (w, h) in pixels."""

    cells: Tensor
    strides: Tensor
    anchors: Tensor
    offsets: tuple[int, ...]  # first slot of each stride level
    shapes: tuple[tuple[int, int], ...]  # (H_s, W_s) of each level
    level_strides: tuple[int, ...]  # stride of each level
    level_anchors: Tensor  # [S, A, 2] (w, h) of each level's anchors

    @staticmethod
    def build(shapes: list[tuple[int, int]], strides: list[int], anchors: Tensor) -> SlotGrid:
        """Slots for feature maps `shapes` [(H_s, W_s)] at `strides`, with `anchors` [S, A, 2] in input pixels."""
        cells, slot_strides, slot_anchors, offsets, start = [], [], [], [], 0
        for (h, w), stride, level_anchors in zip(shapes, strides, anchors, strict=True):
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2).expand(len(level_anchors), -1, -1)
            cells.append(grid.reshape(-1, 2))
            slot_strides.append(torch.full((len(level_anchors) * h * w,), float(stride)))
            slot_anchors.append(level_anchors[:, None, :].expand(-1, h * w, -1).reshape(-1, 2))
            offsets.append(start)
            start += len(level_anchors) * h * w
        return SlotGrid(
            cells=torch.cat(cells).float().to(anchors.device),
            strides=torch.cat(slot_strides).to(anchors.device),
            anchors=torch.cat(slot_anchors).float(),
            offsets=tuple(offsets),
            shapes=tuple((int(h), int(w)) for h, w in shapes),
            level_strides=tuple(int(s) for s in strides),
            level_anchors=anchors.float(),
        )

    def index(self, level: Tensor, anchor: Tensor, cell_y: Tensor, cell_x: Tensor) -> Tensor:
        """Flat slot index [G] of (level, anchor, row, column) [G] each."""
        offsets = torch.tensor(self.offsets, device=level.device)[level]
        heights = torch.tensor([h for h, _ in self.shapes], device=level.device)[level]
        widths = torch.tensor([w for _, w in self.shapes], device=level.device)[level]
        return offsets + (anchor * heights + cell_y) * widths + cell_x


def flatten_levels(outputs: list[Tensor]) -> Tensor:
    """Per-stride head outputs [B, A, H_s, W_s, C] -> one slot list [B, P, C] (stride, anchor, row, column)."""
    return torch.cat([out.reshape(out.shape[0], -1, out.shape[-1]) for out in outputs], dim=1)


def decode(t: Tensor, grid: SlotGrid) -> Tensor:
    """Raw offsets t [..., P, 4] (tx, ty, tw, th) -> boxes [..., P, 4] (x1, y1, x2, y2) in input pixels.

    Centre = (sigmoid(t_xy) + cell) * stride; size = anchor * exp(t_wh), t_wh clamped at MAX_SIZE_LOG.
    """
    centre = (torch.sigmoid(t[..., :2]) + grid.cells) * grid.strides[:, None]
    size = grid.anchors * torch.exp(t[..., 2:].clamp(max=MAX_SIZE_LOG))
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def encode(boxes: Tensor, cells: Tensor, strides: Tensor, anchors: Tensor) -> Tensor:
    """Inverse of `decode`: boxes [N, 4] (x1, y1, x2, y2) -> t [N, 4], given the slots' cells, strides, anchors."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = boxes[:, 2:] - boxes[:, :2]
    offset = (centre / strides[:, None] - cells).clamp(_OFFSET_EPS, 1 - _OFFSET_EPS)
    return torch.cat([torch.logit(offset), torch.log(size / anchors)], dim=-1)


def letterbox_scale(height: int, width: int, size: int) -> tuple[float, float]:
    """Per-axis scale (sx, sy) that a letterbox to `size` (longest side = size, padded bottom/right) applies.

    Matches albumentations' LongestMaxSize rounding: new side = max(1, round(side * size / longest)).
    """
    scale = size / max(height, width)
    return max(1, round(width * scale)) / width, max(1, round(height * scale)) / height


def unletterbox(boxes: Tensor, scale: tuple[float, float], height: int, width: int) -> Tensor:
    """Boxes [N, 4] (x1, y1, x2, y2) in letterboxed pixels -> original image pixels, clipped to the image."""
    sx, sy = scale
    out = boxes / boxes.new_tensor([sx, sy, sx, sy])
    limits = boxes.new_tensor([width, height, width, height])
    return torch.minimum(out.clamp(min=0), limits)


def unletterbox_map(maps: Tensor, height: int, width: int) -> Tensor:
    """Dense maps [C, S, S] of a letterboxed input -> [C, H, W] on the original image's pixels.

    The inverse of `transforms.letterbox` (longest side to S, padded bottom/right): the content region is cropped
    and resized bilinearly with pixel-centre alignment (as the forward resize), e.g. class logits to score or
    predict at the image's own resolution.
    """
    size = maps.shape[-1]
    sx, sy = letterbox_scale(height, width, size)
    content = maps[None, :, : round(height * sy), : round(width * sx)]
    return torch.nn.functional.interpolate(content, size=(height, width), mode="bilinear", align_corners=False)[0]


def paired_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of a [N, 4] and b [N, 4] (x1, y1, x2, y2) -> [N].

    torchvision has only the all-pairs `box_iou` [N, M]; this is its diagonal with the same arithmetic (bit-equal)
    in O(N) instead of building the N x N matrix.
    """
    top_left = torch.max(a[:, :2], b[:, :2])
    bottom_right = torch.min(a[:, 2:], b[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (box_area(a) + box_area(b) - inter)
