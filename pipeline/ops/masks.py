"""Instance-mask geometry: mask targets cut out along boxes, and box-relative masks pasted back into an image."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor
from torchvision.ops import roi_align


def mask_targets(masks: Tensor, boxes: Tensor, index: Tensor, size: int) -> Tensor:
    """RoIAlign binary masks [N, H, W] along boxes [R, 4] (x1, y1, x2, y2 pixels of the masks) -> [R, size, size].

    Row r is masks[index[r]] seen through boxes[r], sampled at cell centres (aligned=True: pixel i covers
    [i, i + 1)), so a target is the soft fraction of mask in each cell, as torchvision's project_masks_on_boxes.
    """
    if len(boxes) == 0:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    rois = torch.cat([index[:, None].to(boxes.dtype), boxes], dim=1)
    pooled = roi_align(masks[:, None].float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return pooled[:, 0]


def _interpolation(start: Tensor, end: Tensor, pixels: int, cells: int) -> Tensor:
    """Bilinear weights [D, pixels, cells] reading a `cells`-wide box-relative row at each pixel centre.

    A pixel whose centre lies outside [start, end) of its box gets no weight (0 in the pasted mask); inside, the
    box maps linearly onto the cells (cell j covers [j, j + 1) in box units), clamped at the outer cells.
    """
    centres = torch.arange(pixels, device=start.device, dtype=torch.float32) + 0.5  # [P]
    extent = (end - start).clamp(min=1e-6)[:, None]
    position = (centres[None] - start[:, None]) / extent * cells - 0.5  # [D, P] in cell-centre coordinates
    low = position.floor()
    frac = (position - low)[..., None]
    low_index = low.long().clamp(0, cells - 1)
    high_index = (low.long() + 1).clamp(0, cells - 1)
    weights = (1 - frac) * F.one_hot(low_index, cells) + frac * F.one_hot(high_index, cells)
    inside = (centres[None] >= start[:, None]) & (centres[None] < end[:, None])
    return weights * inside[..., None]


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """Box-relative mask probabilities [D, M, M] pasted along boxes [D, 4] (pixels) into [D, height, width].

    Each image pixel reads the mask bilinearly at its centre; pixels whose centre lies outside the box get 0, so
    a mask of ones covers exactly the pixels whose centres fall inside the box (no off-by-one at the borders).
    Boxes may reach past the image: the part outside is simply not drawn.
    """
    if len(masks) == 0:
        return masks.new_zeros((0, height, width))
    masks, boxes = masks.float(), boxes.float()
    rows = _interpolation(boxes[:, 1], boxes[:, 3], height, masks.shape[1])  # [D, H, M]
    cols = _interpolation(boxes[:, 0], boxes[:, 2], width, masks.shape[2])  # [D, W, M]
    return rows @ masks @ cols.transpose(1, 2)


def masks_to_original(
    det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int, threshold: float
) -> Tensor:
    """Box-relative mask probabilities det["masks"] [D, M, M] -> bool [D, height, width] in original pixels.

    Pasted along the letterboxed boxes mapped back by the letterbox scale alone (not clipped: a box reaching past
    the image keeps its shape, the part outside is just not drawn).
    """
    sx, sy = scale
    boxes = det["boxes"] / det["boxes"].new_tensor([sx, sy, sx, sy])
    return paste_masks(det["masks"], boxes, height, width) >= threshold


def encode_rle(mask: Tensor) -> dict:
    """bool [H, W] -> COCO RLE {"size": [H, W], "counts": str} (pycocotools' compressed counts as UTF-8 text)."""
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("utf-8")}
