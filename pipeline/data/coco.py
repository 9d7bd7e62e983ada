"""COCO instances files read as semantic-segmentation samples (the format the shapes dataset is written in)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools.coco import COCO


def read_rgb(path: str | Path) -> np.ndarray:
    """Read any image (grayscale, RGBA, 16-bit, EXIF-rotated) as upright RGB uint8 [H, W, 3]."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            arr = (255.0 * arr / max(float(arr.max()), 1.0)).astype(np.uint8)
            return np.repeat(arr[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))


class CocoSemanticSource:
    """Images of a COCO instances file with semantic masks rasterised from the instances.

    Labels: 0 is background, category ids sorted ascending map to 1..K. Overlaps: larger instances are painted
    first, so a small object lying on a big one stays visible. `iscrowd` regions are painted `ignore_index`
    (void), as COCO ignores them for matching.
    """

    def __init__(self, images_dir: str | Path, annotations: str | Path, ignore_index: int = 255) -> None:
        self.images_dir = Path(images_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            self.coco = COCO(str(annotations))
        self.image_ids = sorted(self.coco.getImgIds())
        self.label_of = {cat_id: i + 1 for i, cat_id in enumerate(sorted(self.coco.getCatIds()))}
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image RGB uint8 [H, W, 3] and semantic mask uint8 [H, W] of the index-th image (sorted by id)."""
        info = self.coco.imgs[self.image_ids[index]]
        path = self.images_dir / info["file_name"]
        image = read_rgb(path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]} (after EXIF rotation) but image id {info['id']} "
                f"in the annotations says {info['width']}x{info['height']}."
            )
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
        for ann in sorted(anns, key=lambda a: -a["area"]):
            value = self.ignore_index if ann.get("iscrowd", 0) else self.label_of[ann["category_id"]]
            mask[self.coco.annToMask(ann).astype(bool)] = value
        return image, mask
