"""Backbones for dense prediction: an image `[B, 3, H, W]` in, features `c1`..`c5` at strides 2, 4, 8, 16, 32 out.

This package's own (vgg_tiny) and torchvision's (vgg16, resnet18/34/50) nets have all five taps; a timm model
(`source="timm"`, any of `timm.list_models()`) has those of the five strides its family has (a ConvNeXt starts
at c2, a ViT has c4 alone), read from timm's `feature_info`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter

# Tap c<k> is the deepest feature at stride 2**k; a net's taps are those of these strides it has.
TAPS = ("c1", "c2", "c3", "c4", "c5")
TAP_STRIDES = {tap: 2**k for k, tap in enumerate(TAPS, start=1)}
SOURCES = ("builtin", "timm")

# Backbones expect ImageNet-normalised input (so pretrained weights work); batches carry RGB in 0..1.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A feature extractor `[B, 3, H, W] -> {tap: [B, channels[tap], H / strides[tap], W / strides[tap]]}`.

    `channels` and `strides` declare the taps (keys in TAPS order, fine to coarse); `name` is the net's. `body`
    returns the taps as a dict, or as a list in that order (timm's features_only nets), and keeps the parameter
    names of the network it was cut from (torchvision's `layer1.0.conv1.weight`, timm's), so classifier state
    dicts load into it. Input is ImageNet-normalised; a body trained on other statistics (`mean`, `std`, e.g.
    timm's Inception-style 0.5) gets its own normalisation back by a fixed per-channel affine map first.
    """

    def __init__(
        self,
        body: nn.Module,
        channels: dict[str, int],
        strides: dict[str, int],
        name: str = "",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.body = body
        self.channels = channels
        self.strides = strides
        self.name = name
        self.taps = tuple(channels)
        self.renormalize = (
            nn.Identity() if (tuple(mean), tuple(std)) == (IMAGENET_MEAN, IMAGENET_STD) else Renormalize(mean, std)
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W] -> {tap: [B, channels[tap], H / strides[tap], W / strides[tap]]} for each of `taps`."""
        features = self.body(self.renormalize(x))
        if isinstance(features, Mapping):
            return dict(features)
        return dict(zip(self.taps, features, strict=True))


class Renormalize(nn.Module):
    """[B, 3, H, W] ImageNet-normalised -> the same pixels normalised by `mean`, `std` (no parameters)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        source_mean, source_std, mean, std = (
            torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD, mean, std)
        )
        # (x * s0 + m0 - m) / s as one multiply-add; buffers not persistent, so state dict keys stay the body's.
        self.register_buffer("scale", source_std / std, persistent=False)
        self.register_buffer("shift", (source_mean - mean) / std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class DenseMaxPool2d(nn.Module):
    """2x2 max-pool at stride 1: [B, C, H, W] -> [B, C, H, W], the strided pool's outputs at even positions.

    Padding bottom/right with -inf keeps the windows at even positions identical to the stride-2 pool's, so a
    VGG whose last pool uses this computes the same c5 as the strided net, only densely (stride 16, not 32).
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), kernel_size=2, stride=1)


class VGGFeatures(nn.Module):
    """Runs a VGG `features` stack [B, 3, H, W] and returns the outputs of its five stages as c1..c5.

    A stage ends just before the first conv after a max-pool (torchvision's VGG: at the pool itself), or at the
    end of the stack; every stage has one max-pool, so the taps are at strides 2, 4, 8, 16 and 32.
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
        self.taps = dict(zip(ends, TAPS, strict=True))
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


def _vgg(features: nn.Sequential, dilate_last: bool, name: str) -> Backbone:
    if dilate_last:
        last_pool = max(i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d))
        features[last_pool] = DenseMaxPool2d()
    body = VGGFeatures(features)
    return Backbone(body, body.channels, _strides(dilate_last), name)


def _strides(dilate_last: bool) -> dict[str, int]:
    """A five-stage net's tap strides: 2..32, or c5 at 16 with the last stage dilated."""
    return {**TAP_STRIDES, "c5": 16} if dilate_last else dict(TAP_STRIDES)


def _build_vgg_tiny(pretrained: bool, dilate_last: bool, width: int) -> Backbone:
    if pretrained:
        raise ValueError("vgg_tiny has no pretrained weights; train it from scratch or pass weights=<file>")
    return _vgg(vgg_tiny_features(width), dilate_last, "vgg_tiny")


def _build_vgg16(pretrained: bool, dilate_last: bool, width: int) -> Backbone:
    net = models.vgg16(weights=models.VGG16_Weights.IMAGENET1K_V1 if pretrained else None)
    # Wrapping `features` under the same name keeps torchvision's keys (features.0.weight, ...).
    return _vgg(net.features, dilate_last, "vgg16")


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
        # c1 is the stem's ReLU before the max-pool (stride 2); the getter keeps every module up to layer4 under
        # its own name, so the state dict's keys are those of the stride-8..32 getter before it.
        layers = {"relu": "c1", "layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
        body = IntermediateLayerGetter(net, return_layers=layers)
        expansion = net.layer1[0].expansion
        channels = {"c1": 64, "c2": 64 * expansion, "c3": 128 * expansion, "c4": 256 * expansion, "c5": 512 * expansion}
        return Backbone(body, channels, _strides(dilate_last), ctor.__name__)

    return build


BACKBONES: dict[str, Callable[[bool, bool, int], Backbone]] = {
    "vgg_tiny": _build_vgg_tiny,
    "vgg16": _build_vgg16,
    "resnet18": _resnet(models.resnet18, models.ResNet18_Weights.DEFAULT),
    "resnet34": _resnet(models.resnet34, models.ResNet34_Weights.DEFAULT),
    "resnet50": _resnet(models.resnet50, models.ResNet50_Weights.DEFAULT),
}


def _timm_taps(name: str) -> dict[str, int]:
    """Tap -> index in timm's `feature_info` of model `name`: the deepest feature at each of the taps' strides.

    Read from the model built on the meta device (no memory, no init, no download): every timm family builds
    there, and its `feature_info` lists all features whatever `out_indices` selects.
    """
    import timm

    with torch.device("meta"):
        probe = timm.create_model(name, features_only=True)
    deepest = {info["reduction"]: index for index, info in enumerate(probe.feature_info.info)}
    taps = {tap: deepest[stride] for tap, stride in TAP_STRIDES.items() if stride in deepest}
    if not taps:
        strides = sorted(deepest)
        raise ValueError(f"timm model {name!r} has no features at strides {list(TAP_STRIDES.values())}: {strides}")
    return taps


def _build_timm(name: str, pretrained: bool, dilate_last: bool) -> Backbone:
    """timm's `features_only` net for `name` at the taps it has; `dilate_last`: timm's `output_stride=16`."""
    # Imported here: timm adds half a second to every start, and most configs never need it.
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; timm.list_models('*<part of the name>*') lists them")
    taps = _timm_taps(name)
    stride = {"output_stride": 16} if dilate_last else {}
    try:
        net = timm.create_model(
            name, features_only=True, out_indices=tuple(taps.values()), pretrained=pretrained, **stride
        )
    except (TypeError, AssertionError) as error:
        if not dilate_last:
            raise
        # timm's nets without dilation refuse output_stride: an unknown keyword, or an assert (often without text).
        why = f": {error}" if str(error) else f" ({type(error).__name__} in its constructor)"
        raise ValueError(f"timm model {name!r} does not support output_stride=16 (dilate_last=true){why}") from error
    except OSError as error:
        if not pretrained:
            raise
        raise OSError(
            f"timm's pretrained weights for {name!r} could not be fetched from the Hugging Face Hub ({error}); "
            "without network access pass weights=<state dict file> instead of pretrained=true"
        ) from error
    strides = dict(zip(taps, net.feature_info.reduction(), strict=True))
    if dilate_last and strides.get("c5") != 16:
        raise ValueError(f"timm model {name!r} kept no stride-32 tap at 16 with output_stride=16: taps {strides}")
    channels = dict(zip(taps, net.feature_info.channels(), strict=True))
    config = net.pretrained_cfg
    return Backbone(net, channels, strides, name, config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD))


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
    source: str = "builtin",
) -> Backbone:
    """Build backbone `name`: [B, 3, H, W] -> {"c1".."c5"} at strides 2..32 (c5 at 16 if dilate_last).

    source: "builtin" (BACKBONES: vgg_tiny and torchvision's nets, all five taps) or "timm" (any timm model: the
    taps at the strides it has, channels and strides from its `feature_info`).
    pretrained: torchvision's ImageNet weights or timm's own (downloaded); weights: a local state dict file instead.
    dilate_last: the last stage keeps stride 16 (dilated ResNet layer4, stride-1 VGG pool5, timm's
    output_stride=16) for a finer c5.
    width: vgg_tiny's first-stage channels; the other nets have fixed widths and ignore it.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown backbone source {source!r}; available: {', '.join(SOURCES)}")
    if source == "builtin" and name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)} (or source=timm)")
    if pretrained and weights:
        raise ValueError("pass either pretrained=True (the library's weights) or weights=<file>, not both")
    if source == "timm":
        backbone = _build_timm(name, pretrained, dilate_last)
    else:
        backbone = BACKBONES[name](pretrained, dilate_last, width)
    if weights:
        load_weights(backbone.body, weights)
    return backbone
