"""YOLO takes c3/c4/c5 from any backbone with those taps at strides 8/16/32 (timm's families too); others are an
error naming the backbone and its taps."""

from __future__ import annotations

import pytest
import timm
import torch

from pipeline.models.yolo import YOLO


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto", "tf_efficientnet_lite0", "mobilenetv3_small_050"])
def test_the_neck_reads_a_timm_backbones_c3_c4_c5(name: str) -> None:
    torch.manual_seed(0)
    net = YOLO(4, {"source": "timm", "name": name}, neck_width=32, input_size=64).eval()
    with torch.device("meta"):  # timm's own account of the features at strides 8, 16, 32
        info = timm.create_model(name, features_only=True).feature_info
    by_stride = dict(zip(info.reduction(), info.channels(), strict=True))
    assert [net.lateral[level][0][0].in_channels for level in range(3)] == [
        by_stride[8] + 16 // 2, by_stride[16] + 32 // 2, by_stride[32]  # plus what the coarser level passes down
    ]  # fmt: skip
    with torch.no_grad():
        levels = net.neck(torch.randn(2, 3, 64, 96))
    assert [tuple(level.shape) for level in levels] == [(2, 8, 8, 12), (2, 16, 4, 6), (2, 32, 2, 3)]


@pytest.mark.parametrize(
    ("backbone", "has"),
    [
        ({"source": "timm", "name": "efficientvit_m0"}, r"c4 \(stride 16\), c5 \(stride 32\)"),  # strides 16..64
        ({"name": "vgg_tiny", "width": 4, "dilate_last": True}, r"c4 \(stride 16\), c5 \(stride 16\)"),
    ],
    ids=["no-c3", "dilated"],
)
def test_a_backbone_without_c3_c4_c5_at_8_16_32_is_an_error_naming_it_and_its_taps(backbone: dict, has: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"needs backbone taps c3, c4, c5 at strides 8/16/32; backbone '{backbone['name']}' has .*{has}",
    ):
        YOLO(4, backbone, input_size=64)
