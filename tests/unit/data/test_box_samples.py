"""Box samples: letterboxed boxes that match the annotations, untouched ground truth, bbox-safe augmentation."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from pipeline.data.coco import CocoBoxSource
from pipeline.data.datamodule import BoxSamples, ShapesDataModule
from pipeline.data.shapes import ShapesSpec, ensure_shapes
from pipeline.data.transforms import apply_boxes, compose
from pipeline.errors import ConfigError
from pipeline.ops.boxes import letterbox_scale

SPEC = ShapesSpec(num_train=6, num_val=3, image_size=80, seed=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> CocoBoxSource:
    root = ensure_shapes(tmp_path_factory.mktemp("shapes") / "shapes", SPEC)
    return CocoBoxSource(root / "images" / "train", root / "annotations" / "instances_train.json")


def test_samples_carry_letterboxed_boxes_and_the_untouched_annotations(source: CocoBoxSource) -> None:
    samples = BoxSamples(source, compose([], bbox_params={}), size=64)
    for index in range(len(samples)):
        sample = samples[(index, 64)]
        _, ann = source.load(index)
        assert sample["image"].shape == (3, 64, 64) and sample["image_id"] == ann["image_id"]
        assert sample["scale"] == letterbox_scale(80, 80, 64) and sample["orig_size"] == (80, 80)
        xyxy = torch.from_numpy(np.concatenate([ann["boxes"][:, :2], ann["boxes"][:, :2] + ann["boxes"][:, 2:]], 1))
        torch.testing.assert_close(sample["boxes"], xyxy * 0.8)
        assert sample["labels"].tolist() == ann["labels"].tolist() and set(ann["labels"].tolist()) <= {1, 2, 3}
        assert torch.equal(sample["gt"]["boxes"], torch.from_numpy(ann["boxes"]))
    batch = BoxSamples.collate([samples[0], samples[1]])
    assert batch["image"].shape == (2, 3, 64, 64) and len(batch["boxes"]) == 2


def test_a_crop_clips_boxes_and_drops_slivers_and_mostly_hidden_boxes() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[10.0, 10.0, 40.0, 40.0], [45.0, 10.0, 80.0, 40.0], [58.0, 60.0, 95.0, 90.0]])
    crop = compose([A.Crop(x_min=0, y_min=0, x_max=60, y_max=100)], bbox_params={"min_visibility": 0.3, "min_area": 16})
    out = apply_boxes(crop, image, boxes, labels=np.array([1, 2, 3]), iscrowd=np.array([0, 0, 1]))
    # box 1 is inside; box 2 keeps 15 of 35 px of width (43% visible): clipped; box 3 keeps a 2-px sliver: dropped.
    assert out["boxes"].tolist() == [[10, 10, 40, 40], [45, 10, 60, 40]]
    assert out["labels"].tolist() == [1, 2] and out["iscrowd"].tolist() == [0, 0]


def test_the_datamodule_gives_box_batches_and_anchor_sizes(tmp_path) -> None:
    dm = ShapesDataModule(
        root=str(tmp_path / "shapes"), spec={"num_train": 4, "num_val": 2, "image_size": 64}, num_classes=4,
        class_names=["background", "circle", "square", "triangle"], batch_size=2, num_workers=0,
        train_sizes=[64, 96], val_size=64, bbox_params={"min_visibility": 0.3, "min_area": 16}, targets="boxes",
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[0] == 2 and batch["image"].shape[-1] in (64, 96)
    assert all(b.shape[1:] == (4,) and (b >= 0).all() and (b <= batch["image"].shape[-1]).all() for b in batch["boxes"])
    sizes = dm.train_box_sizes(128)
    annotations = sum(len(dm.train_set.source.load(i)[1]["boxes"]) for i in range(4))
    assert sizes.shape == (annotations, 2) and (sizes > 0).all()
    assert dm.category_ids == [1, 2, 3]
    with pytest.raises(ConfigError, match="HorizontalFlip, which move"):
        ShapesDataModule(root=str(tmp_path), spec={}, num_classes=4, class_names=["a"] * 4, targets="boxes",
                         val_transforms=[A.ColorJitter(), A.HorizontalFlip()])  # fmt: skip
    with pytest.raises(ValueError, match="targets='points'"):
        ShapesDataModule(root=str(tmp_path), spec={}, num_classes=4, class_names=["a"] * 4, targets="points")
