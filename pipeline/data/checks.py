"""Up-front checks of a COCO instances file and its images: fail before training with the file and the record,
repair what is safe to repair (and count it), and summarise what the data holds.

Nothing on disk is changed: the checked, repaired dataset is an in-memory copy.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from rich.console import Console
from rich.progress import track
from rich.table import Table

from pipeline.data.check_cache import check_images_once
from pipeline.errors import ConfigError

# Examples kept per problem kind, for the summary and the error message.
EXAMPLES = 3
# COCO's area ranges (pixels²) for the box-size histogram.
AREA_RANGES = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, math.inf))


class DataError(ConfigError):
    """Data that cannot be used: the message names the file, the record and what is wrong."""


@dataclass
class Report:
    """What a checked dataset holds and what was repaired: counts per kind with the first few records."""

    name: str
    unit: str = "instances"  # what `instances` counts (mask folders: images containing each class)
    images: int = 0
    instances: Counter = field(default_factory=Counter)  # category name -> non-crowd instances
    crowd: int = 0
    box_sizes: list[tuple[float, float]] = field(default_factory=list)  # (w, h) of non-crowd boxes
    repairs: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def repaired(self, kind: str, record: str) -> None:
        """Count one repaired record of `kind` (e.g. "box clipped to the image"), keeping the first few."""
        self.repairs[kind] += 1
        if len(self.examples.setdefault(kind, [])) < EXAMPLES:
            self.examples[kind].append(record)

    def size_histogram(self) -> dict[str, int]:
        """Non-crowd boxes per COCO area range."""
        areas = [w * h for w, h in self.box_sizes]
        return {name: sum(low <= a < high for a in areas) for name, low, high in AREA_RANGES}

    def summary(self) -> dict:
        """The report as plain JSON-able data (images, per-class instances, crowd, box sizes, repairs)."""
        return {
            "images": self.images,
            "instances_per_class": dict(sorted(self.instances.items())),
            "crowd_regions": self.crowd,
            "box_sizes": self.size_histogram(),
            "repairs": {kind: {"count": n, "first": self.examples[kind]} for kind, n in sorted(self.repairs.items())},
        }

    def print(self, console: Console | None = None) -> None:
        """The summary table: images, instances per class, box sizes, repairs with their first records."""
        table = Table(title=f"Data check: {self.name}", show_header=False)
        table.add_column("what")
        table.add_column("value", overflow="fold")
        table.add_row("images", str(self.images))
        per_class = ", ".join(f"{n} {c}" for n, c in sorted(self.instances.items(), key=lambda kv: (-kv[1], kv[0])))
        if self.unit == "instances":
            table.add_row("instances", f"{sum(self.instances.values())} (+ {self.crowd} crowd regions)")
            table.add_row("per class", per_class)
            table.add_row("box sizes", ", ".join(f"{k} {v}" for k, v in self.size_histogram().items()))
        else:
            table.add_row(self.unit, per_class)
        for kind, count in sorted(self.repairs.items()):
            table.add_row(f"[yellow]{kind}[/yellow]", f"{count}: {'; '.join(self.examples[kind])}")
        (console or Console()).print(table)


def _fail(path: Path, problems: list[str], what: str) -> None:
    """Raise one paragraph naming the file, how many records, and the first few."""
    if problems:
        more = f" (and {len(problems) - EXAMPLES} more)" if len(problems) > EXAMPLES else ""
        raise DataError(f"{path}: {what}: {'; '.join(problems[:EXAMPLES])}{more}.")


def read_json(path: Path) -> dict:
    """A COCO instances file as a dict with `images`, `annotations`, `categories` lists (clear errors otherwise)."""
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories.")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(f"{path}: missing (or not a list): {', '.join(repr(k) for k in missing)}; a COCO instances "
                        "file needs 'images', 'annotations' and 'categories'.")  # fmt: skip
    return data


def _duplicates(records: list[dict], what: str) -> list[str]:
    counts = Counter(r.get("id") for r in records)
    return [f"{what} id {i} appears {n} times" for i, n in counts.items() if n > 1]


def _schema(data: dict) -> list[str]:
    """Records that are not dicts with the keys and types everything after relies on."""
    number = (int, float)
    need = {
        "image": ("images", {"id": int, "file_name": str, "width": int, "height": int}),
        "annotation": ("annotations", {"id": int, "image_id": int, "category_id": int}),
        "category": ("categories", {"id": int, "name": str}),
    }
    problems = []
    for what, (key, fields) in need.items():
        for position, record in enumerate(data[key]):
            if not isinstance(record, dict):
                problems.append(f"{key}[{position}] is not an object")
                continue
            for field_name, kind in fields.items():
                value = record.get(field_name)
                if not isinstance(value, kind) or isinstance(value, bool):
                    problems.append(f"{what} {record.get('origin') or record.get('id', f'at {key}[{position}]')}: "
                                    f"'{field_name}' is {value!r}, expected {kind.__name__}")  # fmt: skip
            for field_name in ("area", "iscrowd"):
                if field_name in record and not isinstance(record[field_name], number):
                    problems.append(f"{what} id {record.get('id')}: '{field_name}' is {record[field_name]!r}")
    for image in data["images"]:
        if isinstance(image, dict) and isinstance(image.get("width"), int) and isinstance(image.get("height"), int):
            if image["width"] <= 0 or image["height"] <= 0:
                problems.append(f"image id {image.get('id')}: size {image['width']}x{image['height']}")
    return problems


def _check_segmentation(seg: object, height: int, width: int, record: str) -> str | None:
    """What is wrong with an annotation's segmentation (None when usable): polygons of >= 3 points with
    coordinates near the image, RLE of the image's size that pycocotools decodes."""
    if isinstance(seg, list):
        if not seg:
            return f"{record}: empty segmentation"
        for polygon in seg:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                points = len(polygon) / 2 if isinstance(polygon, list) else 0
                return f"{record}: polygon with {points:g} points (needs >= 3; pycocotools reads 2 points as a box)"
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon):
                return f"{record}: polygon with a non-finite coordinate"
            # pycocotools rasterises whatever it gets: far-away coordinates exhaust memory or crash it.
            if not all(-width <= x <= 2 * width and -height <= y <= 2 * height
                       for x, y in zip(polygon[0::2], polygon[1::2], strict=True)):  # fmt: skip
                return f"{record}: polygon reaches far outside its {width}x{height} image"
        return None
    if isinstance(seg, dict):
        size = seg.get("size")
        if list(size or []) != [height, width]:
            return f"{record}: mask of size {size} but its image is [{height}, {width}] (height, width)"
        try:
            rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg.get("counts"), list) else seg
            mask_utils.decode(rle)  # RLE is for the few crowd regions in most files: decoding them all is cheap
        except (KeyError, TypeError, ValueError) as err:
            return f"{record}: RLE mask does not decode ({err})"
        return None
    return f"{record}: segmentation is neither polygons nor RLE"


