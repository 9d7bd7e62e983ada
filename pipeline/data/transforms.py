"""The only albumentations import: augmentation pipelines from config and the per-batch letterbox resize."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import albumentations as A
import cv2
import numpy as np


def compose(transforms: Sequence[A.BasicTransform], seed: int | None = None) -> A.Compose:
    """Chain transforms instantiated from config (a list of `_target_: albumentations.X` nodes).

    albumentations keeps its own random generator and ignores global seeds, so it is seeded here (and
    re-seeded per loader worker by the DataModule, or every worker would repeat the same augmentations).
    """
    return A.Compose(list(transforms), seed=seed)


@lru_cache(maxsize=32)
def letterbox(size: int, ignore_index: int) -> A.Compose:
    """Resize the longer side to `size` and pad to size x size; padded mask pixels are void (ignore_index)."""
    return A.Compose(
        [
            A.LongestMaxSize(max_size=size),
            A.PadIfNeeded(
                min_height=size,
                min_width=size,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
            ),
        ]
    )


def apply(pipeline: A.Compose, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an albumentations pipeline on an image [H, W, 3] and its mask [H, W]."""
    out = pipeline(image=image, mask=mask)
    return out["image"], out["mask"]
