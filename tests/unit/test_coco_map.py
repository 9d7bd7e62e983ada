"""CocoMAP equals pycocotools' COCOeval on the same detections, edge cases included; VOC AP and PR curves."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.metrics.detection import COCO_STATS, CocoMAP, pr_curve_figure

CATEGORY_IDS = [1, 2, 3]


def _dataset(seed: int, num_images: int = 30, crowd: bool = False) -> tuple[dict, list[dict]]:
    """A COCO ground truth (small/medium/large boxes, some images empty) and detections: jittered GT + noise."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.png"})
        for _ in range(int(rng.integers(0, 6)) if image_id % 7 else 0):  # every 7th image has no ground truth
            w, h = (float(v) for v in rng.choice([12, 40, 150], size=2) * rng.uniform(0.7, 1.3, size=2))
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            category = int(rng.choice(CATEGORY_IDS))
            is_crowd = int(crowd and rng.random() < 0.15)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h * float(rng.uniform(0.6, 1.0)),
                                "iscrowd": is_crowd})  # fmt: skip
            if rng.random() < 0.8:  # a detection near it, sometimes of the wrong class
                jitter = rng.normal(0, 0.1, size=4) * [w, h, w, h]
                label = category if rng.random() < 0.85 else int(rng.choice(CATEGORY_IDS))
                box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
                detections.append({"image_id": image_id, "category_id": label, "bbox": box,
                                   "score": float(rng.uniform(0.3, 1.0))})  # fmt: skip
        if image_id % 5:  # false positives (none on every 5th image)
            for _ in range(int(rng.integers(0, 4))):
                w, h = float(rng.uniform(5, 200)), float(rng.uniform(5, 200))
                detections.append({"image_id": image_id, "category_id": int(rng.choice(CATEGORY_IDS)),
                                   "bbox": [float(rng.uniform(0, 400)), float(rng.uniform(0, 300)), w, h],
                                   "score": float(rng.uniform(0.0, 0.6))})  # fmt: skip
    gt = {"images": images, "annotations": annotations, "info": {},
          "categories": [{"id": c, "name": str(c)} for c in CATEGORY_IDS]}  # fmt: skip
    return gt, detections


