"""The task's loss: mean cross-entropy over non-void pixels, finite on an all-void batch."""

import torch
import torch.nn.functional as F

from pipeline.tasks.segmentation import SegmentationTask


def _task() -> SegmentationTask:
    net = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 3, "kernel_size": 1}
    return SegmentationTask(net, {"_target_": "torch.optim.SGD", "lr": 0.1}, None, 3, ["bg", "a", "b"])


def test_loss_equals_cross_entropy_ignoring_void_and_is_zero_on_an_all_void_batch():
    task = _task()
    logits = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    masks = torch.randint(0, 3, (2, 5, 5), generator=torch.Generator().manual_seed(1))
    masks[0, :2] = 255
    expected = F.cross_entropy(logits, masks, ignore_index=255)
    assert torch.allclose(task._loss(logits, masks), expected)
    void = torch.full_like(masks, 255)
    assert task._loss(logits, void).item() == 0.0
