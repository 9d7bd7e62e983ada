"""Backbones for dense prediction: an image `[B, 3, H, W]` in, features `c3`, `c4`, `c5` at strides 8, 16, 32 out."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter

TAPS = ("c3", "c4", "c5")

# Backbones expect ImageNet-normalised input (so pretrained weights work); batches carry RGB in 0..1.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A feature extractor `[B, 3, H, W] -> {"c3", "c4", "c5"}` that declares each tap's channels and stride.

    `body` keeps the parameter names of the network it was cut from (torchvision's `layer1.0.conv1.weight`,
    `features.0.weight`), so classifier state dicts load into it unchanged.
    """

    def __init__(self, body: nn.Module, channels: dict[str, int], strides: dict[str, int]) -> None:
        super().__init__()
        self.body = body
        self.channels = channels
        self.strides = strides

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W] -> {"c3": [B, C3, H/8, W/8], "c4": [B, C4, H/16, W/16], "c5": [B, C5, H/s5, W/s5]}."""
        return self.body(x)


class DenseMaxPool2d(nn.Module):
    """2x2 max-pool at stride 1: [B, C, H, W] -> [B, C, H, W], the strided pool's outputs at even positions.

    Padding bottom/right with -inf keeps the windows at even positions identical to the stride-2 pool's, so a
    VGG whose last pool uses this computes the same c5 as the strided net, only densely (stride 16, not 32).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), kernel_size=2, stride=1)


