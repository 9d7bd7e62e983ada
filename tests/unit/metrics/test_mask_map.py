"""Mask mAP: CocoMAP(("bbox", "segm")) against pycocotools' COCOeval("segm") on the RLE results file we write."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.cli.eval import coco_results
from pipeline.metrics.detection import COCO_STATS, CocoMAP, pycocotools_stats
from pipeline.ops.masks import encode_rle

H, W = 96, 128
CATEGORY_IDS = [3, 7]  # non-contiguous: label k is CATEGORY_IDS[k - 1]


def _ellipse(rng: np.random.Generator, scale: float) -> np.ndarray:
    """A random filled ellipse mask bool [H, W] of radius ~scale pixels."""
    cy, cx = rng.uniform(10, H - 10), rng.uniform(10, W - 10)
    ry, rx = rng.uniform(0.5, 1.0, size=2) * scale
    yy, xx = np.mgrid[:H, :W]
    return ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1


def _bbox(mask: np.ndarray) -> list[float]:
    """xywh of a mask's pixels (pixel-edge coordinates), as COCO boxes."""
    rows, cols = np.nonzero(mask)
    return [
        float(cols.min()),
        float(rows.min()),
        float(cols.max() + 1 - cols.min()),
        float(rows.max() + 1 - rows.min()),
    ]


def _dataset(tmp_path: Path, seed: int) -> tuple[Path, list[dict], list[dict]]:
    """An annotation file with RLE instances (small and medium, one crowd region, an image without any), and
    per image the metric's inputs: detections that are shifted/grown/shrunk ground truth, some mislabelled, plus
    false positives."""
    rng = np.random.default_rng(seed)
    images, annotations, per_image = [], [], []
    for image_id in range(1, 13):
        images.append({"id": image_id, "width": W, "height": H, "file_name": f"{image_id}.png"})
        gts = [] if image_id == 5 else [(_ellipse(rng, rng.choice([4.0, 12.0, 30.0])), int(rng.integers(1, 3)), 0)
                                        for _ in range(int(rng.integers(1, 5)))]  # fmt: skip
        if image_id == 7:
            gts.append((_ellipse(rng, 25.0), 1, 1))  # a crowd region
        gts = [g for g in gts if g[0].any()]
        for mask, label, crowd in gts:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORY_IDS[label - 1],
                                "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
                                "area": float(mask.sum()), "bbox": _bbox(mask), "iscrowd": crowd})  # fmt: skip
        det_masks, det_labels, det_scores = [], [], []
        for mask, label, _ in gts:
            moved = np.roll(mask, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
            det_masks.append(moved)
            det_labels.append(label if rng.random() > 0.15 else 3 - label)
            det_scores.append(float(np.float32(rng.uniform(0.3, 1.0))))
        for _ in range(int(rng.integers(0, 3))):  # false positives, some of them tiny
            det_masks.append(_ellipse(rng, rng.choice([2.0, 10.0])))
            det_labels.append(int(rng.integers(1, 3)))
            det_scores.append(float(np.float32(rng.uniform(0.0, 0.6))))
        det_masks = [m for m in det_masks if m.any()]
        per_image.append({
            "image_id": image_id,
            "gt": {
                "boxes": torch.tensor([_bbox(m) for m, _, _ in gts], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([label for _, label, _ in gts], dtype=torch.long),
                "iscrowd": torch.tensor([crowd for _, _, crowd in gts], dtype=torch.long),
                "area": torch.tensor([float(m.sum()) for m, _, _ in gts], dtype=torch.float32),
                "masks": torch.from_numpy(np.stack([m for m, _, _ in gts]) if gts else np.zeros((0, H, W), bool)),
            },
            "pred": {
                # The box of a detection is a little larger than its mask, so box area != mask area.
                "boxes": torch.tensor(np.array([np.add(_bbox(m), [-1, -1, 2, 2]) for m in det_masks]))
                .float()
                .reshape(-1, 4),
                "scores": torch.tensor(det_scores[: len(det_masks)], dtype=torch.float32),
                "labels": torch.tensor(det_labels[: len(det_masks)], dtype=torch.long),
                "masks": torch.from_numpy(np.stack(det_masks) if det_masks else np.zeros((0, H, W), bool)),
            },
        })  # fmt: skip
    path = tmp_path / "instances.json"
    categories = [{"id": c, "name": str(c)} for c in CATEGORY_IDS]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    records = [
        {"image_id": item["image_id"], "label": int(label), "bbox": box, "score": float(score),
         "segmentation": encode_rle(mask)}
        for item in per_image
        for box, score, label, mask in zip(item["pred"]["boxes"].tolist(), item["pred"]["scores"].tolist(),
                                           item["pred"]["labels"].tolist(), item["pred"]["masks"], strict=True)
    ]  # fmt: skip
    return path, per_image, coco_results(records, CATEGORY_IDS)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_and_box_map_equal_pycocotools_on_the_written_results(tmp_path: Path, seed: int, backend: str) -> None:
    annotations, per_image, results = _dataset(tmp_path, seed)
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(results))
    metric = CocoMAP(iou_types=("bbox", "segm"), backend=backend)
    for item in per_image:  # one image per update, as validation does
        metric.update([item["pred"]], [item["gt"]])
    for kind in ("segm", "bbox"):
        ours = metric.summary(kind)
        reference = pycocotools_stats(annotations, predictions, kind)
        assert [ours[k] for k in COCO_STATS] == pytest.approx(reference, abs=1e-6), kind
        assert 0.1 < reference[0] < 0.95 and reference[3] > -1  # real numbers, with a small-area range
    # Loading the file as-is (bbox kept) sizes detections by their boxes: only the area ranges can differ.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        plain = COCOeval(gt, gt.loadRes(str(predictions)), "segm")
        plain.evaluate()
        plain.accumulate()
        plain.summarize()
    segm = metric.summary("segm")
    for i in (0, 1, 2, 6, 7, 8):  # map, map_50, map_75, mar_1, mar_10, mar_100: area "all"
        assert segm[COCO_STATS[i]] == pytest.approx(plain.stats[i], abs=1e-6)


def test_rle_counts_are_text_that_pycocotools_decodes_back() -> None:
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[10:30, 5:50] = True
    rle = encode_rle(mask)
    assert rle["size"] == [H, W] and isinstance(rle["counts"], str)
    assert json.loads(json.dumps(rle)) == rle
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask.numpy())
