"""COCO instances files read as semantic masks, boxes or instance masks (the shapes dataset is written in it)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from pipeline.data.checks import check_coco


def read_rgb(path: str | Path) -> np.ndarray:
    """Read any image (grayscale, RGBA, 16-bit, EXIF-rotated) as upright RGB uint8 [H, W, 3].

    Deeper-than-8-bit grey images are scaled by their type's range, never by their own maximum, so one stored
    value gives one 8-bit value in every image of a dataset (see `_grey_to_uint8`).
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):
            return np.repeat(_grey_to_uint8(np.asarray(img))[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))


def _grey_to_uint8(values: np.ndarray) -> np.ndarray:
    """A deep grey image [H, W] (uint16, int32 or float32, as PIL decodes modes I;16*, I, F) -> uint8 [H, W].

    uint16: 0..65535 -> 0..255 (v / 257 rounded; 65535 / 255 = 257, so an 8-bit value stored as 16 bits comes
    back exactly). int32 (mode I: 32-bit or signed TIFFs, 16-bit PNGs in older Pillow): its real range is
    unknown, so the 16-bit range is used, clipped to 0..65535. float: 0..1 -> 0..255 clipped (torchvision's and
    scikit-image's convention for float images).
    """
    if values.dtype.kind == "f":
        scaled = np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0
    elif values.dtype.kind in "iu":
        scaled = np.clip(values.astype(np.float64), 0.0, 65535.0) / 257.0
    else:
        raise ValueError(f"cannot read a {values.dtype} image as 8-bit")
    return np.round(scaled).astype(np.uint8)


class CocoSource:
    """Images of a COCO instances file, sorted by image id; category ids sorted ascending are labels 1..K.

    The file and its images are checked first (`pipeline.data.checks.check_coco`): unusable data raises a
    DataError naming the record; repairs (clipped boxes, filled areas) are in `report`. `check_cache`: the folder
    where image checks that passed are remembered (`pipeline.data.check_cache`), None to decode every image.
    """

    NEEDS_MASKS = False  # whether every annotation must carry a segmentation

    def __init__(
        self, images_dir: str | Path, annotations: str | Path | dict, check_cache: str | Path | None = None
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations = None if isinstance(annotations, dict) else Path(annotations)  # None: converted in memory
        dataset, self.report = check_coco(  # before training
            images_dir, annotations, needs_masks=self.NEEDS_MASKS, cache_dir=check_cache
        )
        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
            self.coco.createIndex()
        self.image_ids = sorted(self.coco.getImgIds())
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {cat_id: i + 1 for i, cat_id in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def files(self) -> list[Path]:
        """The image files of this split in the order `read` serves them (what the run's dataset fingerprint covers)."""
        return [self.images_dir / self.coco.imgs[i]["file_name"] for i in self.image_ids]

    def read(self, index: int) -> tuple[np.ndarray, dict, list[dict]]:
        """Image RGB uint8 [H, W, 3], its image record and its annotations, checked against each other."""
        info = self.coco.imgs[self.image_ids[index]]
        path = self.images_dir / info["file_name"]
        image = read_rgb(path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]} (after EXIF rotation) but image id {info['id']} "
                f"in the annotations says {info['width']}x{info['height']}."
            )
        return image, info, self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))


class CocoSemanticSource(CocoSource):
    """Semantic masks rasterised from the instances.

    Labels: 0 is background, categories 1..K. Overlaps: larger instances are painted first, so a small object
    lying on a big one stays visible. `iscrowd` regions are painted `ignore_index` (void), as COCO ignores them
    for matching.
    """

    NEEDS_MASKS = True

    def __init__(
        self,
        images_dir: str | Path,
        annotations: str | Path | dict,
        ignore_index: int = 255,
        check_cache: str | Path | None = None,
    ) -> None:
        super().__init__(images_dir, annotations, check_cache)
        self.ignore_index = ignore_index

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image RGB uint8 [H, W, 3] and semantic mask uint8 [H, W] of the index-th image (sorted by id)."""
        image, _, anns = self.read(index)
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        for ann in sorted(anns, key=lambda a: -a["area"]):
            value = self.ignore_index if ann.get("iscrowd", 0) else self.label_of[ann["category_id"]]
            mask[self.coco.annToMask(ann).astype(bool)] = value
        return image, mask


class CocoBoxSource(CocoSource):
    """Boxes of the instances: labels 1..K, `iscrowd` flags and the annotation areas COCO evaluation uses."""

    def load(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Image RGB uint8 [H, W, 3] and {"image_id", "boxes" [N, 4] xywh float32, "labels", "iscrowd", "area"}."""
        image, info, anns = self.read(index)
        return image, {
            "image_id": info["id"],
            "boxes": np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4),
            "labels": np.array([self.label_of[a["category_id"]] for a in anns], dtype=np.int64),
            "iscrowd": np.array([a.get("iscrowd", 0) for a in anns], dtype=np.int64),
            "area": np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float32),
        }

    def box_sizes(self, size: int) -> np.ndarray:
        """(w, h) [N, 2] of every non-crowd box with positive size, as letterboxed to `size` (for anchor k-means)."""
        sizes = []
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            scale = size / max(info["height"], info["width"])
            for ann in self.coco.imgToAnns[image_id]:
                w, h = ann["bbox"][2:]
                if not ann.get("iscrowd", 0) and w > 0 and h > 0:
                    sizes.append((w * scale, h * scale))
        return np.array(sizes, dtype=np.float32).reshape(-1, 2)


class CocoInstanceSource(CocoBoxSource):
    """Boxes plus one binary mask per instance (polygons and RLE decoded by pycocotools), for instance segmentation."""

    NEEDS_MASKS = True

    def load(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """As `CocoBoxSource.load`, plus "masks" uint8 [N, H, W] in the annotations' order."""
        image, ann = super().load(index)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=ann["image_id"]))
        masks = [self.coco.annToMask(a) for a in anns]
        ann["masks"] = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), dtype=np.uint8)
        return image, ann
