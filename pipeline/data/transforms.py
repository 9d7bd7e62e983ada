"""The only albumentations import: augmentation pipelines from config, mosaics and the per-batch letterbox resize."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose

from pipeline.errors import ConfigError

# Per-box fields that travel with the boxes through a pipeline (and are dropped with them); "index" (each box's
# position in the input) lets per-instance masks follow their boxes.
BOX_FIELDS = ("labels", "iscrowd", "index")


def _box_params(bbox_params: dict | None) -> A.BboxParams | None:
    """Box handling that never raises on real data: boxes are clipped to the image, degenerate ones dropped.

    `bbox_params` adds albumentations' filters, e.g. min_visibility (keep it below 1.0: 1.0 drops boxes that are
    fully inside) and min_area in pixels (so a crop leaves no 1-pixel slivers).
    """
    if bbox_params is None:
        return None
    return A.BboxParams(
        format="pascal_voc", label_fields=list(BOX_FIELDS), clip=True, filter_invalid_bboxes=True, **bbox_params
    )


def compose(
    transforms: Sequence[A.BasicTransform], seed: int | None = None, bbox_params: dict | None = None
) -> A.Compose:
    """Chain transforms instantiated from config (a list of `_target_: albumentations.X` nodes).

    albumentations keeps its own random generator and ignores global seeds, so it is seeded here (and
    re-seeded per loader worker by the DataModule, or every worker would repeat the same augmentations).
    With `bbox_params` (a dict, possibly empty) the pipeline also transforms boxes (x1, y1, x2, y2 pixels).
    """
    transforms = list(transforms)
    # No transforms: no box processor either (albumentations warns about one with nothing to process).
    return A.Compose(transforms, seed=seed, bbox_params=_box_params(bbox_params) if transforms else None)


@lru_cache(maxsize=32)
def letterbox(size: int, ignore_index: int, boxes: bool = False) -> A.Compose:
    """Resize the longer side to `size` and pad to size x size; padded mask pixels are void (ignore_index)."""
    return A.Compose(
        [
            # Masks resized by the nearest pixel *centre* (INTER_NEAREST reads the pixel under the left/top edge:
            # masks then sit ~0.4 px right/down of their images and boxes).
            A.LongestMaxSize(max_size=size, mask_interpolation=cv2.INTER_NEAREST_EXACT),
            A.PadIfNeeded(
                min_height=size,
                min_width=size,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
            ),
        ],
        bbox_params=_box_params({}) if boxes else None,
    )


def reseed(pipeline: A.Compose, seed: int) -> None:
    """Seed `pipeline` for one sample, each transform from its own stream spawned from `seed`.

    albumentations' `set_random_seed` gives every transform of a Compose the same seed: freshly seeded per sample,
    transforms with the same `p` would then always fire together (and draw alike), shrinking the augmentations.
    """
    pipeline.set_random_seed(seed)
    _reseed_children(pipeline, np.random.SeedSequence(seed))


def _reseed_children(compose: BaseCompose, sequence: np.random.SeedSequence) -> None:
    for transform, child in zip(compose.transforms, sequence.spawn(len(compose.transforms)), strict=True):
        transform.set_random_seed(int(child.generate_state(1)[0]))
        if isinstance(transform, BaseCompose):
            _reseed_children(transform, child)


def apply(pipeline: A.Compose, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an albumentations pipeline on an image [H, W, 3] and its mask [H, W]."""
    out = pipeline(image=image, mask=mask)
    return out["image"], out["mask"]


