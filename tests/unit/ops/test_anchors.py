"""Anchor k-means (1 - shape IoU), the anchor fit and best possible recall, and the anchor plot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.anchor_cache import cached_kmeans_anchors
from pipeline.ops.anchors import (
    anchor_fit,
    anchor_plot,
    best_possible_recall,
    kmeans_anchors,
    shape_iou,
)

# YOLOv3's COCO anchors: aspect ratios from 0.5 to 2, areas from 130 to 120 000 px^2 (about three decades).
CENTRES = torch.tensor(
    [[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198], [373, 326]],
    dtype=torch.float32,
)


def _clustered(per_cluster: int = 200, jitter: float = 0.05, seed: int = 0) -> torch.Tensor:
    """[9 * per_cluster, 2] sizes: each centre times log-normal noise of `jitter`, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.exp(jitter * torch.randn(len(CENTRES) * per_cluster, 2, generator=generator))
    sizes = CENTRES.repeat_interleave(per_cluster, 0) * noise
    return sizes[torch.randperm(len(sizes), generator=generator)]


def test_shape_iou_matches_hand_computed_values() -> None:
    a = torch.tensor([[2.0, 4.0], [2.0, 2.0]])
    b = torch.tensor([[4.0, 2.0], [4.0, 4.0], [2.0, 4.0]])
    expected = torch.tensor([[4 / 12, 8 / 16, 1.0], [4 / 8, 4 / 16, 4 / 8]])
    assert torch.allclose(shape_iou(a, b), expected)
    assert torch.allclose(shape_iou(b, a), expected.T)
    assert shape_iou(torch.tensor([[3, 5]]), torch.tensor([[3, 5]])).item() == 1.0  # integer sizes work too
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        shape_iou(torch.ones(3, 4), torch.ones(2, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_known_clusters(seed: int) -> None:
    sizes = _clustered()
    anchors = kmeans_anchors(sizes, k=9, seed=seed)
    assert anchors.shape == (9, 2) and anchors.dtype == torch.float32
    assert (anchors.prod(1).diff() > 0).all()  # sorted by area, smallest (stride 8) first
    assert torch.allclose(anchors, CENTRES, rtol=0.03)
    assert anchor_fit(sizes, anchors) > 0.9


def test_kmeans_is_deterministic_for_a_seed() -> None:
    sizes = _clustered(per_cluster=100, jitter=0.3)  # overlapping clusters: the answer depends on the start
    first = kmeans_anchors(sizes, seed=7)
    assert torch.equal(first, kmeans_anchors(sizes, seed=7))
    # k-means runs on one CPU thread but restores the caller's setting.
    threads = torch.get_num_threads()
    kmeans_anchors(sizes, seed=3)
    assert torch.get_num_threads() == threads


def test_kmeans_keeps_the_input_float_dtype_and_accepts_integer_sizes() -> None:
    sizes = _clustered(per_cluster=30)
    assert kmeans_anchors(sizes.double(), seed=0).dtype == torch.float64
    assert kmeans_anchors(sizes.round().long(), seed=0).dtype == torch.float32


def test_kmeans_with_fewer_distinct_sizes_than_k_still_fits_every_box() -> None:
    sizes = torch.tensor([[4.0, 4.0], [8.0, 16.0], [32.0, 8.0]]).repeat(10, 1)
    anchors = kmeans_anchors(sizes, k=5)
    assert anchors.shape == (5, 2)
    assert anchor_fit(sizes, anchors) == pytest.approx(1.0)


def test_kmeans_rejects_too_few_boxes() -> None:
    with pytest.raises(ValueError, match=r"k=9 boxes, got 5"):
        kmeans_anchors(torch.ones(5, 2), k=9)


def test_kmeans_rejects_non_positive_and_non_finite_sizes() -> None:
    sizes = torch.full((10, 2), 8.0)
    sizes[2, 0], sizes[5, 1], sizes[7, 0] = 0.0, float("nan"), -1.0
    with pytest.raises(ValueError, match=r"3 of 10 box sizes"):
        kmeans_anchors(sizes, k=2)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        kmeans_anchors(torch.ones(10, 3), k=2)


def test_anchor_fit_and_best_possible_recall_by_hand() -> None:
    boxes = torch.tensor([[2.0, 4.0], [4.0, 4.0]])
    assert anchor_fit(boxes, boxes) == pytest.approx(1.0)
    # (2, 4) fits (4, 4) at 8/16 better than (4, 2) at 4/12; (4, 4) fits itself exactly.
    assert anchor_fit(boxes, torch.tensor([[4.0, 2.0], [4.0, 4.0]])) == pytest.approx(0.75)
    # Square boxes 1, 2, 4, 8 against one 4x4 anchor: IoU 1/16, 1/4, 1, 1/4.
    squares = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]])
    anchor = torch.tensor([[4.0, 4.0]])
    assert anchor_fit(squares, anchor) == pytest.approx((1 / 16 + 1 / 4 + 1 + 1 / 4) / 4)
    assert best_possible_recall(squares, anchor) == pytest.approx(0.75)  # threshold 0.25 is inclusive
    assert best_possible_recall(squares, anchor, threshold=0.5) == pytest.approx(0.25)


def test_anchor_plot_is_an_rgb_image() -> None:
    sizes = _clustered(per_cluster=20)
    image = anchor_plot(sizes, CENTRES, "unit test")
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def test_cached_kmeans_reads_back_the_same_anchors_and_refits_other_boxes(tmp_path, monkeypatch) -> None:
    wh = torch.rand(200, 2, generator=torch.Generator().manual_seed(3)) * 60 + 4
    first = cached_kmeans_anchors(wh, 9, 0, tmp_path)
    assert torch.equal(first, kmeans_anchors(wh, k=9, seed=0))
    (cache,) = tmp_path.iterdir()

    calls = []
    monkeypatch.setattr("pipeline.data.anchor_cache.kmeans_anchors", lambda *a, **kw: calls.append(a) or first)
    assert torch.equal(cached_kmeans_anchors(wh, 9, 0, tmp_path), first) and calls == []  # read, not clustered
    cached_kmeans_anchors(wh * 2, 9, 0, tmp_path)  # other boxes: clustered, cached under their own fingerprint
    cached_kmeans_anchors(wh, 9, 1, tmp_path)  # another seed too
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 3
    cache.write_text("{not json")  # a damaged file is recomputed
    cached_kmeans_anchors(wh, 9, 0, tmp_path)
    assert len(calls) == 3
