"""Instance samples: one mask per box through augmentation and letterbox, dropped with its box, untouched gt masks."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from torchvision.ops import masks_to_boxes

from pipeline.data.coco import CocoInstanceSource
from pipeline.data.datamodule import BoxSamples, CocoDataModule
from pipeline.data.samplers import SampleKey
from pipeline.data.shapes import ShapesSpec, ensure_shapes
from pipeline.data.transforms import apply_boxes, compose, letterbox

SPEC = ShapesSpec(num_train=8, num_val=4, image_size=64, seed=1)
BBOX_PARAMS = {"min_visibility": 0.3, "min_area": 16}
CLASS_NAMES = ["background", "circle", "square", "triangle"]


def _flip_and_crop() -> list[A.BasicTransform]:
    return [A.HorizontalFlip(p=0.5), A.RandomResizedCrop(size=(64, 64), scale=(0.3, 1.0), p=1.0)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes(tmp_path_factory.mktemp("shapes") / "shapes", SPEC)


@pytest.fixture(scope="module")
def source(root: Path) -> CocoInstanceSource:
    return CocoInstanceSource(root / "images" / "train", root / "annotations" / "instances_train.json")


def _files(root: Path, split: str) -> dict:
    return {"images": root / "images" / split, "annotations": root / "annotations" / f"instances_{split}.json"}


def _mask_box(mask: torch.Tensor) -> torch.Tensor:
    """Tight box of a non-empty mask [H, W] in pixel-edge coordinates (x1, y1, x2 = last column + 1, y2)."""
    return masks_to_boxes(mask[None])[0] + torch.tensor([0.0, 0.0, 1.0, 1.0])


def _check_sample(sample: dict, size: int) -> None:
    masks, boxes, labels = sample["masks"], sample["boxes"], sample["labels"]
    assert masks.dtype == torch.uint8 and masks.shape == (len(boxes), size, size) and len(labels) == len(boxes)
    assert masks.numpy().max(initial=0) <= 1  # binary (uint8 has no negatives)


@pytest.mark.parametrize("size", [64, 96, 160])
def test_masks_match_their_boxes_after_flip_and_letterbox(source: CocoInstanceSource, size: int) -> None:
    # No crop: every box survives and each mask's tight box is its box, up to the rounding of one nearest resize.
    samples = BoxSamples(source, compose([A.HorizontalFlip(p=0.5)], seed=0, bbox_params=BBOX_PARAMS), size)
    flipped = 0
    for _ in range(2):
        for index in range(len(samples)):
            sample = samples[(index, size)]
            _check_sample(sample, size)
            _, ann = source.load(index)
            assert len(sample["boxes"]) == len(ann["boxes"]) > 0
            for mask, box, original in zip(sample["masks"], sample["boxes"], ann["masks"], strict=True):
                assert mask.sum() > 0
                torch.testing.assert_close(_mask_box(mask), box, atol=0.5 if size != 64 else 0.0, rtol=0)
                # Same area as the original up to resampling: the mask is this instance's, scaled by (size / 64)^2.
                assert mask.sum().item() == pytest.approx(original.sum() * (size / 64) ** 2, rel=0.15)
            flipped += not torch.equal(sample["boxes"], _letterboxed(ann["boxes"], size))
    assert flipped > 0  # the flip was exercised


def _letterboxed(xywh: np.ndarray, size: int) -> torch.Tensor:
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return torch.from_numpy(xyxy * (size / SPEC.image_size)).float()


@pytest.mark.parametrize("size", [96, 160])
def test_masks_follow_their_boxes_through_a_random_resized_crop(source: CocoInstanceSource, size: int) -> None:
    samples = BoxSamples(source, compose(_flip_and_crop(), seed=0, bbox_params=BBOX_PARAMS), size)
    # Two nearest-neighbour resizes (the crop's to 64 px, the letterbox's to `size`) each round a mask edge by up to
    # one of their output pixels: the first one's pixel is size / 64 letterboxed pixels.
    tolerance = 1.0 + size / 64
    inside = dropped = 0
    for repeat in range(4):  # each (sample, repeat) its own augmentation seed, as the sampler gives per epoch
        for index in range(len(samples)):
            sample = samples[SampleKey(index, size, seed=repeat * len(samples) + index)]
            _check_sample(sample, size)
            dropped += len(source.load(index)[1]["boxes"]) - len(sample["boxes"])
            for mask, box in zip(sample["masks"], sample["boxes"], strict=True):
                clipped = bool(((box <= 0.5) | (box >= size - 0.5)).any())
                if not clipped:  # untouched by the crop: the whole instance is in view, its mask spans its box
                    inside += 1
                    assert mask.sum() > 0
                    torch.testing.assert_close(_mask_box(mask), box, atol=tolerance, rtol=0)
                elif mask.sum() > 0:  # cut by the crop: the visible part of the mask lies within the clipped box
                    tight = _mask_box(mask)
                    assert (tight[:2] >= box[:2] - tolerance).all() and (tight[2:] <= box[2:] + tolerance).all()
    assert inside > 10 and dropped > 0  # both kinds of box occurred, and the crop removed some boxes


def test_a_crop_drops_masks_together_with_their_boxes() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[10.0, 10.0, 40.0, 40.0], [70.0, 10.0, 95.0, 40.0], [20.0, 50.0, 58.0, 90.0]])
    masks = np.zeros((3, 100, 100), np.uint8)
    masks[0, 10:40, 10:40] = 1  # a square
    masks[1, 10:40, 70:95] = 1  # cropped away
    masks[2, 50:90, 20:58] = 1  # a rectangle with a hole, so masks 0 and 2 cannot be confused
    masks[2, 60:70, 30:40] = 0
    crop = compose([A.Crop(x_min=0, y_min=0, x_max=60, y_max=100)], bbox_params=BBOX_PARAMS)
    out = apply_boxes(crop, image, boxes, masks, labels=np.array([1, 2, 3]), iscrowd=np.array([0, 0, 1]))
    assert out["boxes"].tolist() == [[10, 10, 40, 40], [20, 50, 58, 90]]
    assert out["labels"].tolist() == [1, 3] and out["iscrowd"].tolist() == [0, 1]
    assert out["masks"].shape == (2, 100, 60) and out["masks"].dtype == np.uint8
    np.testing.assert_array_equal(out["masks"], masks[[0, 2], :, :60])
    # Then letterboxed to 80: the survivors stay paired, scaled by 0.8.
    out = apply_boxes(letterbox(80, 0, boxes=True), out["image"], out["boxes"], out["masks"], **{
        k: out[k] for k in ("labels", "iscrowd")
    })  # fmt: skip
    assert out["masks"].shape == (2, 80, 80) and out["labels"].tolist() == [1, 3]
    np.testing.assert_allclose(out["boxes"], [[8, 8, 32, 32], [16, 40, 46.4, 72]], atol=1e-4)
    for mask, box in zip(out["masks"], out["boxes"], strict=True):
        torch.testing.assert_close(_mask_box(torch.from_numpy(mask)), torch.from_numpy(box), atol=1.0, rtol=0)
    assert out["masks"][1, 48:56, 24:32].sum() == 0  # the hole moved with its mask


def test_a_crop_that_removes_every_box_leaves_no_masks() -> None:
    image = np.zeros((50, 50, 3), np.uint8)
    masks = np.zeros((2, 50, 50), np.uint8)
    masks[0, 5:15, 5:15] = masks[1, 30:45, 2:20] = 1
    crop = compose([A.Crop(x_min=25, y_min=0, x_max=50, y_max=50)], bbox_params=BBOX_PARAMS)
    boxes = np.array([[5.0, 5.0, 15.0, 15.0], [2.0, 30.0, 20.0, 45.0]])
    out = apply_boxes(crop, image, boxes, masks, labels=np.array([1, 2]), iscrowd=np.array([0, 0]))
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["masks"].shape == (0, 50, 25)


def test_gt_masks_are_the_annotation_files_masks_in_original_pixels(root: Path, source: CocoInstanceSource) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "instances_train.json"))
    samples = BoxSamples(source, compose(_flip_and_crop(), seed=0, bbox_params=BBOX_PARAMS), 96)
    for index, image_id in enumerate(sorted(coco.getImgIds())):
        sample = samples[(index, 96)]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        expected = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).bool()
        gt = sample["gt"]
        assert sample["image_id"] == image_id and gt["masks"].dtype == torch.bool
        assert gt["masks"].shape == (len(anns), 64, 64) and torch.equal(gt["masks"], expected)
        assert gt["masks"].sum((1, 2)).tolist() == [a["area"] for a in anns]
        assert gt["labels"].tolist() == [a["category_id"] for a in anns]  # category ids 1..3 are labels 1..3


def test_no_boxes_and_no_masks_pass_through_a_pipeline() -> None:
    image = np.full((48, 64, 3), 90, np.uint8)
    pipeline = compose([A.HorizontalFlip(p=1.0), A.RandomResizedCrop(size=(40, 40), p=1.0)], seed=0, bbox_params={})
    empty = np.zeros(0, np.int64)
    out = apply_boxes(pipeline, image, np.zeros((0, 4)), np.zeros((0, 48, 64), np.uint8), labels=empty, iscrowd=empty)
    assert out["image"].shape == (40, 40, 3) and out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 40, 40)
    out = apply_boxes(letterbox(96, 0, boxes=True), out["image"], out["boxes"], out["masks"], **{
        k: out[k] for k in ("labels", "iscrowd")
    })  # fmt: skip
    assert out["masks"].shape == (0, 96, 96) and out["labels"].shape == (0,)


def test_an_image_without_annotations_gives_empty_masks(tmp_path: Path) -> None:
    spec = ShapesSpec(num_train=2, num_val=1, image_size=64, min_shapes=0, max_shapes=0)
    root = ensure_shapes(tmp_path / "empty", spec)
    source = CocoInstanceSource(root / "images" / "train", root / "annotations" / "instances_train.json")
    samples = BoxSamples(source, compose(_flip_and_crop(), seed=0, bbox_params=BBOX_PARAMS), 96)
    for size in (96, 160):
        sample = samples[(0, size)]
        assert sample["image"].shape == (3, size, size) and sample["boxes"].shape == (0, 4)
        assert sample["masks"].shape == (0, size, size) and sample["masks"].dtype == torch.uint8
        assert sample["gt"]["masks"].shape == (0, 64, 64) and sample["gt"]["masks"].dtype == torch.bool
    batch = BoxSamples.collate([samples[(0, 96)], samples[(1, 96)]])
    assert [m.shape for m in batch["masks"]] == [(0, 96, 96), (0, 96, 96)]


def test_the_datamodule_gives_instance_batches(root: Path) -> None:
    dm = CocoDataModule(
        train=_files(root, "train"), val=_files(root, "val"), num_classes=4, class_names=CLASS_NAMES,
        batch_size=2, num_workers=0, train_sizes=[96, 160], size_every=1, val_size=96,
        train_transforms=_flip_and_crop(), bbox_params=BBOX_PARAMS, targets="instances",
    )  # fmt: skip
    dm.setup("fit")
    assert isinstance(dm.train_set.source, CocoInstanceSource)
    sizes = set()
    for batch in dm.train_dataloader():
        size = batch["image"].shape[-1]
        sizes.add(size)
        for masks, boxes, labels in zip(batch["masks"], batch["boxes"], batch["labels"], strict=True):
            assert masks.shape == (len(boxes), size, size) and len(labels) == len(boxes)
        assert all(g["masks"].shape[1:] == (64, 64) for g in batch["gt"])
    assert sizes == {96, 160}
    batches = list(dm.val_dataloader())
    assert sum(len(b["masks"]) for b in batches) == 4
    for batch in batches:
        for masks, boxes, gt in zip(batch["masks"], batch["boxes"], batch["gt"], strict=True):
            # Validation does not move pixels: every annotation keeps its box and its mask.
            assert masks.shape == (len(gt["boxes"]), 96, 96) and len(boxes) == len(gt["boxes"])
            scaled = torch.nn.functional.interpolate(gt["masks"][:, None].float(), size=(96, 96), mode="nearest")
            overlap = (scaled[:, 0].bool() & masks.bool()).sum((1, 2)) / masks.bool().sum((1, 2))
            assert (overlap > 0.9).all()


@pytest.mark.parametrize("size", [96, 160])
def test_the_letterbox_moves_masks_without_bias_against_their_boxes(size: int) -> None:
    # 200 random rectangles in a 128 px image: a mask resized by pixel centres (as the image) rounds both ways;
    # INTER_NEAREST reads the pixel under each output pixel's top-left edge and drifted +0.4 px on every side.
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100, size=(200, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(8, 28, size=(200, 2))], axis=1).round()
    masks = np.zeros((200, 128, 128), dtype=np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.astype(int), strict=True):
        mask[y1:y2, x1:x2] = 1
    out = apply_boxes(letterbox(size, 0, boxes=True), np.zeros((128, 128, 3), np.uint8), boxes, masks,
                      labels=np.ones(200, np.int64), iscrowd=np.zeros(200, np.int64))  # fmt: skip
    offsets = torch.stack([_mask_box(torch.from_numpy(m)) for m in out["masks"]]) - torch.from_numpy(out["boxes"])
    assert offsets.mean(0).abs().max() < 0.15 and offsets.abs().max() <= 0.5 + 1e-4
