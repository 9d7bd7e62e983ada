"""The COCO evaluator of the detection tasks: prediction records as given (masks as RLE that pycocotools decodes
back), kept only when collecting; the confusion matrix as COCOeval's matching gives it; the records of every
rank after a reduction."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline.metrics.coco_evaluator import CocoEvaluator
from tests.helpers import cocoeval_confusion


def _image(generator: torch.Generator, count: int, masks: bool) -> dict[str, torch.Tensor]:
    xy = torch.rand(count, 2, generator=generator) * 40
    wh = 4 + torch.rand(count, 2, generator=generator) * 20
    out = {"boxes": torch.cat([xy, wh], 1), "scores": torch.rand(count, generator=generator),
           "labels": torch.randint(1, 4, (count,), generator=generator)}  # fmt: skip
    if masks:
        out["masks"] = torch.rand(count, 64, 64, generator=generator) > 0.5
    return out


def test_records_hold_each_detection_as_given_and_only_when_collecting() -> None:
    generator = torch.Generator().manual_seed(0)
    preds = [_image(generator, 3, masks=True), _image(generator, 0, masks=True)]
    targets = [{**_image(generator, 2, masks=True), "iscrowd": torch.zeros(2, dtype=torch.bool)} for _ in preds]
    evaluator = CocoEvaluator(4, ("bbox", "segm"), shown_score=0.3)
    evaluator.update(preds, targets, [5, 6])
    assert evaluator.records == []  # not collecting (a validation while fitting)
    evaluator.reset(collect=True)
    evaluator.update(preds, targets, [5, 6])
    assert [r["image_id"] for r in evaluator.records] == [5, 5, 5]
    for record, box, score, label, mask in zip(evaluator.records, *preds[0].values(), strict=True):
        assert record["bbox"] == box.tolist() and record["score"] == float(score) and record["label"] == int(label)
        np.testing.assert_array_equal(mask_utils.decode(record["segmentation"]), mask.numpy().astype(np.uint8))


def test_the_confusion_matrix_is_cocoevals_matching_summed_over_the_ranks() -> None:
    generator = torch.Generator().manual_seed(1)
    preds = [_image(generator, 6, masks=False) for _ in range(3)]
    targets = [{**_image(generator, 4, masks=False), "iscrowd": torch.tensor([False, False, True, False])}
               for _ in preds]  # fmt: skip
    evaluator = CocoEvaluator(4, ("bbox",), shown_score=0.3)
    evaluator.reset(collect=True)
    evaluator.update(preds, targets, [1, 2, 3])

    def xyxy(boxes: torch.Tensor) -> torch.Tensor:
        return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)

    images = [(torch.cat([xyxy(p["boxes"]), p["scores"][:, None], p["labels"][:, None]], 1).double().numpy(),
               torch.cat([xyxy(t["boxes"]), t["labels"][:, None], t["iscrowd"][:, None]], 1).double().numpy())
              for p, t in zip(preds, targets, strict=True)]  # fmt: skip
    reference = cocoeval_confusion(images, 0.3)
    stats = evaluator.compute(1, lambda counts: counts * 2)  # as two ranks with the same counts would sum
    np.testing.assert_array_equal(evaluator.confusion.numpy(), 2 * reference)
    assert set(stats) == {"bbox"} and 0.0 <= stats["bbox"]["map"] <= 1.0
    assert len(evaluator.records) == 18  # one rank: nothing to gather
