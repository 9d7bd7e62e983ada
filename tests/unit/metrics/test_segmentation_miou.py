"""mIoU over one confusion matrix for the whole set, checked against hand-computed numbers."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from pipeline.metrics.segmentation import ConfusionMatrixIoU


def _labels(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows).unsqueeze(0)


def test_miou_matches_hand_computed_confusion_matrix_with_void_pixels():
    # 3 classes; 255 = void. Two "images" accumulated into one matrix.
    target_a = _labels([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred_a = _labels([[0, 1, 1, 1], [2, 0, 2, 1]])
    target_b = _labels([[1, 1, 1, 0]])
    pred_b = _labels([[1, 2, 1, 0]])
    metric = ConfusionMatrixIoU(num_classes=3, ignore_index=255)
    metric.update(pred_a, target_a)
    metric.update(pred_b, target_b)
    # Counted by hand (void pixels dropped): rows = target, cols = prediction.
    expected = torch.tensor([[2, 1, 0], [0, 4, 1], [1, 0, 1]])
    assert torch.equal(metric.compute_confmat(), expected)
    stats = metric.summary()
    # IoU_c = n_cc / (row_c + col_c - n_cc)
    ious = [2 / (3 + 3 - 2), 4 / (5 + 5 - 4), 1 / (2 + 2 - 1)]
    assert stats["per_class_IoU"].tolist() == pytest.approx(ious)
    assert float(stats["mIoU"]) == pytest.approx(sum(ious) / 3)
    assert float(stats["pixel_acc"]) == pytest.approx(7 / 10)


def test_whole_set_miou_differs_from_per_image_mean_and_equals_torchmetrics():
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (6, 9, 11), generator=generator)
    target = torch.randint(0, 4, (6, 9, 11), generator=generator)
    target[:, :2] = 255
    ours = ConfusionMatrixIoU(4, 255)
    reference = MulticlassJaccardIndex(4, ignore_index=255, average="macro")
    for p, t in zip(preds, target, strict=True):
        ours.update(p[None], t[None])
        reference.update(p[None], t[None])
    assert float(ours.summary()["mIoU"]) == pytest.approx(float(reference.compute()), abs=1e-6)
    assert float(ours.compute()) == pytest.approx(float(reference.compute()), abs=1e-6)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    metric = ConfusionMatrixIoU(num_classes=3, ignore_index=255)
    metric.update(_labels([[0, 0, 1]]), _labels([[0, 1, 1]]))  # class 2: neither in target nor prediction
    stats = metric.summary()
    assert math.isnan(float(stats["per_class_IoU"][2]))
    assert float(stats["mIoU"]) == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_logits_are_argmaxed_and_deterministic_mode_gives_the_same_counts():
    logits = torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 5, (2, 16, 16), generator=torch.Generator().manual_seed(2))
    fast = ConfusionMatrixIoU(5)
    fast.update(logits, target)
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = ConfusionMatrixIoU(5)
        deterministic.update(logits, target)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(fast.compute_confmat(), deterministic.compute_confmat())
    assert int(fast.compute_confmat().sum()) == 2 * 16 * 16


def test_label_outside_range_is_a_clear_error():
    metric = ConfusionMatrixIoU(num_classes=3, ignore_index=255)
    with pytest.raises(ValueError, match="label 7 outside 0..2"):
        metric.update(_labels([[0, 1]]), _labels([[7, 1]]))


@pytest.mark.parametrize("ignore_index", [255, None])
def test_confusion_matrix_equals_a_numpy_bincount_of_the_kept_pixels(ignore_index):
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, 30, generator=generator)
    target = torch.randint(0, 5, (3, 40, 30), generator=generator)
    if ignore_index is not None:
        target[torch.rand(3, 40, 30, generator=generator) < 0.2] = ignore_index
    metric = ConfusionMatrixIoU(num_classes=5, ignore_index=ignore_index)
    metric.update(logits, target)
    metric.update(logits.argmax(1), target)  # labels count the same as their logits
    t, p = target.numpy().ravel(), logits.argmax(1).numpy().ravel()
    keep = t != ignore_index if ignore_index is not None else np.ones_like(t, dtype=bool)
    expected = 2 * np.bincount(t[keep] * 5 + p[keep], minlength=25).reshape(5, 5)
    assert np.array_equal(metric.compute_confmat().numpy(), expected)
