"""CocoMAP against pycocotools' COCOeval (all 12 stats to 1e-6), its edge cases, VOC 11-point AP and PR plots."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.metrics.detection import COCO_STATS, CocoMAP, pr_curve_figure

CATEGORY_IDS = (1, 5, 9)  # non-contiguous on purpose: labels are the category ids on both sides
SIDES = (12.0, 48.0, 160.0)  # small (< 32²), medium, large (> 96²) before jitter


def _f32(value: float) -> float:
    """The float the metric sees after float32 tensors, so both sides get the same inputs."""
    return float(np.float32(value))


def _box(x: float, y: float, w: float, h: float) -> list[float]:
    """An xywh box of float32-exact numbers."""
    return [_f32(x), _f32(y), _f32(w), _f32(h)]


def _annotation(image_id: int, category: int, bbox: list[float], area: float | None = None, crowd: int = 0) -> dict:
    """A COCO annotation (the id is set by _gt); area defaults to the box area."""
    area = bbox[2] * bbox[3] if area is None else area
    return {"image_id": image_id, "category_id": category, "bbox": bbox, "area": _f32(area), "iscrowd": crowd}


def _detection(image_id: int, category: int, bbox: list[float], score: float) -> dict:
    """A COCO result entry with a float32-exact score."""
    return {"image_id": image_id, "category_id": category, "bbox": bbox, "score": _f32(score)}


def _gt(image_ids: list[int], annotations: list[dict], categories: tuple[int, ...] = CATEGORY_IDS) -> dict:
    """A COCO ground-truth dict with unique annotation ids (duplicates silently corrupt pycocotools' AP)."""
    annotations = [{**a, "id": i} for i, a in enumerate(annotations, start=1)]
    return {"info": {}, "images": [{"id": i, "width": 640, "height": 480} for i in image_ids],
            "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in categories]}  # fmt: skip


def _dataset(seed: int, num_images: int = 30, crowd: bool = False, score_levels: int = 0) -> tuple[dict, list[dict]]:
    """Realistic set: small/medium/large GT, jittered GT as detections (some mislabelled), false positives.

    Image ids are non-contiguous (10, 20, …); every 7th image has no ground truth, every 5th no false positives.
    `score_levels` > 0 quantises scores to that many values (ties within and across images).
    """
    rng = np.random.default_rng(seed)
    image_ids = [10 * (i + 1) for i in range(num_images)]
    annotations, detections = [], []

    def score(low: float, high: float) -> float:
        """A uniform score, quantised upwards when asked."""
        value = rng.uniform(low, high)
        return float(np.ceil(value * score_levels) / score_levels) if score_levels else value

    for n, image_id in enumerate(image_ids):
        for _ in range(int(rng.integers(0, 6)) if n % 7 else 0):
            w, h = (float(v) for v in rng.choice(SIDES, size=2) * rng.uniform(0.7, 1.3, size=2))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            category = int(rng.choice(CATEGORY_IDS))
            is_crowd = int(crowd and rng.random() < 0.15)
            annotations.append(
                _annotation(image_id, category, _box(x, y, w, h), w * h * rng.uniform(0.6, 1.0), is_crowd)
            )
            if rng.random() < 0.8:
                dx, dy, dw, dh = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                label = category if rng.random() < 0.85 else int(rng.choice(CATEGORY_IDS))
                box = _box(x + dx, y + dy, max(1.0, w + dw), max(1.0, h + dh))
                detections.append(_detection(image_id, label, box, score(0.3, 1.0)))
        if n % 5:
            for _ in range(int(rng.integers(0, 4))):
                box = _box(rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(5, 200), rng.uniform(5, 200))
                detections.append(_detection(image_id, int(rng.choice(CATEGORY_IDS)), box, score(0.0, 0.6)))
    return _gt(image_ids, annotations), detections


def _reference(gt: dict, detections: list[dict], max_dets: tuple[int, int, int] = (1, 10, 100)) -> COCOeval:
    """pycocotools' COCOeval, evaluated, accumulated and summarised (loadRes mutates its input: give it copies)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _reference_class_ap(gt: dict, detections: list[dict], category: int) -> float:
    """pycocotools' mAP restricted to one category."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.params.catIds = [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def _tensors(rows: list[dict], key: str) -> torch.Tensor:
    """The rows' boxes as float32 [N, 4], [0, 4] when there are none."""
    return torch.tensor([r[key] for r in rows], dtype=torch.float32).reshape(-1, 4)


def _ours(gt: dict, detections: list[dict], metric: CocoMAP | None = None) -> dict:
    """CocoMAP fed one image per update in sorted image id order, as a validation loop does."""
    metric = metric or CocoMAP()
    for image_id in sorted(image["id"] for image in gt["images"]):
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        dets = [d for d in detections if d["image_id"] == image_id]
        preds = {"boxes": _tensors(dets, "bbox"), "scores": torch.tensor([d["score"] for d in dets]),
                 "labels": torch.tensor([d["category_id"] for d in dets], dtype=torch.long)}  # fmt: skip
        target = {"boxes": _tensors(anns, "bbox"), "labels": torch.tensor([a["category_id"] for a in anns]).long(),
                  "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.long),
                  "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32)}  # fmt: skip
        metric.update([preds], [target])
    return metric.summary()


def _assert_stats_equal(ours: dict, reference: COCOeval) -> None:
    """All 12 COCO stats within 1e-6 (-1 included)."""
    expected = [float(v) for v in reference.stats]
    got = [ours[key] for key in COCO_STATS]
    assert all(abs(a - b) <= 1e-6 for a, b in zip(got, expected, strict=True)), list(
        zip(COCO_STATS, got, expected, strict=True)
    )


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_realistic_set_equals_pycocotools(seed: int, backend: str) -> None:
    gt, detections = _dataset(seed)
    reference = _reference(gt, detections)
    assert min(reference.stats[3:6]) > 0  # small, medium and large all have ground truth and hits
    ours = _ours(gt, detections, CocoMAP(backend=backend))
    _assert_stats_equal(ours, reference)
    assert ours["nonfinite"] == 0
    labels_with_gt = sorted({a["category_id"] for a in gt["annotations"]})
    assert sorted(ours["map_per_class"]) == labels_with_gt
    for label in labels_with_gt:
        assert abs(ours["map_per_class"][label] - _reference_class_ap(gt, detections, label)) <= 1e-6
    # precision [T, R, K, A, M]: IoU 0.5, area all, 100 detections; K follows the sorted category ids
    at_50 = {c: reference.eval["precision"][0, :, k, 0, 2] for k, c in enumerate(sorted(CATEGORY_IDS))}
    voc = np.mean([at_50[c][::10].mean() for c in labels_with_gt])
    assert abs(ours["map_50_voc"] - voc) <= 1e-6
    for label in labels_with_gt:
        recall, precision = ours["pr_curves"][label]
        np.testing.assert_allclose(recall, np.linspace(0, 1, 101), atol=0)
        np.testing.assert_allclose(precision, at_50[label], atol=1e-6)


def _drop_detections_on_every_third_image(gt: dict, detections: list[dict]) -> tuple[dict, list[dict]]:
    """Images with ground truth but no detection."""
    return gt, [d for d in detections if (d["image_id"] // 10) % 3]


def _keep_ground_truth_on_even_images(gt: dict, detections: list[dict]) -> tuple[dict, list[dict]]:
    """Images with detections but no ground truth."""
    return {**gt, "annotations": [a for a in gt["annotations"] if (a["image_id"] // 10) % 2 == 0]}, detections


@pytest.mark.parametrize(
    "edit",
    [_drop_detections_on_every_third_image, _keep_ground_truth_on_even_images],
    ids=["images_without_detections", "images_without_ground_truth"],
)
def test_images_without_detections_or_ground_truth_equal_pycocotools(
    edit: Callable[[dict, list[dict]], tuple[dict, list[dict]]],
) -> None:
    gt, detections = edit(*_dataset(3))
    with_gt = {a["image_id"] for a in gt["annotations"]}
    with_dets = {d["image_id"] for d in detections}
    assert with_gt - with_dets and with_dets - with_gt  # both kinds of image are present
    _assert_stats_equal(_ours(gt, detections), _reference(gt, detections))


def test_detections_on_a_crowd_region_are_ignored_not_false_positives() -> None:
    # One object of class 1 (hit at score 0.5) and a crowd region of class 1 with three higher-scored detections
    # inside it: pycocotools ignores them (crowd IoU = intersection / detection area = 1), so AP stays 1.
    crowd_box = _box(100, 100, 200, 150)
    annotations = [_annotation(1, 1, _box(10, 10, 40, 40)), _annotation(1, 1, crowd_box, area=20000.0, crowd=1)]
    hit = _detection(1, 1, _box(10, 10, 40, 40), 0.5)
    on_crowd = [_detection(1, 1, _box(120 + 20 * i, 120, 30, 30), 0.9 - 0.1 * i) for i in range(3)]
    gt = _gt([1], annotations, categories=(1,))
    ours = _ours(gt, [hit, *on_crowd])
    _assert_stats_equal(ours, _reference(gt, [hit, *on_crowd]))
    assert ours["map"] == pytest.approx(1.0, abs=1e-6) and ours["map_per_class"] == {1: pytest.approx(1.0)}
    # without the crowd region the three are false positives ranked first: precision 1/4 at recall 1
    no_crowd = _gt([1], annotations[:1], categories=(1,))
    assert _ours(no_crowd, [hit, *on_crowd])["map"] == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("seed", [4, 5])
def test_random_crowd_ground_truth_equals_pycocotools(seed: int) -> None:
    gt, detections = _dataset(seed, crowd=True)
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 3
    reference = _reference(gt, detections)
    as_normal = {**gt, "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]]}
    assert list(reference.stats) != list(_reference(as_normal, detections).stats)  # the crowd flag matters
    _assert_stats_equal(_ours(gt, detections), reference)


def test_annotation_area_not_box_area_decides_the_range() -> None:
    # Large boxes whose annotation area is medium, and one whose area is 0 (pycocotools: small; torchmetrics alone
    # would substitute the box area and call it large).
    boxes = [_box(10, 10, 160, 160), _box(300, 200, 150, 150)]
    gt = _gt([1], [_annotation(1, 1, boxes[0], area=2000.0), _annotation(1, 1, boxes[1], area=0.0)], categories=(1,))
    detections = [_detection(1, 1, boxes[0], 0.9), _detection(1, 1, boxes[1], 0.8)]
    ours = _ours(gt, detections)
    _assert_stats_equal(ours, _reference(gt, detections))
    assert ours["map_small"] == pytest.approx(1.0) and ours["map_medium"] == pytest.approx(1.0)
    assert ours["map_large"] == -1.0


def test_more_than_100_detections_in_one_image_are_truncated_like_pycocotools() -> None:
    gt, detections = _dataset(6, num_images=8)
    rng = np.random.default_rng(0)
    image_id = next(a["image_id"] for a in gt["annotations"])
    flood = [
        _detection(image_id, CATEGORY_IDS[i % 3], _box(rng.uniform(0, 500), rng.uniform(0, 400), 30, 30), 1 - i / 1000)
        for i in range(150)
    ]  # 150 high-scored detections push that image's true positives past the 100th place
    detections = detections + flood
    reference = _reference(gt, detections)
    assert list(reference.stats) != list(_reference(gt, detections, max_dets=(1, 10, 1000)).stats)
    _assert_stats_equal(_ours(gt, detections), reference)


@pytest.mark.parametrize("levels", [1, 3])
def test_tied_scores_equal_pycocotools_in_image_order(levels: int) -> None:
    gt, detections = _dataset(7, score_levels=levels)
    assert len({d["score"] for d in detections}) <= levels
    _assert_stats_equal(_ours(gt, detections), _reference(gt, detections))


def _all_ranges_gt() -> dict:
    """Ground truth of two classes with small, medium and large objects, and one empty image."""
    annotations = [_annotation(1, 1, _box(10, 10, 10, 10)), _annotation(1, 5, _box(100, 100, 50, 50)),
                   _annotation(2, 1, _box(0, 0, 200, 200))]  # fmt: skip
    return _gt([1, 2, 3], annotations)


def test_no_detections_at_all_gives_zeros_where_pycocotools_crashes() -> None:
    gt = _all_ranges_gt()
    with pytest.raises(IndexError):
        _reference(gt, [])
    ours = _ours(gt, [])
    assert [ours[key] for key in COCO_STATS] == [0.0] * 12
    assert ours["map_50_voc"] == 0.0 and ours["map_per_class"] == {1: 0.0, 5: 0.0} and ours["nonfinite"] == 0
    assert set(ours["pr_curves"]) == {1, 5} and all(not p.any() for _, p in ours["pr_curves"].values())


def test_only_non_finite_detections_give_zeros_and_are_counted() -> None:
    gt = _all_ranges_gt()
    detections = [_detection(1, 1, [float("nan")] * 4, 0.9), _detection(2, 1, _box(0, 0, 200, 200), float("nan"))]
    ours = _ours(gt, detections)
    assert [ours[key] for key in COCO_STATS] == [0.0] * 12 and ours["nonfinite"] == 2


def test_summary_without_any_update_does_not_crash() -> None:
    metric = CocoMAP()
    with pytest.warns(UserWarning, match="before the ``update``"):
        ours = metric.summary()
    assert [ours[key] for key in COCO_STATS] == [-1.0] * 12  # no ground truth: nothing to measure
    assert ours["map_per_class"] == {} and ours["pr_curves"] == {} and ours["map_50_voc"] == 0.0


def test_non_finite_detections_are_dropped_counted_and_reset() -> None:
    gt, detections = _dataset(8)
    target = gt["annotations"][0]
    nan, inf = float("nan"), float("inf")
    broken = [
        _detection(target["image_id"], target["category_id"], [nan] * 4, 1.0),  # pycocotools: a perfect match
        _detection(target["image_id"], target["category_id"], target["bbox"], nan),
        _detection(target["image_id"], 1, [1.0, 2.0, inf, 4.0], 0.5),
        _detection(target["image_id"], 5, [1.0, 2.0, 3.0, 4.0], -inf),
    ]
    metric = CocoMAP()
    ours = _ours(gt, detections + broken, metric)
    assert ours["nonfinite"] == 4
    reference = _reference(gt, detections)
    _assert_stats_equal(ours, reference)
    assert list(_reference(gt, detections + broken[:1]).stats) != list(reference.stats)  # the hazard is real
    metric.reset()
    assert int(metric.nonfinite) == 0


def test_voc_11_point_ap_by_hand() -> None:
    # Class 1: 3 GT; detections by score TP, FP, TP, FP, TP -> (recall, precision) = (1/3, 1), (1/3, 1/2),
    #   (2/3, 2/3), (2/3, 1/2), (1, 3/5). Max precision at recall >= r: 1 for r <= 1/3, 2/3 for r <= 2/3, 3/5 above.
    #   VOC points r = 0, .1, .2, .3 -> 1; .4, .5, .6 -> 2/3; .7, .8, .9, 1 -> 3/5:
    #   (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = (4 + 2 + 2.4) / 11 = 8.4 / 11 = 0.763636…
    #   COCO 101 points: r = 0….33 (34) -> 1, .34….66 (33) -> 2/3, .67…1 (34) -> 3/5: 76.4 / 101 = 0.756436…
    # Class 5: 1 GT; detections FP then TP -> (0, 0), (1, 1/2): 1/2 at every r, so VOC = COCO = 0.5.
    # Class 9: a detection but no GT -> excluded. map_50_voc = (8.4 / 11 + 0.5) / 2 = 0.631818…
    # Every hit is an exact copy of its GT and every miss is disjoint from all GT, so all IoU thresholds agree.
    gt_boxes = [_box(0, 0, 50, 50), _box(100, 0, 50, 50), _box(200, 0, 50, 50)]
    misses = [_box(0, 300, 50, 50), _box(100, 300, 50, 50), _box(200, 300, 50, 50)]
    annotations = [_annotation(1, 1, b) for b in gt_boxes] + [_annotation(1, 5, _box(400, 0, 50, 50))]
    detections = [
        _detection(1, 1, gt_boxes[0], 0.9),
        _detection(1, 1, misses[0], 0.8),
        _detection(1, 1, gt_boxes[1], 0.7),
        _detection(1, 1, misses[1], 0.6),
        _detection(1, 1, gt_boxes[2], 0.5),
        _detection(1, 5, misses[2], 0.95),
        _detection(1, 5, _box(400, 0, 50, 50), 0.4),
        _detection(1, 9, _box(500, 0, 50, 50), 0.3),
    ]
    gt = _gt([1], annotations)
    ours = _ours(gt, detections)
    _assert_stats_equal(ours, _reference(gt, detections))
    assert ours["map_50_voc"] == pytest.approx((8.4 / 11 + 0.5) / 2, abs=1e-9)
    assert ours["map_per_class"] == {1: pytest.approx(76.4 / 101, abs=1e-9), 5: pytest.approx(0.5, abs=1e-9)}
    assert set(ours["pr_curves"]) == {1, 5}
    precision = ours["pr_curves"][1][1]
    # pycocotools divides by tp + fp + eps: "1" is 1 - 2e-16
    assert np.allclose(precision[:34], 1) and np.allclose(precision[34:67], 2 / 3) and np.allclose(precision[67:], 0.6)


def test_voc_11_point_ap_uses_cocoevals_matching_not_the_voc_devkits() -> None:
    # Class 1: GT A, GT B and a crowd region; detections by score: A exactly (TP), a small box inside the crowd
    #   region (IoU with it 0.01, intersection over the detection 1: COCO ignores it), A again (FP), B (TP).
    #   COCO: TP, -, FP, TP -> (1/2, 1), (1/2, 1/2), (1, 2/3): r = 0 … .5 -> 1, .6 … 1 -> 2/3: 28/33 = 0.8485.
    #   The VOC devkit with the crowd region as `difficult` counts the small box as FP (IoU < 0.5):
    #   TP, FP, FP, TP -> 6 points of 1, 5 of 1/2: 8.5/11 = 0.7727.
    # Class 5: GT C and GT D overlapping by IoU 0.6; both detections are exact copies of C. COCO: the second
    #   takes D, still free (IoU 0.6) -> TP, TP: AP 1. VOC assigns it to C (its highest IoU), already found:
    #   FP, and D is never found -> 6/11.
    annotations = [
        _annotation(1, 1, _box(0, 0, 50, 50)),
        _annotation(1, 1, _box(100, 0, 50, 50)),
        _annotation(1, 1, _box(200, 200, 100, 100), crowd=1),
        _annotation(1, 5, _box(400, 0, 40, 40)),
        _annotation(1, 5, _box(410, 0, 40, 40)),
    ]
    detections = [
        _detection(1, 1, _box(0, 0, 50, 50), 0.9),
        _detection(1, 1, _box(240, 240, 10, 10), 0.8),
        _detection(1, 1, _box(0, 0, 50, 50), 0.7),
        _detection(1, 1, _box(100, 0, 50, 50), 0.6),
        _detection(1, 5, _box(400, 0, 40, 40), 0.9),
        _detection(1, 5, _box(400, 0, 40, 40), 0.8),
    ]
    gt = _gt([1], annotations)
    ours = _ours(gt, detections)
    _assert_stats_equal(ours, _reference(gt, detections))
    assert ours["map_50_voc"] == pytest.approx((28 / 33 + 1) / 2, abs=1e-9)
    assert ours["map_50_voc"] != pytest.approx((8.5 / 11 + 6 / 11) / 2, abs=1e-3)  # the devkit's number


def test_pr_curve_figure_is_an_rgb_uint8_image() -> None:
    recall = np.linspace(0, 1, 101)
    curves = {0: (recall, np.where(recall <= 0.5, 1.0, 0.5)), 2: (recall, np.zeros(101))}
    picture = pr_curve_figure(curves, ["cat", "unused", "dog"])
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3 and min(picture.shape[:2]) > 100
    assert (picture != 255).any(axis=2).mean() > 0.01  # something was drawn on the white canvas
    coloured = (picture.max(axis=2).astype(int) - picture.min(axis=2)) > 60
    assert coloured.any()  # the curves are coloured lines, not only black axes and text
    empty = pr_curve_figure({}, [])
    assert empty.dtype == np.uint8 and empty.shape == picture.shape


def test_computing_the_metric_logs_nothing_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """faster-coco-eval logs its whole summary table at INFO; under Hydra's logging that is every validation epoch."""
    gt, detections = _dataset(0)
    with caplog.at_level(logging.INFO):
        _ours(gt, detections)
    assert [r for r in caplog.records if r.levelno < logging.WARNING] == []
