"""Semantic segmentation from two folders: images and index (or binary) masks matched by file stem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.checks import DataError, Report, image_size
from pipeline.data.coco import read_rgb
from pipeline.data.formats import IMAGE_SUFFIXES


def _files(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem (a stem twice is ambiguous: an error)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder.")
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if path.stem in files:
            raise DataError(f"{folder}: {files[path.stem].name} and {path.name} share the stem {path.stem!r}.")
        files[path.stem] = path
    return files


class MaskFolderSource:
    """Images and their masks, matched by stem and checked up front; labels after the optional value mapping.

    `values` maps mask pixel values to labels (e.g. {0: 0, 255: 1} for binary masks saved as 0/255); without it
    pixel values are the labels. Every label must be < num_classes or the ignore_index (void). `stems` limits
    the pairs to a listed split.
    """

    def __init__(
        self,
        images_dir: str | Path,
        masks_dir: str | Path,
        num_classes: int,
        ignore_index: int = 255,
        values: dict[int, int] | None = None,
        class_names: list[str] | None = None,
        stems: list[str] | None = None,
    ) -> None:
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.values = {int(k): int(v) for k, v in (values or {}).items()}
        self.category_ids = list(range(1, num_classes))
        images, masks = _files(self.images_dir), _files(self.masks_dir)
        if stems is not None:  # a listed split (VOC's ImageSets): only these images, each must exist
            absent = [stem for stem in stems if stem not in images]
            if absent:
                raise DataError(f"{self.images_dir}: no image for listed id(s) {', '.join(absent[:3])}.")
            images = {stem: images[stem] for stem in stems}
        if not images:
            raise DataError(f"{self.images_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        missing = sorted(set(images) - set(masks))
        if missing:
            examples = ", ".join(images[stem].name for stem in missing[:3])
            raise DataError(f"{self.masks_dir}: no mask for {len(missing)} image(s) of {self.images_dir}, e.g. "
                            f"{examples} (masks are matched by file stem).")  # fmt: skip
        self.pairs = [(images[stem], masks[stem]) for stem in sorted(images)]
        self.report = Report(name=f"{self.images_dir} + {self.masks_dir}", unit="images containing each class")
        self.report.images = len(self.pairs)
        if stems is None:  # with a listed split, the other splits' masks are not orphans
            for stem in sorted(set(masks) - set(images)):
                self.report.repaired("mask without an image (ignored)", masks[stem].name)
        names = class_names or [str(c) for c in range(num_classes)]
        for image_path, mask_path in self.pairs:  # every mask once: sizes and values are checked before training
            labels = self._labels(mask_path)
            width, height = image_size(image_path, decode=True)
            if labels.shape != (height, width):
                raise DataError(f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
                                f"{image_path.name} is {width}x{height}.")  # fmt: skip
            for label in np.unique(labels):
                if label != self.ignore_index:
                    self.report.instances[names[label]] += 1  # images containing the class

    def __len__(self) -> int:
        return len(self.pairs)

    def files(self) -> list[Path]:
        """Every image and mask file of this split (what the run's dataset fingerprint covers)."""
        return [path for pair in self.pairs for path in pair]

    def _labels(self, mask_path: Path) -> np.ndarray:
        """A mask file as labels uint8 [H, W]: one channel (index/palette/grey), mapped, values checked."""
        try:
            with Image.open(mask_path) as img:
                mode = img.mode
                raw = np.asarray(img).astype(np.int64)
        except OSError as err:
            raise DataError(f"{mask_path}: mask does not decode ({err}).") from None
        if mode not in ("1", "L", "P", "I") and not mode.startswith("I;16"):  # values are labels: never scaled
            raise DataError(f"{mask_path}: mask has mode {mode}; masks must be one channel (class index per pixel, "
                            "or a palette PNG).")  # fmt: skip
        if self.values:
            unknown = sorted(set(np.unique(raw).tolist()) - set(self.values))
            if unknown:
                raise DataError(f"{mask_path}: pixel values {unknown[:5]} are not in data.values {self.values}.")
            lut = np.full(max(self.values) + 1, self.ignore_index, dtype=np.int64)
            for value, label in self.values.items():
                lut[value] = label
            raw = lut[raw]
        bad = sorted(set(np.unique(raw).tolist()) - set(range(self.num_classes)) - {self.ignore_index})
        if bad:
            raise DataError(f"{mask_path}: labels {bad[:5]} are neither < data.num_classes={self.num_classes} nor "
                            f"the ignore_index {self.ignore_index} (binary 0/255 masks need data.values).")  # fmt: skip
        return raw.astype(np.uint8)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image RGB uint8 [H, W, 3] and label mask uint8 [H, W] of the index-th pair (sorted by stem)."""
        image_path, mask_path = self.pairs[index]
        return read_rgb(image_path), self._labels(mask_path)