def _reference(gt: dict, detections: list[dict]) -> list[float]:
    """pycocotools' 12 numbers (loadRes mutates its input: give it a copy)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def _ours(gt: dict, detections: list[dict], metric: CocoMAP | None = None) -> dict:
    """Feed CocoMAP one image per update, in image id order, as a validation loop does."""
    metric = metric or CocoMAP()
    for image in sorted(gt["images"], key=lambda i: i["id"]):
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        dets = [d for d in detections if d["image_id"] == image["id"]]
        metric.update(
            [{"boxes": torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4),
              "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
              "labels": torch.tensor([d["category_id"] for d in dets], dtype=torch.long)}],
            [{"boxes": torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.long),
              "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.long),
              "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32)}],
        )  # fmt: skip
    return metric.summary()


def _as_float32(detections: list[dict]) -> list[dict]:
    """Detections as the metric sees them (float32 boxes and scores), so both sides get the same numbers."""
    out = copy.deepcopy(detections)
    for d in out:
        d["bbox"] = torch.tensor(d["bbox"], dtype=torch.float32).tolist()
        d["score"] = float(torch.tensor(d["score"], dtype=torch.float32))
    return out


def _assert_equal(ours: dict, reference: list[float]) -> None:
    assert [ours[k] for k in COCO_STATS] == pytest.approx(reference, abs=1e-6)


def _f32(gt: dict) -> dict:
    out = copy.deepcopy(gt)
    for a in out["annotations"]:
        a["bbox"] = torch.tensor(a["bbox"], dtype=torch.float32).tolist()
        a["area"] = float(torch.tensor(a["area"], dtype=torch.float32))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocotools_on_a_realistic_set(seed: int) -> None:
    gt, detections = _dataset(seed)
    gt, detections = _f32(gt), _as_float32(detections)
    reference = _reference(gt, detections)
    assert reference[3] > -1 and reference[4] > -1 and reference[5] > -1  # all three area ranges are exercised
    _assert_equal(_ours(gt, detections), reference)


def test_equals_pycocotools_with_crowd_ground_truth() -> None:
    gt, detections = _dataset(3, crowd=True)
    gt, detections = _f32(gt), _as_float32(detections)
    assert any(a["iscrowd"] for a in gt["annotations"])
    # detections on the crowd boxes are ignored, not false positives: the result differs from crowd-as-normal
    normal = copy.deepcopy(gt)
    for a in normal["annotations"]:
        a["iscrowd"] = 0
    assert _reference(gt, detections) != _reference(normal, detections)
    _assert_equal(_ours(gt, detections), _reference(gt, detections))


def test_equals_pycocotools_with_more_than_100_detections_and_tied_scores() -> None:
    gt, detections = _dataset(4, num_images=6)
    gt = _f32(gt)
    rng = np.random.default_rng(0)
    for i in range(150):  # 150 on image 1, scores in 5 tied groups
        x, y = float(rng.uniform(0, 500)), float(rng.uniform(0, 400))
        detections.append({"image_id": 1, "category_id": CATEGORY_IDS[i % 3], "bbox": [x, y, 40.0, 30.0],
                           "score": [0.9, 0.7, 0.5, 0.3, 0.1][i % 5]})  # fmt: skip
    detections = _as_float32(detections)
    _assert_equal(_ours(gt, detections), _reference(gt, detections))


def test_no_detections_at_all_reports_zeros_where_pycocotools_crashes() -> None:
    gt, _ = _dataset(5)
    with pytest.raises(IndexError):  # pycocotools' loadRes cannot take an empty list
        _reference(gt, [])
    ours = _ours(_f32(gt), [])
    assert all(ours[k] in (0.0, -1.0) for k in COCO_STATS) and ours["map"] == 0.0 and ours["mar_100"] == 0.0
    assert ours["map_50_voc"] == 0.0 and set(ours["map_per_class"].values()) == {0.0}


def test_non_finite_detections_are_dropped_and_counted() -> None:
    gt, detections = _dataset(6)
    gt, detections = _f32(gt), _as_float32(detections)
    broken = copy.deepcopy(detections)
    target = gt["annotations"][0]
    broken += [
        {
            "image_id": target["image_id"],
            "category_id": target["category_id"],
            "bbox": [float("nan")] * 4,
            "score": 1.0,
        },
        {"image_id": target["image_id"], "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0], "score": float("nan")},
        {"image_id": target["image_id"], "category_id": 2, "bbox": [1.0, 2.0, float("inf"), 4.0], "score": 0.5},
    ]
    ours = _ours(gt, broken)
    assert ours["nonfinite"] == 3
    _assert_equal(ours, _reference(gt, detections))


def test_per_class_ap_voc_11_point_and_pr_curves_by_hand() -> None:
    # One class, 2 ground-truth boxes, 3 detections by score: hit, miss, hit -> precision 1, 1/2, 2/3 at
    # recall 0.5, 0.5, 1. Interpolated precision: 1 for recall <= 0.5, 2/3 above.
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "info": {}, "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400,
                           "iscrowd": 0}]}  # fmt: skip
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [30, 0, 20, 20], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.7},
    ]
    ours = _ours(gt, detections)
    _assert_equal(ours, _reference(gt, detections))
    # VOC 11-point: recalls 0, .1, ..., .5 -> 1 (6 points); .6, ..., 1.0 -> 2/3 (5 points).
    assert ours["map_50_voc"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # COCO 101-point at IoU 0.5: 51 points at 1, 50 at 2/3; exact boxes -> the same at every IoU threshold.
    assert ours["map_per_class"] == {1: pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)}
    recall, precision = ours["pr_curves"][1]
    assert recall.shape == precision.shape == (101,)
    assert precision[:51] == pytest.approx([1.0] * 51) and precision[51:] == pytest.approx([2 / 3] * 50)
    picture = pr_curve_figure(ours["pr_curves"], ["background", "a"])
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3


def test_images_without_detections_or_ground_truth_still_count() -> None:
    gt, detections = _dataset(7)
    gt = _f32(gt)
    detections = _as_float32([d for d in detections if d["image_id"] % 3])  # every 3rd image: no detections
    assert any(not any(a["image_id"] == i["id"] for a in gt["annotations"]) for i in gt["images"])
    _assert_equal(_ours(gt, detections), _reference(gt, detections))
