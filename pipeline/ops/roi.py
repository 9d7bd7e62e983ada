"""RoIs of the mask branch: features pooled along boxes from FPN levels, and which instances get a mask RoI."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper


def fpn_levels(boxes: Tensor, strides: Sequence[int]) -> Tensor:
    """Level index [R] (0 = the first of `strides`) of each box [R, 4] (x1, y1, x2, y2 pixels): FPN's rule.

    Eq. 1 of the FPN paper, floor(4 + log2(sqrt(area) / 224)) clamped to the levels there are, by torchvision's
    own `LevelMapper` (what `MultiScaleRoIAlign` uses), with the levels log2(stride) named by the strides.
    """
    k_min, k_max = int(math.log2(strides[0])), int(math.log2(strides[-1]))
    if [2 ** (k_min + i) for i in range(len(strides))] != list(strides):
        raise ValueError(f"FPN levels need strides that double from one to the next, got {list(strides)}")
    return LevelMapper(k_min, k_max)([boxes])


def multiscale_roi_align(
    levels: Sequence[Tensor], boxes: list[Tensor], strides: Sequence[int], size: int, sampling_ratio: int = 2
) -> Tensor:
    """RoI features [R, C, size, size] of each image's boxes [R_b, 4] (input pixels) from levels [B, C, H/s, W/s].

    Each box reads the level FPN's rule picks (`fpn_levels`) with `roi_align(aligned=True)`: cell j of a level of
    stride s is centred at (j + 0.5) * s input pixels, the convention of the mask targets (`masks.mask_targets`)
    and of pasting (`masks.paste_masks`). torchvision's `MultiScaleRoIAlign` picks the same levels but samples
    with aligned=False, half a cell (s / 2 pixels) off. Rows follow the boxes, image after image.
    """
    rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
    level_of = fpn_levels(rois[:, 1:], strides)
    first = levels[0]
    out = first.new_zeros((len(rois), first.shape[1], size, size))
    for k, (level, stride) in enumerate(zip(levels, strides, strict=True)):
        picked = torch.nonzero(level_of == k).flatten()
        # Assigned even when empty: every level stays in the graph (DDP needs every parameter used).
        out[picked] = roi_align(level, rois[picked], (size, size), spatial_scale=1.0 / stride,
                                sampling_ratio=sampling_ratio, aligned=True).to(out.dtype)  # fmt: skip
    return out


def roi_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by non-negative ints, hashed by numpy's SeedSequence (neighbouring keys: unrelated)."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def sample_rois(count: int, cap: int, generator: torch.Generator) -> Tensor:
    """Indices (long [min(count, cap)], CPU) of the candidates 0..count-1 that get a mask RoI.

    All of them, in order and without a draw, when they fit under `cap`; otherwise `cap` of them drawn uniformly
    without replacement by `generator`, so every candidate has the same chance whatever its place in the file.
    """
    if count <= cap:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[: max(cap, 0)]
