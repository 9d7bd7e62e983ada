"""A YOLOv3-style detector: backbone taps at strides 8/16/32, a top-down neck, one head per stride; losses in
training, detections in eval (torchvision's detection model contract)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from pipeline.models.slots import Slots, detections
from pipeline.ops.boxes import flatten_levels

TAPS = ("c3", "c4", "c5")
# Initial objectness probability: most slots hold no object, so start near "no object" (as RetinaNet's prior).
OBJECTNESS_PRIOR = 0.01


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + LeakyReLU(0.1), the YOLOv3 building block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.1, inplace=True),
    )


class YOLO(nn.Module):
    """images [B, 3, H, W] RGB in 0..1 (H, W multiples of 32) -> in training mode, given targets, the loss dict
    (`loss`: built from `model.loss`, e.g. `pipeline.losses.yolo.YOLOLoss`); in eval mode per image detections
    {"boxes" [D, 4] x1, y1, x2, y2 input pixels, "scores" [D], "labels" [D] 1..K}, and with targets (the loss dict,
    the detections) of one pass.

    `num_classes` counts the background (labels 1..K, as torchvision's). The heads give, per stride 8/16/32, slot
    predictions [B, A, H_s, W_s, 5 + K]: tx, ty, tw, th, objectness logit and K class logits for each of A anchors
    (`outputs`); `slots` holds the anchors (set by the task: given or k-means, at `input_size` pixels), the grids
    and the decoding; `postprocess` the keyword arguments of `ops.nms.select_detections`. `backbone` holds
    `build_backbone`'s arguments; `neck_width` is the channel count of the coarsest neck level (finer levels halve
    it, as YOLOv3's 512/256/128); any backbone with taps c3/c4/c5 at strides 8/16/32 serves (timm's too).
    Targets: per image {"boxes" [N, 4], "labels" [N], "iscrowd" [N]}.
    `channels_last`: weights and activations in NHWC memory order: the same numbers to float32 rounding, computed
    by the CPU's NHWC convolutions.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: dict,
        num_anchors: int = 3,
        neck_width: int = 128,
        *,
        input_size: int,
        loss: nn.Module | None = None,
        postprocess: Mapping[str, float] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(**backbone)
        self.strides = [self.backbone.strides.get(tap) for tap in TAPS]
        if self.strides != [8, 16, 32]:
            taps = ", ".join(f"{tap} (stride {stride})" for tap, stride in self.backbone.strides.items())
            raise ValueError(
                f"the detector needs backbone taps c3, c4, c5 at strides 8/16/32; backbone {self.backbone.name!r} "
                f"has {taps} (dilate_last?)"
            )
        self.num_classes, self.num_anchors = num_classes, num_anchors
        self.slots = Slots(self.strides, num_anchors, input_size)
        self.loss = loss
        self.postprocess = dict(postprocess or {})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        foreground = num_classes - 1  # class logits for labels 1..K only
        self.widths = widths = [neck_width // 4, neck_width // 2, neck_width]  # strides 8, 16, 32
        channels = [self.backbone.channels[tap] for tap in TAPS]
        self.lateral = nn.ModuleList()
        self.reduce = nn.ModuleList()
        for level in range(3):
            from_coarser = widths[level + 1] // 2 if level < 2 else 0
            self.lateral.append(
                nn.Sequential(
                    conv_bn_act(channels[level] + from_coarser, widths[level], 1),
                    conv_bn_act(widths[level], widths[level], 3),
                )
            )
            # What the level passes up to the next finer one (YOLOv3's 1x1 conv before upsampling).
            self.reduce.append(conv_bn_act(widths[level], widths[level] // 2, 1) if level > 0 else nn.Identity())
        self.heads = nn.ModuleList(
            nn.Sequential(conv_bn_act(w, 2 * w, 3), nn.Conv2d(2 * w, num_anchors * (5 + foreground), 1)) for w in widths
        )
        for head in self.heads:
            bias = head[-1].bias.view(num_anchors, 5 + foreground)
            with torch.no_grad():
                bias.zero_()
                bias[:, 4] = math.log(OBJECTNESS_PRIOR / (1 - OBJECTNESS_PRIOR))
        # Loading weights copies into these tensors and keeps their order; inputs are reordered in `outputs`.
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def neck(self, x: Tensor) -> list[Tensor]:
        """x: [B, 3, H, W] -> neck levels [[B, W_8, H/8, W/8], [B, W_16, H/16, W/16], [B, W_32, H/32, W/32]]."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"detector input must be a multiple of 32 in height and width, got {tuple(x.shape[-2:])}")
        features = self.backbone(x)
        levels: list[Tensor] = [torch.empty(0)] * 3
        coarser = None
        for level in (2, 1, 0):
            feature = features[TAPS[level]]
            if coarser is not None:
                feature = torch.cat([feature, F.interpolate(coarser, size=feature.shape[-2:], mode="nearest")], 1)
            levels[level] = self.lateral[level](feature)
            coarser = self.reduce[level](levels[level])
        return levels

    def head(self, levels: list[Tensor]) -> list[Tensor]:
        """Neck levels -> per stride 8/16/32 slot predictions [B, A, H_s, W_s, 5 + K]."""
        outputs = []
        for level, head in zip(levels, self.heads, strict=True):
            out = head(level)
            b, _, h, w = out.shape
            outputs.append(out.view(b, self.num_anchors, -1, h, w).permute(0, 1, 3, 4, 2))
        return outputs

    def outputs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """images [B, 3, H, W] in 0..1 -> (per stride slot predictions [B, A, H_s, W_s, 5 + K], the neck levels)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        levels = self.neck((images - self.mean) / self.std)
        return self.head(levels), levels

    def forward(
        self, images: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]] | tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Losses in training mode, detections in eval mode (with targets: the losses too); see the class."""
        outputs, _ = self.outputs(images)
        grid = self.slots.grid(outputs, tuple(images.shape[-2:]))
        pred = flatten_levels(outputs)
        if self.training:
            return self.loss(pred, grid, training_targets(targets))
        found = detections(pred, grid, self.postprocess)
        return found if targets is None else (self.loss(pred, grid, targets), found)


def training_targets(targets: list[dict[str, Tensor]] | None) -> list[dict[str, Tensor]]:
    """The targets a net needs in training mode (it returns their losses); a clear error where there are none."""
    if targets is None:
        raise ValueError("in training mode the net needs targets (it returns their losses)")
    return targets
