"""Broken COCO inputs: each gets one clear error naming the file and the record, before any training; recoverable
problems are repaired and counted; nothing on disk changes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.checks import DataError, check_coco
from tests.helpers import run_main


def _write(tmp_path: Path, edit=None, images: int = 2) -> tuple[Path, Path]:
    """A valid 2-image dataset (64x48 PNGs, two annotations each) after `edit(data)`; returns (images dir, json)."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    data = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}]}
    for i in range(1, images + 1):
        Image.fromarray(np.full((48, 64, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        data["images"].append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
        data["annotations"] += [
            {"id": 10 * i, "image_id": i, "category_id": 3, "bbox": [4, 4, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]]},
            {"id": 10 * i + 1, "image_id": i, "category_id": 9, "bbox": [30, 20, 16, 16], "area": 256, "iscrowd": 0},
        ]  # fmt: skip
    if edit is not None:
        edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return folder, path


def _ann(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


BROKEN = {
    "duplicate annotation ids": (lambda d: _ann(d, 21).update(id=10), ["annotation id 10 appears 2 times"]),
    "missing image id": (lambda d: _ann(d, 11).update(image_id=7), ["annotation id 11", "image id 7"]),
    "unknown category": (lambda d: _ann(d, 11).update(category_id=4), ["annotation id 11", "category id 4"]),
    "negative box": (lambda d: _ann(d, 21).update(bbox=[30, 20, -5, 16]), ["annotation id 21", "negative width"]),
    "NaN box": (lambda d: _ann(d, 21).update(bbox=[30, math.nan, 16, 16]), ["annotation id 21", "not finite"]),
    "two-point polygon": (lambda d: _ann(d, 10).update(segmentation=[[4, 4, 24, 14]]),
                          ["annotation id 10", "polygon with 2 points"]),
    "mask of the wrong size": (lambda d: _ann(d, 10).update(segmentation={"size": [32, 32], "counts": "0`0"}),
                               ["annotation id 10", "mask of size [32, 32]", "[48, 64]"]),
    "duplicate image ids": (lambda d: d["images"][1].update(id=1), ["image id 1 appears 2 times"]),
    "image size differs": (lambda d: d["images"][0].update(width=65), ["image id 1", "64x48", "65x48"]),
    "missing image file": (lambda d: d["images"][1].update(file_name="gone.png"), ["image id 2", "gone.png",
                                                                                   "does not exist"]),
    "empty dataset": (lambda d: d.update(images=[], annotations=[]), ["no images"]),
    "box far outside": (lambda d: _ann(d, 21).update(bbox=[320, 240, 50, 60]),
                        ["annotation id 21", "reaches far outside its 64x48 image"]),
    "every box dropped": (lambda d: [a.update(bbox=[10, 10, 0, 5]) for a in d["annotations"]],
                          ["all 4 annotations had to be dropped"]),
    "image without width": (lambda d: d["images"][0].pop("width"), ["image 1: 'width' is None, expected int"]),
    "annotation not an object": (lambda d: d["annotations"].append("oops"), ["annotations[4] is not an object"]),
    "RLE that does not decode": (lambda d: _ann(d, 10).update(segmentation={"size": [48, 64], "counts": [10000]}),
                                 ["annotation id 10: RLE mask does not decode"]),
    "polygon far away": (lambda d: _ann(d, 10).update(segmentation=[[0, 0, 1e9, 0, 5, 5]]),
                         ["annotation id 10: polygon reaches far outside"]),
}  # fmt: skip


def test_models_that_need_masks_refuse_annotations_without_one(tmp_path: Path) -> None:
    images, path = _write(tmp_path)  # annotation 11 and 21 have boxes only
    check_coco(images, path)  # fine for a detector
    with pytest.raises(DataError, match="annotation id 11 has no segmentation, but the model needs masks"):
        check_coco(images, path, needs_masks=True)


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_broken_input_fails_with_the_file_and_the_record(tmp_path: Path, case: str) -> None:
    edit, expected = BROKEN[case]
    images, path = _write(tmp_path, edit)
    before = path.read_bytes()
    with pytest.raises(DataError) as err:
        check_coco(images, path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    for part in expected:
        assert part in message, (part, message)
    assert path.read_bytes() == before  # nothing on disk is modified


def test_malformed_json_and_missing_keys(tmp_path: Path) -> None:
    images, path = _write(tmp_path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(DataError, match=r"instances.json: not valid JSON \(.* at line 1, column \d+\)"):
        check_coco(images, path)
    path.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DataError, match="missing \\(or not a list\\): 'images'"):
        check_coco(images, path)


def test_corrupt_and_truncated_image_files(tmp_path: Path) -> None:
    images, path = _write(tmp_path)
    (images / "1.png").write_bytes(b"not an image at all")
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    good.save(images / "2.png")
    (images / "2.png").write_bytes((images / "2.png").read_bytes()[:-300])  # truncated
    with pytest.raises(DataError) as err:
        check_coco(images, path)
    assert "image id 1" in str(err.value) and "image id 2" in str(err.value) and "does not decode" in str(err.value)


def test_recoverable_problems_are_repaired_and_counted(tmp_path: Path) -> None:
    def edit(data: dict) -> None:
        _ann(data, 10).update(bbox=[-1.0, 4, 20, 10])  # a pixel outside: clipped
        _ann(data, 11).update(bbox=[30, 20, 0, 16])  # zero width: dropped
        _ann(data, 20).update(bbox=[60, 40, 6, 10])  # reaches 2 px past the right/bottom edges: clipped
        del _ann(data, 21)["area"], _ann(data, 21)["iscrowd"]
        del _ann(data, 20)["area"]

    images, path = _write(tmp_path, edit)
    before = path.read_bytes()
    data, report = check_coco(images, path)
    fixed = {a["id"]: a for a in data["annotations"]}
    assert sorted(fixed) == [10, 20, 21]
    assert fixed[10]["bbox"] == [0.0, 4, 19.0, 10] and fixed[20]["bbox"] == [60, 40, 4, 8]
    assert fixed[21]["iscrowd"] == 0 and fixed[21]["area"] == 256  # no mask: the box area
    assert fixed[20]["area"] == 200  # from its polygon (20 x 10 pixels), not the clipped box
    assert report.repairs == {
        "box clipped to the image": 2,
        "degenerate box dropped (no area inside the image)": 1,
        "iscrowd missing, set to 0": 1,
        "area missing, filled from the mask or box": 2,
    }
    assert "annotation id 11" in report.examples["degenerate box dropped (no area inside the image)"][0]
    assert report.images == 2 and report.instances == {"cat": 2, "dog": 1}
    assert path.read_bytes() == before


def test_training_on_a_broken_file_fails_before_any_step_without_a_traceback(tmp_path: Path) -> None:
    images, path = _write(tmp_path, lambda d: _ann(d, 21).update(category_id=4))
    files = [f"data.train.images={images}", f"data.train.annotations={path}", f"data.val.images={images}",
             f"data.val.annotations={path}"]  # fmt: skip
    proc = run_main("train", "model=yolo", "data=coco", *files, "data.train_sizes=[64]", "data.val_size=64",
                    "data.num_workers=0", "trainer.accelerator=cpu", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {path}: unusable annotations: annotation id 21 has category id 4" in proc.stderr
    assert not list(tmp_path.glob("outputs/train/runs/*/checkpoints/*.ckpt"))
    # A mistyped annotation path (read for the class names while the config resolves): the same one-liner.
    typo = [f.replace("instances.json", "instance.json") for f in files]
    proc = run_main("train", "model=yolo", "data=coco", *typo, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'instance.json'}: no such annotation file." in proc.stderr


def _yolo(tmp_path: Path, label: str) -> Path:
    """A one-image ultralytics dataset whose label file holds `label`; returns its yaml."""
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "labels" / "train" / "a.txt").write_text(label)
    yaml_file = tmp_path / "data.yaml"
    yaml_file.write_text("path: .\ntrain: images/train\nval: images/train\nnames: {0: cat, 1: dog}\n")
    return yaml_file


@pytest.mark.parametrize(
    ("label", "message"),
    [("0 0.5 0.5 0.2\n", "a.txt:1: expected 'cls cx cy w h' or 'cls x1 y1 x2 y2 x3 y3 …', got 4 values"),
     ("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n", "a.txt:2: class 7 is not one of the yaml's 2 classes"),
     ("0 0.5 x 0.2 0.2\n", "a.txt:1: not numbers"),
     ("0 0.1 0.1 inf 0.2 0.5 0.5\n", "a.txt:1: coordinates must be finite and normalised"),
     ("0 320 240 50 60\n", "a.txt:1: coordinates must be finite and normalised"),  # pixels, not normalised
     ("1 0.1 0.1 0.5 0.5 0.9\n", "a.txt:1: expected")],  # an odd number of polygon coordinates
)  # fmt: skip
def test_broken_yolo_labels_name_the_file_and_line(tmp_path: Path, label: str, message: str) -> None:
    from pipeline.data.formats import yolo_dataset

    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        yolo_dataset(_yolo(tmp_path, label), "train")


def test_box_errors_in_converted_formats_name_the_label_line(tmp_path: Path) -> None:
    from pipeline.data.formats import yolo_dataset

    base, data = yolo_dataset(_yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 -0.2 0.2\n"), "train")
    with pytest.raises(DataError, match=r"a.txt:2: bbox .* has a negative width"):
        check_coco(base, data)


def test_yolo_names_mapping_is_sorted_by_class_id(tmp_path: Path) -> None:
    from pipeline.data.formats import yolo_class_names

    yaml_file = tmp_path / "data.yaml"
    yaml_file.write_text("names: {" + ", ".join(f"'{i}': c{i}" for i in range(12)) + "}\n")
    assert yolo_class_names(str(yaml_file)) == ["background", *(f"c{i}" for i in range(12))]
    yaml_file.write_text("names: cat\n")
    with pytest.raises(DataError, match="'names' must be a list or an"):
        yolo_class_names(str(yaml_file))


def test_yolo_boxes_and_polygons_become_pixels(tmp_path: Path) -> None:
    from pipeline.data.formats import yolo_dataset

    base, data = yolo_dataset(_yolo(tmp_path, "0 0.5 0.5 0.25 0.5\n1 0.25 0.25 0.75 0.25 0.5 0.75\n"), "train")
    box, polygon = data["annotations"]
    assert base == tmp_path and data["images"][0] == {"id": 1, "file_name": "images/train/a.png", "width": 64,
                                                      "height": 48}  # fmt: skip
    assert box["bbox"] == [24.0, 12.0, 16.0, 24.0] and box["category_id"] == 0 and box["area"] == 384.0
    assert polygon["segmentation"] == [[16.0, 12.0, 48.0, 12.0, 32.0, 36.0]] and polygon["bbox"] == [16, 12, 32, 24]
    assert data["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]


def _mask_folders(tmp_path: Path, mask_size: tuple[int, int] = (48, 64), mode: str = "L", value: int = 255) -> dict:
    """Two images with 0/`value` masks (of `mask_size`, PIL `mode`); returns the folders."""
    images, masks = tmp_path / "img", tmp_path / "lbl"
    images.mkdir()
    masks.mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(images / f"{stem}.jpg")
        mask = np.zeros(mask_size, np.uint8)
        mask[10:20, 10:30] = value
        Image.fromarray(mask).convert(mode).save(masks / f"{stem}.png")
    return {"images": images, "masks": masks}


@pytest.mark.parametrize(
    ("kwargs", "values", "message"),
    [({"mask_size": (48, 60)}, {0: 0, 255: 1}, "a.png: mask is 60x48 but its image a.jpg is 64x48"),
     ({"mode": "RGB"}, {0: 0, 255: 1}, "a.png: mask has mode RGB"),
     ({}, None, r"a.png: labels \[255\] are neither < data.num_classes=2"),
     ({"value": 7}, {0: 0, 255: 1}, r"a.png: pixel values \[7\] are not in data.values")],
    ids=["wrong size", "RGB mask", "0/255 without values", "unmapped value"],
)  # fmt: skip
def test_broken_mask_folders_name_the_file(tmp_path: Path, kwargs: dict, values: dict | None, message: str) -> None:
    from pipeline.data.mask_folders import MaskFolderSource

    folders = _mask_folders(tmp_path, **kwargs)
    ignore = 254 if values is None else 255  # so that 255 is not void in the "no values" case
    with pytest.raises(DataError, match=message):
        MaskFolderSource(folders["images"], folders["masks"], num_classes=2, ignore_index=ignore, values=values)


def test_mask_folders_need_a_mask_per_image_and_map_values(tmp_path: Path) -> None:
    from pipeline.data.mask_folders import MaskFolderSource

    folders = _mask_folders(tmp_path)
    source = MaskFolderSource(folders["images"], folders["masks"], num_classes=2, values={0: 0, 255: 1})
    image, mask = source.load(0)
    assert image.shape == (48, 64, 3) and mask.shape == (48, 64) and int(mask.sum()) == 200  # 10 x 20 ones
    (folders["masks"] / "b.png").unlink()
    with pytest.raises(DataError, match=r"lbl: no mask for 1 image\(s\) of .*img, e.g. b.jpg"):
        MaskFolderSource(folders["images"], folders["masks"], num_classes=2, values={0: 0, 255: 1})


def test_voc_xml_that_is_not_well_formed_names_the_file(tmp_path: Path) -> None:
    from pipeline.data.formats import voc_box_dataset

    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text("<annotation><object><name>cat</name></annotation>")
    with pytest.raises(DataError, match=r"a.xml: not well-formed XML \(mismatched tag: line 1, column \d+\)"):
        voc_box_dataset(tmp_path, "train", ["background", "cat"])
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height></size>"
        "<object><name>zebra</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox>"
        "</object></annotation>"
    )
    with pytest.raises(DataError, match=r"a.xml: object 1 is a 'zebra', not one of data.class_names \['cat'\]"):
        voc_box_dataset(tmp_path, "train", ["background", "cat"])


def test_voc_boxes_are_one_based_inclusive_pixels_and_difficult_is_ignored(tmp_path: Path) -> None:
    from pipeline.data.formats import voc_box_dataset

    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "JPEGImages" / "a.jpg")
    obj = "<object><name>cat</name><difficult>{}</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>" \
          "<ymax>20</ymax></bndbox></object>"  # fmt: skip
    (tmp_path / "Annotations" / "a.xml").write_text(
        f"<annotation><filename>a.jpg</filename>{obj.format(0)}{obj.format(1)}</annotation>"
    )
    images, data = voc_box_dataset(tmp_path, "train", ["background", "cat"])
    assert images == tmp_path / "JPEGImages" and data["images"][0]["width"] == 64
    first, difficult = data["annotations"]
    assert first["bbox"] == [0.0, 1.0, 10.0, 19.0] and first["iscrowd"] == 0 and difficult["iscrowd"] == 1


def test_grayscale_rgba_16_bit_and_exif_rotated_images_load_upright_as_rgb(tmp_path: Path) -> None:
    from pipeline.data.checks import image_size
    from pipeline.data.coco import read_rgb

    grey = np.tile(np.arange(64, dtype=np.uint8), (48, 1))
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 1000).save(tmp_path / "deep.png")
    raw = np.zeros((48, 64, 3), np.uint8)
    raw[:, :8] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(raw).save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    for name in ("grey.png", "rgba.png", "deep.png"):
        image = read_rgb(tmp_path / name)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8, name
    assert np.array_equal(read_rgb(tmp_path / "grey.png")[..., 1], grey)
    assert tuple(read_rgb(tmp_path / "rgba.png")[0, 0]) == (200, 0, 0)
    deep = read_rgb(tmp_path / "deep.png")[..., 0].astype(int)
    stored = grey[0].astype(np.uint16) * 1000  # what the 16-bit PNG holds: scaled by the type's range, 65535 -> 255
    assert np.array_equal(deep[0], np.round(stored / 257).astype(int)) and (np.diff(deep[0]) >= 0).all()
    rotated = read_rgb(tmp_path / "rotated.jpg")
    assert rotated.shape == (64, 48, 3)  # displayed upright: taller than wide
    assert rotated[:8].mean() > 200 and rotated[-8:].mean() < 30  # the left band is now on top
    rotated_file = tmp_path / "rotated.jpg"
    assert image_size(rotated_file, decode=True) == image_size(rotated_file) == (48, 64)  # what the json must say


def test_class_names_that_do_not_match_the_file_are_refused(tmp_path: Path) -> None:
    from pipeline.data.datamodule import CocoDataModule
    from pipeline.errors import ConfigError

    images, path = _write(tmp_path)
    files = {"images": images, "annotations": path}
    data = CocoDataModule(files, files, num_classes=3, class_names=["background", "dog", "cat"], targets="boxes")
    with pytest.raises(ConfigError, match=r"names its categories \(in id order\) \['cat', 'dog'\]"):
        data.setup("fit")