# How far (fraction of the image side, at least 2 px) a box may reach past the image and still be clipped.
CLIP_TOLERANCE = 0.05


def _far_outside(box: list[float], width: int, height: int) -> bool:
    """Whether a box reaches past the image by more than a small tolerance (wrong units, not a rounding slip)."""
    tx, ty = max(2.0, CLIP_TOLERANCE * width), max(2.0, CLIP_TOLERANCE * height)
    return box[0] < -tx or box[1] < -ty or box[0] + box[2] > width + tx or box[1] + box[3] > height + ty


def check_coco(
    images_dir: str | Path,
    annotations: str | Path | dict,
    decode: bool = True,
    needs_masks: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[dict, Report]:
    """Read and check a COCO instances file (or a dataset dict converted from another format, named by its
    `source` key) and its images -> (repaired in-memory dataset, report).

    Raises DataError (file, records, what is wrong) for: malformed JSON or missing keys, an empty dataset,
    duplicate image/annotation/category ids (pycocotools' AP would be silently wrong), annotations pointing at a
    missing image or unknown category, records missing keys or of the wrong type, non-finite, negative-size or
    far-outside boxes, polygons under 3 points, masks whose size is not their image's or that do not decode,
    annotations without a mask when `needs_masks` (semantic and instance targets), annotations that all had to
    be dropped, and (with `decode`) image files that are missing, do not decode, or whose size differs from the
    file's. Repairs and counts: boxes reaching slightly past the image are clipped, boxes with no area left are
    dropped, missing `area` (from the mask, else the box) and `iscrowd` (0) are filled. Records converted from
    other formats name their origin (file and line or object) in messages.

    With `cache_dir`, images that passed before, unchanged by their fingerprint (`pipeline.data.check_cache`), are
    not decoded again.
    """
    images_dir = Path(images_dir)
    if isinstance(annotations, dict):
        data, path = annotations, Path(annotations["source"])
    else:
        path = Path(annotations)
        data = read_json(path)
    report = Report(name=str(path))
    for warning in data.get("warnings", []):
        report.repaired(*warning)
    if not data["images"]:
        raise DataError(f"{path}: the dataset has no images.")
    _fail(path, _schema(data), "malformed records")
    _fail(path, _duplicates(data["images"], "image") + _duplicates(data["categories"], "category")
          + _duplicates(data["annotations"], "annotation"), "duplicate ids")  # fmt: skip
    images = {img["id"]: img for img in data["images"]}
    categories = {cat["id"]: cat.get("name", str(cat["id"])) for cat in data["categories"]}

    kept, problems = [], []
    for ann in data["annotations"]:
        record = ann.get("origin") or f"annotation id {ann.get('id')}"
        image = images.get(ann.get("image_id"))
        if image is None:
            problems.append(f"{record} points at image id {ann.get('image_id')}, which is not in 'images'")
            continue
        if ann.get("category_id") not in categories:
            problems.append(f"{record} has category id {ann.get('category_id')}, which is not in 'categories'")
            continue
        width, height = image["width"], image["height"]
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            problems.append(f"{record}: bbox {box} is not [x, y, w, h]")
            continue
        if not all(math.isfinite(v) for v in box):
            problems.append(f"{record}: bbox {box} is not finite")
            continue
        if box[2] < 0 or box[3] < 0:
            problems.append(f"{record}: bbox {box} has a negative width or height")
            continue
        if _far_outside(box, width, height):
            problems.append(f"{record}: bbox {box} reaches far outside its {width}x{height} image (wrong units?)")
            continue
        if needs_masks and not ann.get("segmentation"):
            problems.append(f"{record} has no segmentation, but the model needs masks (boxes only: model=yolo)")
            continue
        if "segmentation" in ann:
            wrong = _check_segmentation(ann["segmentation"], height, width, record)
            if wrong:
                problems.append(wrong)
                continue
        ann = dict(ann)
        x1, y1 = max(box[0], 0.0), max(box[1], 0.0)
        x2, y2 = min(box[0] + box[2], width), min(box[1] + box[3], height)
        if x2 <= x1 or y2 <= y1:
            report.repaired("degenerate box dropped (no area inside the image)", f"{record} bbox {box}")
            continue
        if box[0] < 0 or box[1] < 0 or box[0] + box[2] > width or box[1] + box[3] > height:
            report.repaired("box clipped to the image", f"{record} bbox {box}")
            ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        if "iscrowd" not in ann:
            report.repaired("iscrowd missing, set to 0", record)
            ann["iscrowd"] = 0
        if "area" not in ann:
            report.repaired("area missing, filled from the mask or box", record)
            ann["area"] = area_of(ann, height, width)
        kept.append(ann)
        if ann["iscrowd"]:
            report.crowd += 1
        else:
            report.instances[categories[ann["category_id"]]] += 1
            report.box_sizes.append((ann["bbox"][2], ann["bbox"][3]))
    _fail(path, problems, "unusable annotations")
    if data["annotations"] and not kept:
        raise DataError(
            f"{path}: all {len(data['annotations'])} annotations had to be dropped (no area inside "
            "their image): check the box format (COCO boxes are [x, y, width, height] pixels)."
        )
    report.images = len(images)
    if decode:
        check_images_once(lambda: _check_images(path, images_dir, data["images"]), images_dir, data["images"],
                          path, cache_dir)  # fmt: skip
    return {**data, "annotations": kept}, report


def area_of(ann: dict, height: int, width: int) -> float:
    """The area COCO would store: the mask's pixel count, or the box's area without a mask."""
    seg = ann.get("segmentation")
    if not seg:
        return float(ann["bbox"][2] * ann["bbox"][3])
    if isinstance(seg, list):  # polygons
        rles = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rles = [mask_utils.frPyObjects(seg, height, width)]
    else:  # compressed RLE
        rles = [seg]
    return float(mask_utils.area(mask_utils.merge(rles)))


def _check_images(path: Path, images_dir: Path, images: list[dict]) -> None:
    """Every image file exists, decodes completely, and has the size the annotation file says (after EXIF)."""
    problems = []
    for image in track(images, description=f"Checking {len(images)} images", transient=True,
                       disable=len(images) < 200):  # fmt: skip
        file = images_dir / image["file_name"]
        if not file.is_file():
            problems.append(f"image id {image['id']}: file {file} does not exist")
            continue
        try:
            width, height = image_size(file, decode=True)
        except DataError as err:
            problems.append(f"image id {image['id']}: {err}")
            continue
        if (width, height) != (image["width"], image["height"]):
            problems.append(f"image id {image['id']}: {file} is {width}x{height} but the file says "
                            f"{image['width']}x{image['height']}")  # fmt: skip
    _fail(path, problems, "unusable images")


def image_size(path: Path, decode: bool = False) -> tuple[int, int]:
    """(width, height) of an image as it is read (after EXIF rotation); `decode` reads every pixel, so truncated
    files fail too (the header alone is enough for a size)."""
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
            width, height = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
                width, height = height, width
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path} does not decode ({err})") from None
    return width, height
