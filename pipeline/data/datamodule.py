"""LightningDataModules: samples as {"image": [3, H, W] float in 0..1, "mask": [H, W] long}, multi-scale batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import ConfigError
from pipeline.data.coco import CocoSemanticSource
from pipeline.data.samplers import MultiScaleBatchSampler, ShardedSampler
from pipeline.data.shapes import ShapesSpec, ensure_shapes
from pipeline.data.transforms import apply, compose, letterbox


class SegmentationSamples(Dataset):
    """Augmented, letterboxed samples of a source; a key is an index or an (index, size) pair from the sampler."""

    def __init__(self, source: CocoSemanticSource, augment: A.Compose, size: int, ignore_index: int) -> None:
        self.source, self.augment, self.size, self.ignore_index = source, augment, size, ignore_index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, size = key if isinstance(key, tuple) else (key, self.size)
        image, mask = self.source.load(index)
        image, mask = apply(self.augment, image, mask)
        image, mask = apply(letterbox(size, self.ignore_index), image, mask)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).long(),
        }


def _worker_init(_: int) -> None:
    # OpenCV's own thread pool inside every loader worker would oversubscribe the cores.
    cv2.setNumThreads(0)
    # Forked workers inherit one albumentations generator state: give each its own, from torch's worker seed
    # (itself derived from the seeded main process, so runs stay reproducible).
    info = torch.utils.data.get_worker_info()
    info.dataset.augment.set_random_seed(info.seed % 2**32)


def auto_num_workers(devices: int = 1) -> int:
    """Loader workers per process: the cores left after one per training process, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, devices) - 1))


class SegmentationDataModule(pl.LightningDataModule):
    """Semantic segmentation over COCO instances files (train/val image folder + annotation json)."""

    def __init__(
        self,
        train: dict,
        val: dict,
        num_classes: int,
        class_names: Sequence[str],
        ignore_index: int = 255,
        batch_size: int = 16,
        num_workers: int | str = "auto",
        train_sizes: Sequence[int] = (128,),
        size_every: int = 10,
        val_size: int = 128,
        train_transforms: Sequence[A.BasicTransform] = (),
        val_transforms: Sequence[A.BasicTransform] = (),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(class_names) != num_classes:
            raise ValueError(f"data.class_names has {len(class_names)} names but data.num_classes is {num_classes}")
        self.train_files, self.val_files = dict(train), dict(val)
        self.num_classes, self.class_names, self.ignore_index = num_classes, list(class_names), ignore_index
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_sizes, self.size_every, self.val_size = list(train_sizes), size_every, val_size
        self.train_augment, self.val_augment = compose(train_transforms, seed), compose(val_transforms, seed)
        self.seed = seed
        self.train_set: SegmentationSamples | None = None
        self.val_set: SegmentationSamples | None = None

    def _source(self, files: dict) -> CocoSemanticSource:
        source = CocoSemanticSource(files["images"], files["annotations"], self.ignore_index)
        if len(source.label_of) + 1 != self.num_classes:
            raise ConfigError(
                f"{files['annotations']} has {len(source.label_of)} categories, so data.num_classes must be "
                f"{len(source.label_of) + 1} (background + categories), not {self.num_classes}."
            )
        return source

    def setup(self, stage: str | None = None) -> None:
        """Read the annotation files (every rank)."""
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = SegmentationSamples(
                self._source(self.train_files), self.train_augment, max(self.train_sizes), self.ignore_index
            )
        if self.val_set is None:
            self.val_set = SegmentationSamples(
                self._source(self.val_files), self.val_augment, self.val_size, self.ignore_index
            )

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, batch_sampler: torch.utils.data.Sampler) -> DataLoader:
        workers = auto_num_workers(self._rank_world()[1]) if self.num_workers == "auto" else int(self.num_workers)
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ShardedSampler(len(self.train_set), shuffle=True, seed=self.seed, rank=rank, world_size=world)
        drop_last = len(sampler) >= self.batch_size
        batches = MultiScaleBatchSampler(sampler, self.batch_size, self.train_sizes, self.size_every, drop_last)
        return self._loader(self.train_set, batches)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        if len(self.val_set) < world:
            raise ConfigError(
                f"The validation set has {len(self.val_set)} images for {world} processes: every process needs one."
            )
        # No padding: each val image is scored exactly once across ranks, so synced metrics equal one process's.
        sampler = ShardedSampler(
            len(self.val_set), shuffle=False, seed=self.seed, rank=rank, world_size=world, pad=False
        )
        batches = MultiScaleBatchSampler(sampler, self.batch_size, [self.val_size], 1, drop_last=False)
        return self._loader(self.val_set, batches)


class ShapesDataModule(SegmentationDataModule):
    """The embedded shapes dataset: generated under `root` on first use, then read as COCO files."""

    def __init__(self, root: str, spec: dict, **kwargs) -> None:
        self.root = Path(root)
        self.spec = ShapesSpec(**spec)
        files = {
            split: {
                "images": self.root / "images" / split,
                "annotations": self.root / "annotations" / f"instances_{split}.json",
            }
            for split in ("train", "val")
        }
        super().__init__(train=files["train"], val=files["val"], **kwargs)

    def prepare_data(self) -> None:
        """Generate (or reuse) the dataset once per node, before any rank reads it."""
        ensure_shapes(self.root, self.spec)
