"""Other annotation formats converted, in memory, to the COCO dataset dict the sources read (nothing is written).

A converted dict carries `source` (what to name in messages) and `warnings` ((kind, record) pairs the data
check counts in its summary); everything else is plain COCO, so one checker and one reader serve every format.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.checks import DataError, area_of, image_size

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


def _label_path(image: Path) -> Path:
    """ultralytics' rule: the last `images` folder in the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    if "images" not in parts:  # no images/ folder: ultralytics looks beside the image
        return image.with_suffix(".txt")
    index = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:index], "labels", *parts[index + 1 :]).with_suffix(".txt")


def _read_yaml(yaml_file: Path) -> tuple[dict, list[str]]:
    """The dataset yaml and its class names in id order (`names` as a list or an {id: name} mapping)."""
    if not yaml_file.is_file():
        raise DataError(f"{yaml_file}: no such dataset yaml.")
    try:
        spec = yaml.safe_load(yaml_file.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{yaml_file}: not valid YAML ({err}).") from None
    names = spec.get("names") if isinstance(spec, dict) else None
    if isinstance(names, dict):
        try:
            names = [names[i] for i in sorted(names, key=int)]
        except (TypeError, ValueError):
            raise DataError(f"{yaml_file}: 'names' keys must be class ids 0, 1, …, got {list(names)[:5]}.") from None
    if not isinstance(names, list) or not names:
        raise DataError(f"{yaml_file}: 'names' must be a list or an {{id: name}} mapping of the classes.")
    return spec, [str(n) for n in names]


def yolo_class_names(yaml_file: str) -> list[str]:
    """`${pipeline.yolo_class_names:<dataset yaml>}`: "background" then the yaml's class names in id order."""
    return ["background", *_read_yaml(Path(yaml_file))[1]]


def _split_images(spec: dict, base: Path, split: str, yaml_file: Path) -> list[Path]:
    """A split's image files: every image under a folder, or the lines of a .txt list, or a list of either."""
    entry = spec.get(split)
    if not entry:
        raise DataError(f"{yaml_file}: no '{split}' split.")
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        path = base / item
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".txt" and path.is_file():
            images += [base / line.strip().removeprefix("./") for line in path.read_text().splitlines() if line.strip()]
        else:
            raise DataError(f"{yaml_file}: '{split}' entry {item!r} is neither a folder nor a .txt list under {base}.")
    return images


def _parse_label(line: str, where: str, num_classes: int, width: int, height: int) -> dict:
    """One label line (`cls cx cy w h` or `cls x1 y1 x2 y2 …`, normalised) as a COCO annotation in pixels."""
    values = line.split()
    try:
        cls, coords = int(values[0]), [float(v) for v in values[1:]]
    except (ValueError, IndexError):
        raise DataError(f"{where}: not numbers: {line!r}.") from None
    if not 0 <= cls < num_classes:
        raise DataError(f"{where}: class {cls} is not one of the yaml's {num_classes} classes.")
    if not all(math.isfinite(v) and -0.5 <= v <= 1.5 for v in coords):
        raise DataError(f"{where}: coordinates must be finite and normalised (0..1 of the image), got {line!r}.")
    if len(coords) == 4:
        cx, cy, w, h = coords[0] * width, coords[1] * height, coords[2] * width, coords[3] * height
        return {"category_id": cls, "bbox": [cx - w / 2, cy - h / 2, w, h], "iscrowd": 0}
    if len(coords) >= 6 and len(coords) % 2 == 0:
        xs, ys = [x * width for x in coords[0::2]], [y * height for y in coords[1::2]]
        polygon = [v for xy in zip(xs, ys, strict=True) for v in xy]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        return {"category_id": cls, "bbox": bbox, "segmentation": [polygon], "iscrowd": 0}
    raise DataError(f"{where}: expected 'cls cx cy w h' or 'cls x1 y1 x2 y2 x3 y3 …', got {len(values)} values.")


def yolo_dataset(yaml_file: str | Path, split: str, root: str | Path | None = None) -> tuple[Path, dict]:
    """A split of an ultralytics dataset as (base folder, COCO dataset dict); file names are relative to the base.

    Images without a label file are background images; label files without an image are reported. Both are
    warnings in the summary, not errors. Malformed label lines fail, naming the file and line.
    """
    yaml_file = Path(yaml_file)
    spec, names = _read_yaml(yaml_file)
    base = Path(root) if root else yaml_file.parent / spec.get("path", ".")
    if not base.is_dir():
        raise DataError(f"{yaml_file}: dataset folder {base} does not exist; set data.root to the dataset's folder "
                        "(it replaces the yaml's 'path').")  # fmt: skip
    images, annotations, warnings = [], [], []
    for image_id, path in enumerate(_split_images(spec, base, split, yaml_file), start=1):
        if not path.is_file():
            raise DataError(f"{yaml_file}: '{split}' lists {path}, which does not exist.")
        width, height = image_size(path)
        images.append({"id": image_id, "file_name": os.path.relpath(path, base), "width": width, "height": height})
        label = _label_path(path)
        if not label.is_file():
            warnings.append(("image without a label file (background image)", str(path.relative_to(base))))
            continue
        for number, line in enumerate(label.read_text().splitlines(), start=1):
            if line.strip():
                ann = _parse_label(line, f"{label}:{number}", len(names), width, height)
                ann["area"] = area_of(ann, height, width)
                ann["origin"] = f"{label}:{number}"
                annotations.append({**ann, "id": len(annotations) + 1, "image_id": image_id})
    listed = {_label_path(base / image["file_name"]) for image in images}
    for folder in sorted({label.parent for label in listed}):
        for label in sorted(folder.glob("*.txt")):
            if label not in listed:
                warnings.append(("label file without an image", str(label.relative_to(base))))
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in enumerate(names)],
        "source": f"{yaml_file} [{split}]",
        "warnings": warnings,
    }
    return base, dataset


VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def voc_ids(root: Path, kind: str, split: str, folder: str, suffix: str) -> list[str]:
    """A VOC split's image ids: ImageSets/<kind>/<split>.txt when it exists, else every file of `folder`."""
    listing = root / "ImageSets" / kind / f"{split}.txt"
    if listing.is_file():
        return [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not (root / folder).is_dir():
        raise DataError(f"{root}: neither {listing} nor a {folder}/ folder: is this a VOCdevkit-style root?")
    return sorted(p.stem for p in (root / folder).glob(f"*{suffix}"))


def voc_box_dataset(root: str | Path, split: str, class_names: list[str]) -> tuple[Path, dict]:
    """A VOC split's Annotations/*.xml boxes as (JPEGImages folder, COCO dataset dict).

    VOC boxes are 1-based inclusive pixels (xmin = 1 is the first column): x = xmin - 1, w = xmax - xmin + 1.
    `difficult` objects become crowd regions (`iscrowd` 1): ignored COCO's way, which differs from VOC's own
    `difficult` rule (see `CocoMAP.summary`, map_50_voc).
    Category ids are 1..K in `class_names` order (class_names[0] is the background).
    """
    root = Path(root)
    ids = voc_ids(root, "Main", split, "Annotations", ".xml")
    category = {name: i for i, name in enumerate(class_names) if i > 0}
    images, annotations = [], []
    for image_id, stem in enumerate(ids, start=1):
        xml = root / "Annotations" / f"{stem}.xml"
        try:
            tree = ElementTree.parse(xml).getroot()
        except ElementTree.ParseError as err:
            raise DataError(f"{xml}: not well-formed XML ({err}).") from None
        except OSError:
            raise DataError(f"{xml}: missing (listed in ImageSets/Main/{split}.txt).") from None
        file_name = tree.findtext("filename") or f"{stem}.jpg"
        if (root / "JPEGImages" / file_name).is_file():
            width, height = image_size(root / "JPEGImages" / file_name)
        else:  # the data check reports the missing image; the XML's size keeps its records readable till then
            width, height = (int(float(tree.findtext(f"size/{k}") or 1)) for k in ("width", "height"))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for number, obj in enumerate(tree.iter("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            if name not in category:
                raise DataError(f"{xml}: object {number} is a {name!r}, not one of data.class_names "
                                f"{class_names[1:]}.")  # fmt: skip
            try:
                x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise DataError(f"{xml}: object {number} ({name}) has no numeric bndbox.") from None
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[name],
                                "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                                "iscrowd": int((obj.findtext("difficult") or "0").strip() == "1"),
                                "origin": f"{xml} object {number}"})  # fmt: skip
            annotations[-1]["area"] = annotations[-1]["bbox"][2] * annotations[-1]["bbox"][3]
    categories = [{"id": i, "name": name} for name, i in category.items()]
    source = str(root / "ImageSets" / "Main" / f"{split}.txt")
    return root / "JPEGImages", {"images": images, "annotations": annotations, "categories": categories,
                                 "source": source}  # fmt: skip


def voc_instance_dataset(root: str | Path, split: str, class_names: list[str]) -> tuple[Path, dict]:
    """A VOC split's SegmentationObject PNGs (instance k = pixel value k; 255 void) as (JPEGImages, COCO dict).

    Each instance's class is the SegmentationClass label under most of its pixels; masks become RLE.
    """
    root = Path(root)
    ids = voc_ids(root, "Segmentation", split, "SegmentationObject", ".png")
    images, annotations = [], []
    for image_id, stem in enumerate(ids, start=1):
        objects = _index_png(root / "SegmentationObject" / f"{stem}.png")
        classes = _index_png(root / "SegmentationClass" / f"{stem}.png")
        if objects.shape != classes.shape:
            raise DataError(f"{root / 'SegmentationObject' / f'{stem}.png'}: {objects.shape} differs from its "
                            f"SegmentationClass mask {classes.shape}.")  # fmt: skip
        file_name = f"{stem}.jpg"
        width, height = image_size(root / "JPEGImages" / file_name)
        if (height, width) != objects.shape:
            raise DataError(f"{root / 'SegmentationObject' / f'{stem}.png'}: mask is {objects.shape[1]}x"
                            f"{objects.shape[0]} but {file_name} is {width}x{height}.")  # fmt: skip
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for value in sorted(set(np.unique(objects).tolist()) - {0, 255}):
            mask = objects == value
            label = int(np.bincount(classes[mask]).argmax())
            if label in (0, 255):
                continue  # background or void under the object: not an instance
            if label >= len(class_names):
                raise DataError(f"{root / 'SegmentationClass' / f'{stem}.png'}: object {value} has class {label}, "
                                f"but data.class_names has {len(class_names)} entries.")  # fmt: skip
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label, "iscrowd": 0,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                "area": float(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "origin": f"{root / 'SegmentationObject' / f'{stem}.png'} object {value}",
            })  # fmt: skip
    categories = [{"id": i, "name": name} for i, name in enumerate(class_names) if i > 0]
    source = str(root / "SegmentationObject")
    return root / "JPEGImages", {"images": images, "annotations": annotations, "categories": categories,
                                 "source": source}  # fmt: skip


def _index_png(path: Path) -> np.ndarray:
    """A palette/index PNG as its indices uint8 [H, W].

    16/32-bit index PNGs keep their values (indices, not intensities: never scaled); one above 255 is an error,
    since PIL's conversion to 8 bits would clip it to 255, VOC's void label.
    """
    if not path.is_file():
        raise DataError(f"{path}: missing.")
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I;16") or img.mode == "I":
                values = np.asarray(img)
                if values.size and (values.min() < 0 or values.max() > 255):
                    raise DataError(f"{path}: index values {values.min()}..{values.max()} do not fit 0..255.")
                return values.astype(np.uint8)
            return np.asarray(img if img.mode in ("P", "L") else img.convert("L"), dtype=np.uint8)
    except OSError as err:
        raise DataError(f"{path}: does not decode ({err}).") from None
