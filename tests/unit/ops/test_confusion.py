"""The detection confusion matrix: hand-worked cases of the matching rule, and pycocotools' COCOeval matching
(class-agnostic) on random images as the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.ops.confusion import detection_confusion
from tests.helpers import cocoeval_confusion

C = 4  # background + 3 classes


def _confusion(dets: list[tuple], gts: list[tuple], min_score: float = 0.3) -> torch.Tensor:
    """dets: (x1, y1, x2, y2, score, label); gts: (x1, y1, x2, y2, label, crowd) -> the [C, C] matrix."""
    d = torch.tensor(dets, dtype=torch.float32).reshape(-1, 6)
    g = torch.tensor(gts, dtype=torch.float32).reshape(-1, 6)
    return detection_confusion(d[:, :4], d[:, 4], d[:, 5].long(), g[:, :4], g[:, 4].long(), g[:, 5].bool(), C,
                               min_score)  # fmt: skip


def _cells(matrix: torch.Tensor) -> dict[tuple[int, int], int]:
    """Non-zero cells {(predicted, true): count}."""
    return {(int(p), int(t)): int(matrix[p, t]) for p, t in torch.nonzero(matrix).tolist()}


def test_a_found_object_counts_on_the_diagonal_and_its_duplicate_as_a_false_alarm() -> None:
    matrix = _confusion([(0, 0, 10, 10, 0.9, 1), (1, 0, 11, 10, 0.8, 1)], [(0, 0, 10, 10, 1, 0)])
    assert matrix.dtype == torch.int64 and matrix.shape == (C, C)
    assert _cells(matrix) == {(1, 1): 1, (1, 0): 1}


def test_the_best_score_takes_the_object_even_when_a_lower_one_overlaps_it_more() -> None:
    # the 0.6 detection overlaps exactly (IoU 1), the 0.9 one by 90/100: score order decides, not IoU
    matrix = _confusion([(1, 0, 10, 10, 0.9, 2), (0, 0, 10, 10, 0.6, 1)], [(0, 0, 10, 10, 1, 0)])
    assert _cells(matrix) == {(2, 1): 1, (1, 0): 1}


def test_greedy_by_score_each_detection_takes_its_best_free_object() -> None:
    # A = [0, 10], B = [2, 12] (same heights). det1 (0.9): IoU 8.5/11.5 = 0.74 with A, 9.5/10.5 = 0.90 with B ->
    # takes B. det2 (0.8) = B: IoU 1 with B (taken), 8/12 = 0.67 with A -> takes A. Greedy by IoU (ultralytics)
    # would pair det2-B and det1-A instead: the diagonal.
    dets = [(1.5, 0, 11.5, 10, 0.9, 1), (2, 0, 12, 10, 0.8, 2)]
    matrix = _confusion(dets, [(0, 0, 10, 10, 1, 0), (2, 0, 12, 10, 2, 0)])
    assert _cells(matrix) == {(1, 2): 1, (2, 1): 1}


def test_a_wrong_class_lands_off_the_diagonal() -> None:
    matrix = _confusion([(0, 0, 10, 10, 0.9, 3)], [(0, 0, 10, 10, 2, 0)])
    assert _cells(matrix) == {(3, 2): 1}


def test_crowd_regions_are_ignored_both_ways() -> None:
    # Both detections lie inside the crowd region (IoU 0.01, intersection over their own area 1): neither counts,
    # and the crowd region is not a missed object. The third takes the non-crowd object inside the crowd region.
    crowd, person = (0, 0, 100, 100, 1, 1), (50, 50, 60, 60, 2, 0)
    dets = [(10, 10, 20, 20, 0.9, 1), (30, 30, 40, 40, 0.8, 2), (50, 50, 60, 60, 0.7, 2)]
    assert _cells(_confusion(dets, [crowd, person])) == {(2, 2): 1}
    # Half inside (intersection 50 of its area 100) is still covered; 40 of 100 is a false alarm.
    half, less = (95, 0, 105, 10, 0.9, 1), (96, 20, 106, 30, 0.9, 1)
    assert _cells(_confusion([half, less], [crowd])) == {(1, 0): 1}


def test_detections_below_the_score_threshold_do_not_count() -> None:
    matrix = _confusion([(0, 0, 10, 10, 0.2, 1), (20, 20, 30, 30, 0.1, 1)], [(0, 0, 10, 10, 1, 0)], min_score=0.3)
    assert _cells(matrix) == {(0, 1): 1}  # the object is missed; the false alarm below threshold does not count
    assert _cells(_confusion([(0, 0, 10, 10, 0.3, 1)], [(0, 0, 10, 10, 1, 0)], min_score=0.3)) == {(1, 1): 1}


def test_an_iou_of_exactly_the_threshold_matches() -> None:
    assert _cells(_confusion([(0, 0, 10, 10, 0.9, 1)], [(0, 0, 5, 10, 1, 0)])) == {(1, 1): 1}  # IoU 50/100
    assert _cells(_confusion([(0, 0, 10, 10, 0.9, 1)], [(0, 0, 4, 10, 1, 0)])) == {(1, 0): 1, (0, 1): 1}


def test_empty_images() -> None:
    assert _confusion([], []).sum() == 0 and _confusion([], []).shape == (C, C)
    assert _cells(_confusion([(0, 0, 10, 10, 0.9, 2)], [])) == {(2, 0): 1}
    assert _cells(_confusion([], [(0, 0, 10, 10, 3, 0), (20, 20, 30, 30, 3, 0)])) == {(0, 3): 2}
    assert _confusion([], [(0, 0, 10, 10, 3, 1)]).sum() == 0  # only a crowd region


def test_a_label_outside_the_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="label 4 outside 1..3"):
        _confusion([(0, 0, 10, 10, 0.9, 4)], [])


def _random_images(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image (dets [D, 6] x1 y1 x2 y2 score label, gts [G, 6] x1 y1 x2 y2 label crowd) on an integer grid, so
    equal IoUs, IoUs of exactly 0.5 and duplicates all occur. Every 6th image has no ground truth."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        num_gt = 0 if i % 6 == 0 else int(rng.integers(1, 6))
        xy = rng.integers(0, 40, (num_gt, 2))
        gts = np.concatenate([xy, xy + rng.integers(4, 16, (num_gt, 2)), rng.integers(1, C, (num_gt, 1)),
                              rng.random((num_gt, 1)) < 0.15], 1)  # fmt: skip
        # By label: COCOeval (useCats=0) lists an image's ground truth class by class, and equal IoUs go to the
        # last listed on both sides.
        gts = gts[np.argsort(gts[:, 4], kind="stable")]
        # Jittered copies of the ground truth (0-3 each, any label) and false alarms anywhere.
        copies = gts[rng.integers(0, max(num_gt, 1), int(rng.integers(0, 3 * num_gt + 1)))][:, :4]
        copies = copies + rng.integers(-3, 4, copies.shape)
        xy = rng.integers(0, 40, (int(rng.integers(0, 3)), 2))
        boxes = np.concatenate([copies, np.concatenate([xy, xy + rng.integers(4, 16, xy.shape)], 1)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = rng.permutation(len(boxes)) / max(len(boxes), 1) + 0.05  # distinct
        dets = np.concatenate([boxes, scores[:, None], rng.integers(1, C, (len(boxes), 1))], 1)
        images.append((dets.astype(np.float64), gts.astype(np.float64)))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_cocoeval_matching_on_random_images(seed: int) -> None:
    images = _random_images(seed, 60)
    ours = sum(_confusion(d.tolist(), g.tolist()) for d, g in images)
    reference = cocoeval_confusion(images, 0.3)
    assert reference.sum() > 200 and (reference - np.diag(np.diag(reference))).sum() > 50  # off-diagonal cases
    np.testing.assert_array_equal(ours.numpy(), reference)
