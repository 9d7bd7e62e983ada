"""YOLO takes c3/c4/c5 from any backbone with those taps at strides 8/16/32 (timm's families too; others are an
error naming the backbone and its taps); in channels-last memory order it computes what the default order computes."""

from __future__ import annotations

import pytest
import timm
import torch
from hydra.utils import instantiate

from pipeline.models.yolo import YOLO
from tests.helpers import ANCHORS, LOSS, POST


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


def _net(channels_last: bool) -> YOLO:
    torch.manual_seed(0)
    net = YOLO(4, {"name": "vgg_tiny", "width": 4}, neck_width=16, input_size=64, loss=instantiate(LOSS),
               postprocess=POST, channels_last=channels_last)  # fmt: skip
    net.slots.set_anchors(ANCHORS)
    return net


def test_channels_last_gives_the_same_outputs_losses_and_gradients() -> None:
    plain, nhwc = _net(False), _net(True)
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2]),
                "iscrowd": torch.zeros(1, dtype=torch.bool)}] * 2  # fmt: skip
    losses = [net.train()(images, targets) for net in (plain, nhwc)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss["loss"].backward()
    for (name, a), b in zip(plain.named_parameters(), nhwc.parameters(), strict=True):  # float32 sums reordered
        scale = float(a.grad.abs().max())
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)
    with torch.no_grad():
        outputs = [net.eval().outputs(images)[0] for net in (plain, nhwc)]
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
