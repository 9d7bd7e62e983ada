"""Each sample's augmentation is a function of (seed, epoch, index): not of the loader worker, nor of a restart."""

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.datamodule import SegmentationSamples, _worker_init
from pipeline.data.samplers import MultiScaleBatchSampler, ShardedSampler
from pipeline.data.transforms import compose


class _GreySource:
    """Eight identical grey 32x32 images: any difference between samples comes from augmentation."""

    def __len__(self) -> int:
        return 8

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.full((32, 32, 3), 128, np.uint8), np.zeros((32, 32), np.uint8)


def _batches(seed: int, epoch: int, workers: int, resume_after: int | None = None) -> list[torch.Tensor]:
    """The images of one epoch, batch size 2, through a real DataLoader with `workers` worker processes."""
    augment = compose([A.ColorJitter(brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0, p=1.0)])
    samples = SegmentationSamples(_GreySource(), augment, 32, 255)
    sampler = ShardedSampler(len(samples), shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    batches = MultiScaleBatchSampler(sampler, 2, [32], 1, drop_last=False)
    if resume_after is not None:
        batches.resume_at(epoch, resume_after)
    torch.manual_seed(1234 + workers)  # the main process's RNG (worker seeds come from it) must not matter
    loader = DataLoader(samples, batch_sampler=batches, num_workers=workers,
                        worker_init_fn=_worker_init if workers else None)  # fmt: skip
    return [batch["image"] for batch in loader]


def test_augmentations_depend_on_seed_epoch_and_index_not_on_the_workers():
    inline = _batches(seed=3, epoch=0, workers=0)
    means = [round(float(x.mean()), 5) for batch in inline for x in batch]
    assert len(set(means)) == 8  # every sample its own draw (one shared stream per worker would still differ,
    # but two workers forked with one generator state would repeat each other's: see the next line)
    assert all(torch.equal(a, b) for a, b in zip(inline, _batches(seed=3, epoch=0, workers=2), strict=True))
    assert not torch.equal(torch.cat(inline), torch.cat(_batches(seed=3, epoch=1, workers=0)))
    assert not torch.equal(torch.cat(inline), torch.cat(_batches(seed=4, epoch=0, workers=0)))


def test_a_resumed_epoch_gives_the_remaining_batches_unchanged():
    whole = _batches(seed=3, epoch=2, workers=0)
    rest = _batches(seed=3, epoch=2, workers=2, resume_after=1)
    assert len(rest) == len(whole) - 1
    assert all(torch.equal(a, b) for a, b in zip(whole[1:], rest, strict=True))


def test_transforms_of_one_pipeline_draw_independently_when_reseeded_per_sample():
    # albumentations' own set_random_seed gives every transform the same seed: two flips with p=0.5 would then
    # always fire together (half the samples flipped both ways, none one way only).
    from pipeline.data.transforms import reseed

    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    flips = compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    outcomes = []
    for seed in range(400):
        reseed(flips, seed)
        out = flips(image=image)["image"]
        outcomes.append((np.array_equal(out, image[:, ::-1]), np.array_equal(out, image[::-1])))
    one_way = sum(h or v for h, v in outcomes) / len(outcomes)
    assert 0.4 < one_way < 0.6  # independent: P(exactly one flip) = 0.5; correlated: 0
