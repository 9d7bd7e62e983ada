"""The task's loss: mean cross-entropy over non-void pixels, finite on an all-void batch; old checkpoints' net
configs; FCN-2s/4s on a timm ResNet, ConvNeXt, EfficientNet and MobileNet from the real configs trains."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.tasks.segmentation import SegmentationTask
from tests.helpers import TIMM_STEMS, one_training_step, task_from_config


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


def test_checkpoints_with_the_old_flat_backbone_keys_still_build():
    """FCN configs before the model/backbone group had backbone/width/... directly under net."""
    net = {"_target_": "pipeline.models.fcn.FCN", "num_classes": 3, "variant": "8s", "backbone": "vgg_tiny",
           "width": 8, "pretrained": False, "weights": None, "upsample": "transposed",
           "dilate_last": False}  # fmt: skip
    task = SegmentationTask(net, {"_target_": "torch.optim.SGD", "lr": 0.1}, None, 3, ["bg", "a", "b"])
    assert task.hparams.net["backbone"] == {"name": "vgg_tiny", "width": 8, "pretrained": False, "weights": None,
                                            "dilate_last": False}  # fmt: skip
    assert task(torch.rand(1, 3, 40, 40)).shape == (1, 3, 40, 40)


@pytest.mark.parametrize("name", TIMM_STEMS)
def test_the_fcn_on_a_timm_backbone_built_from_the_configs_trains_a_step(name: str):
    # FCN-2s where the model has a stride-2 tap, else FCN-4s (ConvNeXt's stem is stride 4)
    variant = "fcn4s" if name.startswith("convnext") else "fcn2s"
    task = task_from_config(f"model={variant}", "model/backbone=timm", f"model.net.backbone.name={name}")
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, 64, 64, generator=generator),
             "mask": torch.randint(0, 4, (2, 64, 64), generator=generator)}  # fmt: skip
    loss, changed = one_training_step(task, batch)
    assert math.isfinite(loss)
    # the timm net's stem and the finest (zero-initialised) skip both learn
    finest = "c2" if variant == "fcn4s" else "c1"
    assert {f"net.backbone.body.{TIMM_STEMS[name]}", f"net.score.{finest}.weight"} <= changed
