"""The detector in channels-last memory order computes what the default order computes, and keeps its order when
weights are loaded into it."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from pipeline.models.yolo import YOLO
from tests.helpers import ANCHORS, LOSS, POST


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
