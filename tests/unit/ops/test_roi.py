"""The mask branch's RoIs: FPN level pooling at pixel centres (ops.roi.multiscale_roi_align) checked against
torchvision's roi_align and MultiScaleRoIAlign; which instances get a mask RoI (ops.roi.sample_rois)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from pipeline.ops.roi import fpn_levels, multiscale_roi_align, roi_generator, sample_rois

STRIDES = (8, 16, 32)
HEIGHT, WIDTH = 640, 768


def _levels(batch: int, channels: int = 3) -> list[torch.Tensor]:
    """Per stride [B, C, H/s, W/s]: channel 0 = x of the cell centre in input pixels, 1 = y, 2 = image index."""
    levels = []
    for stride in STRIDES:
        h, w = HEIGHT // stride, WIDTH // stride
        level = torch.zeros(batch, channels, h, w)
        level[:, 0] = ((torch.arange(w, dtype=torch.float32) + 0.5) * stride)[None, None, :]
        level[:, 1] = ((torch.arange(h, dtype=torch.float32) + 0.5) * stride)[None, :, None]
        level[:, 2] = torch.arange(batch, dtype=torch.float32)[:, None, None]
        levels.append(level)
    return levels


def _square(side: float, x: float = 20.0, y: float = 10.0) -> list[float]:
    return [x, y, x + side, y + side]


def test_fpn_levels_follow_eq_1_at_its_boundaries() -> None:
    # floor(4 + log2(side / 224)) clamped to 3..5: sides below 224 -> stride 8, 224..447 -> 16, 448 and up -> 32.
    sides = [4.0, 100.0, 223.5, 224.0, 300.0, 447.5, 448.0, 600.0]
    boxes = torch.tensor([_square(s) for s in sides])
    assert fpn_levels(boxes, STRIDES).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    wide = torch.tensor([[0.0, 0.0, 896.0, 56.0]])  # sqrt(area) 224: by area, not by the longer side
    assert fpn_levels(wide, STRIDES).tolist() == [1]


def test_levels_are_the_ones_multiscale_roi_align_picks() -> None:
    # Level k filled with k + 1: the pooled value names the level a box was read from, whatever the alignment.
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=generator) * torch.tensor([WIDTH - 8.0, HEIGHT - 8.0])
    wh = torch.rand(200, 2, generator=generator) ** 2 * (torch.tensor([WIDTH, HEIGHT]) - xy)
    boxes = torch.cat([xy, xy + wh.clamp(min=4.0)], 1).clamp(max=torch.tensor([WIDTH, HEIGHT] * 2) - 1.0)
    levels = [torch.full((1, 1, HEIGHT // s, WIDTH // s), k + 1.0) for k, s in enumerate(STRIDES)]
    reference = MultiScaleRoIAlign(["a", "b", "c"], 2, sampling_ratio=2)(
        OrderedDict(zip("abc", levels, strict=True)), [boxes], [(HEIGHT, WIDTH)]
    )
    ours = multiscale_roi_align(levels, [boxes], STRIDES, 2)
    assert set(reference.round().unique().tolist()) == {1.0, 2.0, 3.0}  # every level is used
    assert torch.equal(ours.round(), reference.round())


def test_pooled_features_read_the_coordinates_of_the_bin_centres() -> None:
    size = 5
    # Image 0: strides 8 and 16; image 1: stride 32.
    boxes = [torch.tensor([_square(60.0), [100.0, 60.0, 400.0, 360.0]]),
             torch.tensor([[60.0, 50.0, 660.0, 560.0]])]  # fmt: skip
    pooled = multiscale_roi_align(_levels(2), boxes, STRIDES, size).double()
    steps = torch.arange(size, dtype=torch.float64) + 0.5
    for r, (image, (x1, y1, x2, y2)) in enumerate([(0, boxes[0][0]), (0, boxes[0][1]), (1, boxes[1][0])]):
        xs = (x1 + steps * (x2 - x1) / size)[None, :].expand(size, size)  # bin centres, input pixels
        ys = (y1 + steps * (y2 - y1) / size)[:, None].expand(size, size)
        torch.testing.assert_close(pooled[r, 0], xs, rtol=0, atol=1e-4)
        torch.testing.assert_close(pooled[r, 1], ys, rtol=0, atol=1e-4)
        assert bool((pooled[r, 2] == image).all())


def test_each_box_is_torchvision_roi_align_of_its_level_at_pixel_centres() -> None:
    generator = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 4, HEIGHT // s, WIDTH // s, generator=generator) for s in STRIDES]
    # Image 0: levels 0 and 2; image 1: level 1.
    boxes = [torch.tensor([_square(50.0, 3.5, 7.25), _square(500.0, 100.0, 90.0)]),
             torch.tensor([_square(250.0, 300.0, 200.0)])]  # fmt: skip
    ours = multiscale_roi_align(levels, boxes, STRIDES, 7)
    for r, (image, level, box) in enumerate([(0, 0, boxes[0][0]), (0, 2, boxes[0][1]), (1, 1, boxes[1][0])]):
        roi = torch.cat([torch.tensor([float(image)]), box])[None]
        expected = roi_align(levels[level], roi, (7, 7), 1 / STRIDES[level], sampling_ratio=2, aligned=True)
        torch.testing.assert_close(ours[r], expected[0])


def test_no_boxes_give_no_features_and_keep_every_level_in_the_graph() -> None:
    levels = [t.requires_grad_() for t in _levels(2, channels=4)]
    pooled = multiscale_roi_align(levels, [torch.zeros(0, 4), torch.zeros(0, 4)], STRIDES, 7)
    assert pooled.shape == (0, 4, 7, 7)
    pooled.sum().backward()
    assert all(level.grad is not None for level in levels)


def test_strides_must_double() -> None:
    with pytest.raises(ValueError, match="double"):
        fpn_levels(torch.tensor([_square(10.0)]), (8, 32))


# --------------------------------------------------------------------------------------------- RoI sampling


@pytest.mark.parametrize("count", [0, 1, 7, 8])
def test_every_candidate_is_kept_when_they_fit_under_the_cap(count: int) -> None:
    assert sample_rois(count, 8, roi_generator(0)).tolist() == list(range(count))


def test_more_candidates_than_the_cap_give_a_subset_of_distinct_ones() -> None:
    chosen = sample_rois(20, 8, roi_generator(0))
    assert chosen.dtype == torch.long and len(chosen) == 8 and len(set(chosen.tolist())) == 8
    assert all(0 <= i < 20 for i in chosen.tolist())


def test_the_same_key_gives_the_same_subset_and_other_keys_other_subsets() -> None:
    draws = {key: frozenset(sample_rois(30, 8, roi_generator(*key)).tolist()) for key in
             [(0, 5, 0, 0), (1, 5, 0, 0), (0, 6, 0, 0), (0, 5, 1, 0), (0, 5, 0, 1)]}  # fmt: skip
    assert frozenset(sample_rois(30, 8, roi_generator(0, 5, 0, 0)).tolist()) == draws[(0, 5, 0, 0)]
    assert len(set(draws.values())) == len(draws)  # seed, step, rank and image each change the draw


def test_every_candidate_is_picked_about_equally_often() -> None:
    # 4000 draws of 8 of 20: each candidate is picked 1600 times in expectation (binomial sd ~31).
    counts = torch.zeros(20)
    for step in range(4000):
        counts[sample_rois(20, 8, roi_generator(0, step, 0, 0))] += 1
    assert counts.sum() == 32000
    # Within ~5 sd of 1600; keeping the first 8 would give 4000 and 0.
    assert bool((counts - 1600).abs().max() < 160), counts.tolist()
