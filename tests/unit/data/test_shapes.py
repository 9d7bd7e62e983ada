"""Embedded shapes: a valid, deterministic COCO dataset with exact visible masks, reused or rebuilt safely."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.shapes import CATEGORIES, ShapesSpec, _render, ensure_shapes

SMALL = ShapesSpec(num_train=6, num_val=3, image_size=64, seed=7)
SPLITS = ("train", "val")


def _ann_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def _pixels(root: Path, split: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / "images" / split).glob("*.png"))]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("shapes") / "shapes", SMALL)


def test_writes_a_coco_dataset_that_pycocotools_reads(small: Path):
    assert json.loads((small / "fingerprint.json").read_text())["spec"] == asdict(SMALL)
    for split, count in zip(SPLITS, (SMALL.num_train, SMALL.num_val), strict=True):
        coco = COCO(str(_ann_file(small, split)))
        assert coco.dataset["categories"] == CATEGORIES
        assert [c["name"] for c in CATEGORIES] == ["circle", "square", "triangle"]
        assert sorted(coco.getImgIds()) == list(range(1, count + 1))
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(ann_ids) == len(set(ann_ids)) >= count  # at least one shape per image on average
        for info in coco.dataset["images"]:
            with Image.open(small / "images" / split / info["file_name"]) as img:
                assert img.mode == "RGB" and img.size == (info["width"], info["height"]) == (64, 64)
            assert 1 <= len(coco.getAnnIds(imgIds=info["id"])) <= SMALL.max_shapes
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann)
            assert mask.shape == (64, 64) and mask.sum() == ann["area"] >= 0.02 * 64 * 64
            assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]
            ys, xs = np.nonzero(mask)  # the box is tight around the visible pixels, COCO-style
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["iscrowd"] == 0 and ann["category_id"] in {c["id"] for c in CATEGORIES}


def test_same_spec_gives_identical_files_and_another_seed_other_images(small: Path, tmp_path: Path):
    again = ensure_shapes(tmp_path / "again", SMALL)
    other = ensure_shapes(tmp_path / "other", ShapesSpec(num_train=6, num_val=3, image_size=64, seed=8))
    for split in SPLITS:
        assert _ann_file(again, split).read_bytes() == _ann_file(small, split).read_bytes()
        for a, b in zip(_pixels(again, split), _pixels(small, split), strict=True):
            np.testing.assert_array_equal(a, b)
        assert not any(np.array_equal(a, b) for a, b in zip(_pixels(other, split), _pixels(small, split), strict=True))


def test_visible_masks_are_disjoint_and_painted_in_the_shape_colour(small: Path):
    coco = COCO(str(_ann_file(small, "train")))
    for index, info in enumerate(coco.dataset["images"]):
        image = _pixels(small, "train")[index].astype(np.float64)
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))]
        assert (np.sum(masks, axis=0) <= 1).all()  # occluded pixels belong only to the shape on top
        for mask in masks:  # a flat colour up to the noise, unlike the whole image
            assert image[mask].std(axis=0).max() < 8 < image.reshape(-1, 3).std(axis=0).max()
        # The written files hold exactly what the generator drew, with each shape's own colour under its mask.
        drawn, instances = _render(SMALL, "train", index)
        np.testing.assert_array_equal(drawn, image)
        assert len(instances) == len(masks)
        for instance, mask in zip(instances, masks, strict=True):
            np.testing.assert_array_equal(instance.mask, mask)
            assert np.abs(image[instance.mask].mean(axis=0) - instance.colour).max() < 4


def test_same_spec_is_reused_and_a_changed_spec_regenerates(tmp_path: Path):
    root = tmp_path / "shapes"
    ensure_shapes(root, SMALL)
    files = [root / "fingerprint.json", _ann_file(root, "train"), root / "images" / "train" / "000000.png"]
    before = [f.stat().st_mtime_ns for f in files]
    assert ensure_shapes(root, SMALL) == root
    assert [f.stat().st_mtime_ns for f in files] == before

    ensure_shapes(root, ShapesSpec(num_train=2, num_val=1, image_size=48, seed=7))
    assert len(COCO(str(_ann_file(root, "train"))).getImgIds()) == 2
    assert len(COCO(str(_ann_file(root, "val"))).getImgIds()) == 1
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == ["000000.png", "000001.png"]
    assert Image.open(root / "images" / "val" / "000000.png").size == (48, 48)
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no staging or stale copies left behind


def test_leftovers_of_a_crashed_run_do_not_break_generation(tmp_path: Path):
    crashed = tmp_path / ".shapes-tmp-crashed"
    (crashed / "images" / "train").mkdir(parents=True)
    (crashed / "images" / "train" / "000000.png").write_bytes(b"truncated")
    root = ensure_shapes(tmp_path / "shapes", SMALL)
    assert len(list((root / "images" / "train").glob("*.png"))) == SMALL.num_train
    assert json.loads((root / "fingerprint.json").read_text())["spec"]["seed"] == SMALL.seed


def test_images_without_shapes_are_kept(tmp_path: Path):
    spec = ShapesSpec(num_train=2, num_val=1, image_size=32, min_shapes=0, max_shapes=0)
    root = ensure_shapes(tmp_path / "empty", spec)
    coco = COCO(str(_ann_file(root, "train")))
    assert len(coco.getImgIds()) == 2 and coco.dataset["annotations"] == []


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_shapes(tmp_path / "mine", SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_concurrent_writers_replacing_a_stale_dataset_all_get_the_new_one(tmp_path: Path):
    root = ensure_shapes(tmp_path / "shapes", ShapesSpec(num_train=1, num_val=1, image_size=32))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ensure_shapes(root, SMALL), range(4)))
    assert results == [root] * 4
    assert json.loads((root / "fingerprint.json").read_text())["spec"] == asdict(SMALL)
    assert len(COCO(str(_ann_file(root, "train"))).getImgIds()) == SMALL.num_train
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]