class VGGFeatures(nn.Module):
    """Runs a VGG `features` stack [B, 3, H, W] and returns the outputs of its 3rd, 4th and 5th stages.

    A stage ends just before the first conv after a max-pool (torchvision's VGG: at the pool itself), or at the
    end of the stack; every stage has one max-pool, so the taps are at strides 8, 16 and 32.
    """

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        ends, pooled = [], False
        for i, m in enumerate(features):
            if isinstance(m, nn.MaxPool2d | DenseMaxPool2d):
                pooled = True
            elif isinstance(m, nn.Conv2d) and pooled:
                ends.append(i - 1)
                pooled = False
        ends.append(len(features) - 1)
        if len(ends) != 5:
            raise ValueError(f"a VGG features stack has 5 stages ending in a max-pool, got {len(ends)}")
        self.features = features
        self.taps = dict(zip(ends[2:], TAPS, strict=True))
        # Each tap has the channels of the last conv before it.
        self.channels = {
            tap: [m.out_channels for m in features[: i + 1] if isinstance(m, nn.Conv2d)][-1]
            for i, tap in self.taps.items()
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out[self.taps[i]] = x
        return out


# 3x3 convs per stage: one at full resolution (the costly one on a CPU), two from stride 2 on, as VGG stacks
# them; on shapes this reached val mIoU 0.90 where one conv a stage plateaued near 0.75 (bench/fcn_shapes.py).
VGG_TINY_CONVS = (1, 2, 2, 2, 2)


def vgg_tiny_features(width: int = 32) -> nn.Sequential:
    """A small VGG `features` stack: five stages of 3x3 conv+BN+ReLU ending in a 2x2 max-pool; widths w..8w.

    Widths w, 2w, 4w, 8w, 8w (capped at 8w as VGG caps at 512 = 8 * 64). A stage's last conv pools before its BN
    and ReLU: max commutes with per-channel increasing maps (ReLU, BN with positive scale), so this computes
    nearly what conv-BN-ReLU-pool does with the elementwise work on a quarter of the pixels (~17% faster on CPU).
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for stage, convs in enumerate(VGG_TINY_CONVS):
        out_channels = width * 2 ** min(stage, 3)
        for k in range(convs):
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            pool = [nn.MaxPool2d(2, 2)] if k == convs - 1 else []
            layers += [conv, *pool, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            in_channels = out_channels
    return nn.Sequential(*layers)


def _vgg(features: nn.Sequential, dilate_last: bool) -> Backbone:
    if dilate_last:
        last_pool = max(i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d))
        features[last_pool] = DenseMaxPool2d()
    body = VGGFeatures(features)
    return Backbone(body, body.channels, strides={"c3": 8, "c4": 16, "c5": 16 if dilate_last else 32})


def _build_vgg_tiny(pretrained: bool, dilate_last: bool, width: int) -> Backbone:
    if pretrained:
        raise ValueError("vgg_tiny has no pretrained weights; train it from scratch or pass weights=<file>")
    return _vgg(vgg_tiny_features(width), dilate_last)


def _build_vgg16(pretrained: bool, dilate_last: bool, width: int) -> Backbone:
    net = models.vgg16(weights=models.VGG16_Weights.IMAGENET1K_V1 if pretrained else None)
    # Wrapping `features` under the same name keeps torchvision's keys (features.0.weight, ...).
    return _vgg(net.features, dilate_last)


def dilate_stage(stage: nn.Module) -> None:
    """Trade a ResNet stage's stride 2 for dilation 2 in place, so its output keeps the input's resolution.

    torchvision's `replace_stride_with_dilation` does this for Bottleneck only (BasicBlock refuses), so this
    covers resnet18/34 too: the strided convs become stride 1 and every 3x3 conv after them is dilated, which
    computes the strided stage's outputs at even positions plus the ones in between (same weights).
    """
    strided = False
    for m in stage.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if m.stride == (2, 2):
            m.stride, strided = (1, 1), True
        elif strided and m.kernel_size == (3, 3):
            m.dilation, m.padding = (2, 2), (2, 2)


def _resnet(ctor: Callable[..., models.ResNet], default: models.WeightsEnum) -> Callable[[bool, bool, int], Backbone]:
    def build(pretrained: bool, dilate_last: bool, width: int) -> Backbone:
        net = ctor(weights=default if pretrained else None)
        if dilate_last:
            dilate_stage(net.layer4)
        body = IntermediateLayerGetter(net, return_layers={"layer2": "c3", "layer3": "c4", "layer4": "c5"})
        expansion = net.layer1[0].expansion
        return Backbone(
            body,
            channels={"c3": 128 * expansion, "c4": 256 * expansion, "c5": 512 * expansion},
            strides={"c3": 8, "c4": 16, "c5": 16 if dilate_last else 32},
        )

    return build


BACKBONES: dict[str, Callable[[bool, bool, int], Backbone]] = {
    "vgg_tiny": _build_vgg_tiny,
    "vgg16": _build_vgg16,
    "resnet18": _resnet(models.resnet18, models.ResNet18_Weights.DEFAULT),
    "resnet34": _resnet(models.resnet34, models.ResNet34_Weights.DEFAULT),
    "resnet50": _resnet(models.resnet50, models.ResNet50_Weights.DEFAULT),
}


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a state dict file (bare, or under a `state_dict` key) into `module`, ignoring keys it lacks.

    A classifier's head (`fc.*`, `classifier.*`) is skipped; a file sharing no key with `module` is an error,
    since loading it would silently leave the net at random init.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ValueError(
            f"no parameter in {path} matches the backbone: expected keys like {list(own)[:3]}, found {list(state)[:3]}"
        )
    wrong = [k for k, v in matched.items() if v.shape != own[k].shape]
    if wrong:
        shapes = (f"{k}: {tuple(matched[k].shape)} in file, {tuple(own[k].shape)} in net" for k in wrong[:3])
        raise ValueError(f"{path} does not fit the backbone: " + "; ".join(shapes))
    # BatchNorm's step counter is absent from older files and nothing reads it in eval or with momentum set.
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if missing:
        warnings.warn(
            f"{path} leaves {len(missing)} of {len(own)} backbone tensors at random init, e.g. {missing[:3]}",
            stacklevel=2,
        )
    module.load_state_dict(matched, strict=False)


def build_backbone(
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    dilate_last: bool = False,
    width: int = 32,
) -> Backbone:
    """Build backbone `name`: [B, 3, H, W] -> {"c3", "c4", "c5"} at strides 8, 16, 32 (c5 at 16 if dilate_last).

    pretrained: torchvision's ImageNet weights (downloaded); weights: a local state dict file instead.
    dilate_last: the last stage keeps stride 16 (dilated ResNet layer4, stride-1 VGG pool5) for finer c5.
    width: vgg_tiny's first-stage channels; the torchvision nets have fixed widths and ignore it.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    if pretrained and weights:
        raise ValueError("pass either pretrained=True (torchvision's weights) or weights=<file>, not both")
    backbone = BACKBONES[name](pretrained, dilate_last, width)
    if weights:
        load_weights(backbone.body, weights)
    return backbone
