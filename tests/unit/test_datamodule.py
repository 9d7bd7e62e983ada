"""Augmentations differ between loader workers and repeat with the seed."""

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.datamodule import SegmentationSamples, _worker_init
from pipeline.data.transforms import compose


class _GreySource:
    """Eight identical grey 32x32 images: any difference between samples comes from augmentation."""

    def __len__(self) -> int:
        return 8

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((32, 32, 3), 128, np.uint8), np.zeros((32, 32), np.uint8)


def _images(seed: int) -> list[torch.Tensor]:
    augment = compose([A.ColorJitter(brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0, p=1.0)], seed)
    samples = SegmentationSamples(_GreySource(), augment, 32, 255)
    torch.manual_seed(seed)
    loader = DataLoader(samples, batch_size=1, num_workers=2, worker_init_fn=_worker_init)
    return [batch["image"] for batch in loader]


def test_each_worker_draws_its_own_augmentations_reproducibly():
    first = _images(seed=3)
    means = [round(float(x.mean()), 5) for x in first]
    # batches alternate between the two workers: with one shared generator state, pairs would be equal
    assert all(means[i] != means[i + 1] for i in range(0, 8, 2))
    assert len(set(means)) == 8
    assert all(torch.equal(a, b) for a, b in zip(first, _images(seed=3), strict=True))
