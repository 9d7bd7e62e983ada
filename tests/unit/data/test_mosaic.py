"""Mosaic training samples: albumentations' own Mosaic of the sample and three other images at the batch's size,
drawn from the sample's seed alone; refused for instance targets."""

from __future__ import annotations

import itertools

import albumentations as A
import numpy as np
import pytest
import torch

from pipeline.data.coco import CocoBoxSource
from pipeline.data.datamodule import BoxSamples, ShapesDataModule
from pipeline.data.samplers import SampleKey
from pipeline.data.shapes import ShapesSpec, ensure_shapes
from pipeline.data.transforms import Mosaic, compose
from pipeline.errors import ConfigError

SPEC = ShapesSpec(num_train=4, num_val=2, image_size=80, min_shapes=2, max_shapes=4, seed=5)
FILTERS = {"min_visibility": 0.3, "min_area": 16}
NAMES = ["background", "circle", "square", "triangle"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> CocoBoxSource:
    root = ensure_shapes(tmp_path_factory.mktemp("shapes") / "shapes", SPEC)
    return CocoBoxSource(root / "images" / "train", root / "annotations" / "instances_train.json")


def _samples(source: CocoBoxSource, p: float | None) -> BoxSamples:
    samples = BoxSamples(source, compose([], bbox_params=FILTERS), size=64)
    samples.mosaic = Mosaic(p=p, bbox_params=FILTERS) if p is not None else None
    return samples


def _reference(source: CocoBoxSource, order: tuple[int, ...], size: int, seed: int) -> dict:
    """albumentations' Mosaic called directly, as its documentation shows, on images `order` (primary first); the
    shapes images are square, so their cells are size x size."""
    pipeline = A.Compose(
        [A.Mosaic(target_size=(size, size), cell_shape=(size, size), fit_mode="cover", p=1.0)],
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True, **FILTERS
        ),
        seed=seed,
    )
    items = []
    for index in order:
        image, ann = source.load(index)
        x, y, w, h = ann["boxes"].T
        items.append({"image": image, "bboxes": np.stack([x, y, x + w, y + h], 1), "labels": ann["labels"]})
    return pipeline(**items[0], mosaic_metadata=items[1:])


@pytest.mark.parametrize(("index", "size", "seed"), [(0, 64, 11), (2, 96, 12345)])
def test_a_mosaic_sample_is_albumentations_mosaic_of_it_and_the_three_others(source, index, size, seed) -> None:
    sample = _samples(source, p=1.0)[SampleKey(index, size, seed)]
    assert sample["image"].shape == (3, size, size)
    # Four images: the other three are in the mosaic, in an order drawn from the seed; one order gives ours.
    others = [i for i in range(len(source)) if i != index]
    matches = []
    for order in itertools.permutations(others):
        ref = _reference(source, (index, *order), size, seed)
        image = torch.from_numpy(ref["image"]).permute(2, 0, 1).float() / 255
        if torch.equal(image, sample["image"]):
            matches.append(order)
            torch.testing.assert_close(sample["boxes"], torch.as_tensor(ref["bboxes"], dtype=torch.float32))
            assert sample["labels"].tolist() == [int(v) for v in ref["labels"]] and len(sample["labels"]) > 0
    assert len(matches) == 1, matches
    assert not sample["iscrowd"].any()


def test_cells_take_the_letterbox_shape_of_the_primary_image_so_4_3_images_leave_no_padding() -> None:
    generator = np.random.default_rng(0)
    images = [generator.integers(1, 256, (60, 80, 3), dtype=np.uint8) for _ in range(4)]  # no black pixel
    boxes = [np.array([[5.0, 5.0, 40.0, 30.0], [50.0, 20.0, 78.0, 58.0]])] * 4
    labels = [np.array([1, 2]), np.array([3, 3]), np.array([2, 1]), np.array([1, 1])]
    ours = Mosaic(p=1.0, bbox_params=FILTERS)(64, 3, images, boxes, labels=labels, iscrowd=[np.zeros(2)] * 4)
    # 60 x 80 letterboxed to 64: 48 x 64 (hand computed), each image covering its cell at that scale
    reference = A.Compose(
        [A.Mosaic(target_size=(64, 64), cell_shape=(48, 64), fit_mode="cover", p=1.0)],
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], clip=True, filter_invalid_bboxes=True, **FILTERS
        ),
        seed=3,
    )
    items = [{"image": i, "bboxes": b, "labels": n} for i, b, n in zip(images, boxes, labels, strict=True)]
    theirs = reference(**items[0], mosaic_metadata=items[1:])
    assert np.array_equal(ours["image"], theirs["image"]) and ours["image"].min() > 0
    np.testing.assert_allclose(ours["boxes"], np.asarray(theirs["bboxes"], dtype=np.float32).reshape(-1, 4))
    assert ours["labels"].tolist() == [int(v) for v in theirs["labels"]] and not ours["iscrowd"].any()


def test_the_mosaic_is_a_function_of_the_seed_and_follows_the_batch_size(source) -> None:
    samples = _samples(source, p=1.0)
    first, again = samples[SampleKey(1, 64, 7)], samples[SampleKey(1, 64, 7)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["boxes"], again["boxes"])
    assert not torch.equal(first["image"], samples[SampleKey(1, 64, 8)]["image"])
    assert samples[SampleKey(1, 128, 7)]["image"].shape == (3, 128, 128)
    # p=0: every sample as without a mosaic (its own image letterboxed)
    plain, never = _samples(source, p=None), _samples(source, p=0.0)
    for seed in range(5):
        assert torch.equal(plain[SampleKey(3, 64, seed)]["image"], never[SampleKey(3, 64, seed)]["image"])
    # p=0.5: some samples of an image get a mosaic, some not
    half = _samples(source, p=0.5)
    mosaic = [not torch.equal(half[SampleKey(3, 64, s)]["image"], plain[SampleKey(3, 64, s)]["image"])
              for s in range(12)]  # fmt: skip
    assert any(mosaic) and not all(mosaic)


def test_mosaic_settings_are_checked_and_instance_targets_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="target_size, which the pipeline sets itself"):
        Mosaic(p=0.5, bbox_params=FILTERS, target_size=(64, 64))
    with pytest.raises(ConfigError, match="data.mosaic.p=1.5"):
        Mosaic(p=1.5, bbox_params=FILTERS)
    with pytest.raises(ConfigError, match="centre_range is no argument of albumentations.Mosaic"):
        Mosaic(p=0.5, bbox_params=FILTERS, centre_range=(0.3, 0.7))
    assert Mosaic(p=0.5, bbox_params=FILTERS, grid_yx=(1, 3)).others == 2
    args = {"root": str(tmp_path), "spec": {}, "num_classes": 4, "class_names": NAMES, "mosaic": {"p": 0.5}}
    with pytest.raises(ConfigError, match="box targets only"):
        ShapesDataModule(**args, targets="instances")
    dm = ShapesDataModule(**{**args, "spec": {"num_train": 4, "num_val": 2, "image_size": 64}}, targets="boxes",
                          num_workers=0, batch_size=2, train_sizes=[64])  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_set.mosaic.p == 0.5 and dm.val_set.mosaic is None  # validation images stay whole
