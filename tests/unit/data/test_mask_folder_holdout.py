"""data=masks with `holdout`: a reproducible share of the train folder validates, the rest trains, never both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from pipeline.cli import CONF_DIR
from pipeline.data.datamodule import MaskFolderDataModule
from pipeline.errors import ConfigError
from pipeline.training.config import TRAIN_KEYS, validate_config

COUNT = 30


def _value(stem: str) -> int:
    """The grey level image `stem` is filled with: its pixels say which file a sample came from."""
    return 5 + 8 * int(stem)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, str]:
    """30 pairs 0..29: 12 x 10 RGB images of one grey level each, masks of 0/255 like isbi_membrane's."""
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "image", tmp_path / "label"
    images.mkdir(), masks.mkdir()
    for i in range(COUNT):
        Image.fromarray(np.full((10, 12, 3), _value(str(i)), np.uint8)).save(images / f"{i}.png")
        Image.fromarray((rng.random((10, 12)) > 0.5).astype(np.uint8) * 255).save(masks / f"{i}.png")
    return {"images": str(images), "masks": str(masks)}


def _module(train: dict, holdout: float | None = 0.2, val: dict | None = None, seed: int = 0) -> MaskFolderDataModule:
    return MaskFolderDataModule(
        train=train, val=val, holdout=holdout, values={0: 0, 255: 1}, num_classes=2, class_names=["membrane", "cell"],
        batch_size=4, num_workers=0, train_sizes=[16], val_size=16, seed=seed,
    )  # fmt: skip


def _stems(module: MaskFolderDataModule, split: str) -> list[str]:
    return [image.stem for image, _ in getattr(module, f"{split}_set").source.pairs]


def test_holdout_splits_the_train_folder_into_disjoint_train_and_val(folders: dict[str, str]):
    module = _module(folders)
    module.setup("fit")
    train, val = _stems(module, "train"), _stems(module, "val")
    assert len(train) == 24 and len(val) == 6
    assert not set(train) & set(val)
    assert sorted(train + val, key=int) == [str(i) for i in range(COUNT)]
    # Every pair keeps its own mask: the image and mask files of each sample share the stem.
    assert all(image.stem == mask.stem for image, mask in module.val_set.source.pairs)
    # What the validation loader yields are the held-out images, each once (at the letterbox's top-left pixel).
    seen = [int(v) for batch in module.val_dataloader() for v in (batch["image"][:, 0, 0, 0] * 255).round()]
    assert sorted(seen) == sorted(_value(s) for s in val)


def test_holdout_is_the_same_on_every_construction_and_for_any_run_seed(folders: dict[str, str]):
    first, second = _module(folders, seed=1), _module(folders, seed=2)
    for module in (first, second):
        module.setup("fit")
    assert _stems(first, "val") == _stems(second, "val")
    assert _stems(first, "train") == _stems(second, "train")
    assert _stems(first, "val") != [str(i) for i in range(6)]  # a permutation, not the first files in order


def test_holdout_with_val_folders_is_refused(folders: dict[str, str]):
    with pytest.raises(ConfigError, match="data.val and data.holdout are both set"):
        _module(folders, val=folders)


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_holdout_leaving_an_empty_split_is_refused(folders: dict[str, str], fraction: float):
    with pytest.raises(ConfigError, match="each need at least one image"):
        _module(folders, holdout=fraction)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2])
def test_holdout_outside_0_1_is_refused(folders: dict[str, str], fraction: float):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        _module(folders, holdout=fraction)


def test_neither_val_nor_holdout_is_refused(folders: dict[str, str]):
    with pytest.raises(ConfigError, match="give its folders"):
        _module(folders, holdout=None)


def test_data_masks_config_takes_holdout_without_val_folders(folders: dict[str, str]):
    overrides = ["data=masks", f"data.train.images={folders['images']}", f"data.train.masks={folders['masks']}",
                 "data.val=null", "data.holdout=0.2", "data.values={0:0,255:1}", "data.num_workers=0"]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    validate_config(cfg, TRAIN_KEYS)
    module = instantiate(cfg.data, targets="semantic")
    module.setup("fit")
    assert (len(module.train_set), len(module.val_set)) == (24, 6)
