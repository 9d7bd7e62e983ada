"""Deep grey images map to 8 bits by their type's range: one stored value reads the same in every image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.coco import CocoSource, read_rgb


def _write_16bit_png(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"  # a real 16-bit grey PNG


def test_the_same_16_bit_value_reads_the_same_in_images_of_different_maxima(tmp_path: Path) -> None:
    dim = np.array([[0, 1000, 257 * 7, 1000]], dtype=np.uint16)  # maximum 1799
    bright = np.array([[1000, 65535, 257 * 7, 60000]], dtype=np.uint16)  # maximum 65535
    _write_16bit_png(tmp_path / "dim.png", dim)
    _write_16bit_png(tmp_path / "bright.png", bright)
    categories = [{"id": 1, "name": "thing"}]
    images = [
        {"id": i + 1, "file_name": name, "width": 4, "height": 1} for i, name in enumerate(("dim.png", "bright.png"))
    ]
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 1.0, 1.0], "area": 1.0, "iscrowd": 0}
    source = CocoSource(tmp_path, {"images": images, "annotations": [annotation], "categories": categories,
                                   "source": str(tmp_path / "instances.json")})  # fmt: skip
    dim8, bright8 = (source.read(i)[0] for i in range(2))
    assert dim8.shape == (1, 4, 3) and dim8.dtype == np.uint8 and (dim8 == dim8[..., :1]).all()  # grey as RGB
    assert dim8[0, 1, 0] == bright8[0, 0, 0] == 4  # 1000 in both: round(1000 * 255 / 65535) = round(3.89)
    assert dim8[0, 2, 0] == bright8[0, 2, 0] == 7  # an 8-bit value stored as 16 bits (v * 257) comes back exact
    assert dim8[0, 0, 0] == 0 and bright8[0, 1, 0] == 255 and bright8[0, 3, 0] == 233  # 60000 / 257 = 233.46
    # per-image maxima (the old behaviour) would give 1000 -> 141 in the dim image and 4 in the bright one


def test_32_bit_integer_and_float_images_use_fixed_ranges_too(tmp_path: Path) -> None:
    Image.fromarray(np.array([[-5, 1000, 65535, 70000]], dtype=np.int32), mode="I").save(tmp_path / "int.tif")
    Image.fromarray(np.array([[-0.5, 0.25, 1.0, 2.0]], dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    assert read_rgb(tmp_path / "int.tif")[0, :, 0].tolist() == [0, 4, 255, 255]  # the 16-bit range, clipped
    assert read_rgb(tmp_path / "float.tif")[0, :, 0].tolist() == [0, 64, 255, 255]  # 0..1, clipped (63.75 -> 64)


def test_16_bit_masks_keep_their_values_as_labels_and_their_images_use_the_range(tmp_path: Path) -> None:
    from pipeline.data.mask_folders import MaskFolderSource

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _write_16bit_png(tmp_path / "images" / "a.png", np.array([[0, 1000], [30000, 65535]]))
    Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint16)).save(tmp_path / "masks" / "a.png")
    image, labels = MaskFolderSource(tmp_path / "images", tmp_path / "masks", num_classes=3).load(0)
    assert image[..., 0].tolist() == [[0, 4], [117, 255]]  # 30000 / 257 = 116.7
    assert labels.tolist() == [[0, 1], [2, 255]] and labels.dtype == np.uint8


def test_16_bit_voc_index_pngs_keep_their_values_and_refuse_values_past_255(tmp_path: Path) -> None:
    from pipeline.data.checks import DataError
    from pipeline.data.formats import voc_instance_dataset

    for folder in ("ImageSets/Segmentation", "JPEGImages", "SegmentationObject", "SegmentationClass"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "JPEGImages" / "a.jpg")
    objects = np.zeros((4, 4), np.uint16)
    objects[:2, :2], objects[3, 3] = 1, 255  # instance 1, a void pixel
    _write_16bit_png(tmp_path / "SegmentationObject" / "a.png", objects)
    _write_16bit_png(tmp_path / "SegmentationClass" / "a.png", np.where(objects == 1, 2, objects))
    _, data = voc_instance_dataset(tmp_path, "train", ["background", "cat", "dog"])
    (annotation,) = data["annotations"]
    assert annotation["category_id"] == 2 and annotation["area"] == 4.0 and annotation["bbox"] == [0.0, 0.0, 2.0, 2.0]
    objects[0, 0] = 300  # would be clipped to 255 (void) by an 8-bit conversion
    _write_16bit_png(tmp_path / "SegmentationObject" / "a.png", objects)
    with pytest.raises(DataError, match=r"SegmentationObject/a\.png: index values 0\.\.300 do not fit 0\.\.255"):
        voc_instance_dataset(tmp_path, "train", ["background", "cat", "dog"])