def apply_boxes(
    pipeline: A.Compose, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None = None, **fields: np.ndarray
) -> dict:
    """Run a box-aware pipeline on an image [H, W, 3] and boxes [N, 4] (x1, y1, x2, y2) with per-box `fields`.

    Returns {"image", "boxes" [M, 4] float32, **fields [M]}: boxes cropped away or filtered out are gone. With
    `masks` (uint8 [N, H, W], one per box) the result also has "masks" [M, H', W'] for the surviving boxes.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not pipeline.transforms:
        return {"image": image, "boxes": boxes, **fields, **({} if masks is None else {"masks": masks})}
    extra = {"masks": masks} if masks is not None and len(masks) else {}  # albumentations fails on 0 masks
    out = pipeline(image=image, bboxes=boxes, index=np.arange(len(boxes)), **fields, **extra)
    result = {"image": out["image"], "boxes": np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)}
    result.update({name: np.asarray(out[name], dtype=np.int64) for name in fields})
    if masks is not None:
        kept = np.asarray(out["index"], dtype=np.int64)
        moved = np.asarray(out["masks"]) if extra else np.zeros((0, *out["image"].shape[:2]), dtype=np.uint8)
        result["masks"] = moved[kept]
    return result


class Mosaic:
    """albumentations' `A.Mosaic` at any square output size: `grid_yx` images (2 x 2 by default) into one.

    The cells have the shape the primary image gets from `letterbox` at that size (at least half the output each
    way), and every image is scaled to cover its cell (`fit_mode="cover"`): images of the primary's shape keep the
    letterbox's scale, so objects are as large as in validation, and no padding lies between the cells (a square
    cell would pad every 4:3 image). The cells are laid around a random centre and a size x size window is cut from
    them; boxes are clipped and filtered as `bbox_params` says. `p` is the share of training samples that get a
    mosaic: the caller draws it, so that it reads the other images only for those. `settings`: further `A.Mosaic`
    arguments (`center_range`, `grid_yx`, `interpolation`, ...).
    """

    OURS = ("target_size", "cell_shape", "fit_mode", "metadata_key", "p")

    def __init__(self, p: float, bbox_params: dict, **settings: Any) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"data.mosaic.p={p}: give the share of training samples that get a mosaic, 0 to 1.")
        taken = sorted(set(settings) & set(self.OURS))
        if taken:
            raise ConfigError(f"data.mosaic sets {', '.join(taken)}, which the pipeline sets itself (the output "
                              "size follows each batch's size); leave them out.")  # fmt: skip
        # albumentations only warns about unknown arguments, and a typo would silently train with the default.
        unknown = sorted(set(settings) - set(inspect.signature(A.Mosaic).parameters))
        if unknown:
            raise ConfigError(f"data.mosaic: {', '.join(unknown)} is no argument of albumentations.Mosaic.")
        self.p, self.bbox_params, self.settings = p, dict(bbox_params), settings
        self.grid = tuple(self._pipeline(32, (32, 32)).transforms[0].grid_yx)  # checks the settings now
        self.others = self.grid[0] * self.grid[1] - 1

    def _pipeline(self, size: int, cell: tuple[int, int], seed: int | None = None) -> A.Compose:
        # Built per mosaic: output and cell shapes change with the batch size and the primary image.
        mosaic = A.Mosaic(target_size=(size, size), cell_shape=cell, fit_mode="cover", p=1.0, **self.settings)
        return A.Compose([mosaic], bbox_params=_box_params(self.bbox_params), seed=seed)

    def cell_shape(self, size: int, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the cells for a primary image of height x width: its letterboxed shape at `size`, each side at
        least size / cells on that axis (A.Mosaic's grid must cover the output)."""
        scale = size / max(height, width)
        rows, cols = self.grid
        return max(round(height * scale), -(-size // rows)), max(round(width * scale), -(-size // cols))

    def __call__(
        self, size: int, seed: int, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], **fields: Sequence
    ) -> dict:
        """One mosaic of `images` [H_i, W_i, 3] with their boxes [N_i, 4] (x1, y1, x2, y2) and per-box `fields`
        (lists aligned with `images`), drawn from `seed`: {"image" [size, size, 3], "boxes" [M, 4] float32,
        **fields [M] int64}. The first image is the primary one (albumentations gives it the largest cell)."""
        pipeline = self._pipeline(size, self.cell_shape(size, *images[0].shape[:2]), seed)
        wanted = list(fields)
        fields = {"index": [np.arange(len(b)) for b in boxes], **fields}  # every box field the processor declares
        others = [
            {"image": image, "bboxes": np.asarray(b, dtype=np.float32).reshape(-1, 4),
             **{name: np.asarray(values[i + 1]) for name, values in fields.items()}}
            for i, (image, b) in enumerate(zip(images[1:], boxes[1:], strict=True))
        ]  # fmt: skip
        primary = {name: np.asarray(values[0]) for name, values in fields.items()}
        out = pipeline(image=images[0], bboxes=np.asarray(boxes[0], dtype=np.float32).reshape(-1, 4), **primary,
                       mosaic_metadata=others)  # fmt: skip
        result = {"image": out["image"], "boxes": np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)}
        result.update({name: np.asarray(out[name], dtype=np.int64) for name in wanted})
        return result
