"""FCN-32s/16s/8s (Long, Shelhamer & Darrell, 2015) and the skips continued to 4s and 2s: per-pixel class
scores fused from coarse to fine taps."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.backbones import build_backbone

# Each variant scores c5 and then adds the skip taps, coarse to fine; 4s and 2s carry the paper's idea on to the
# stride-4 and stride-2 taps.
VARIANTS = {
    "32s": ("c5",),
    "16s": ("c5", "c4"),
    "8s": ("c5", "c4", "c3"),
    "4s": ("c5", "c4", "c3", "c2"),
    "2s": ("c5", "c4", "c3", "c2", "c1"),
}
UPSAMPLE_MODES = ("transposed", "bilinear", "nearest")


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """ConvTranspose2d weights [channels, channels, k, k] that upsample each channel bilinearly by (k + 1) // 2.

    Channel i maps only to channel i. With stride f, kernel 2f and padding f // 2 the result equals
    `F.interpolate(mode="bilinear", align_corners=False)` away from the borders.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    index = torch.arange(channels)
    weight[index, index] = taps[:, None] * taps[None, :]
    return weight


def transposed_upsampler(channels: int, factor: int) -> nn.Module:
    """A learnable x`factor` upsampling [B, C, H, W] -> [B, C, H * factor, W * factor], initialised bilinear."""
    if factor == 1:
        return nn.Identity()
    if factor % 2:
        raise ValueError(f"transposed upsampling needs an even factor (or 1), got {factor}")
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return up


class FCN(nn.Module):
    """Fully convolutional net: [B, 3, H, W] (ImageNet-normalised, any H, W) -> logits [B, num_classes, H, W].

    variant: "32s" scores c5 only; "16s" adds c4's scores, "8s" also c3's (the skip fusion of the paper), "4s"
    also c2's, "2s" also c1's (the backbone must have those taps).
    upsample: "transposed" (learnable, bilinear init, as in the paper), or a fixed "bilinear"/"nearest".
    backbone: `build_backbone`'s arguments (name, source, pretrained, weights, dilate_last, width).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: dict,
        variant: str = "8s",
        upsample: str = "transposed",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown FCN variant {variant!r}; available: {', '.join(VARIANTS)}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"unknown upsample mode {upsample!r}; available: {', '.join(UPSAMPLE_MODES)}")
        self.num_classes = num_classes
        self.variant = variant
        self.upsample = upsample
        self.taps = VARIANTS[variant]
        self.backbone = build_backbone(**backbone)
        strides = self.backbone.strides
        missing = [tap for tap in self.taps if tap not in strides]
        if missing:
            raise ValueError(
                f"FCN-{variant} needs backbone taps {', '.join(self.taps)}; backbone {self.backbone.name!r} has "
                f"{', '.join(self.backbone.taps)} (no {', '.join(missing)}): use a coarser variant or another backbone"
            )
        self.size_divisor = max(strides.values())

        self.score = nn.ModuleDict({tap: nn.Conv2d(self.backbone.channels[tap], num_classes, 1) for tap in self.taps})
        for tap in self.taps[1:]:
            # Zero skip scores make the net start out as the coarser variant (up to interpolation), as the paper
            # initialises FCN-16s from FCN-32s and FCN-8s from FCN-16s.
            nn.init.zeros_(self.score[tap].weight)
            nn.init.zeros_(self.score[tap].bias)

        if upsample == "transposed":
            # up[tap] takes the fused scores at tap's stride to the next tap's (the input's after the last tap);
            # a dilated c5 shares c4's stride, so that step is the identity.
            next_strides = [strides[tap] for tap in self.taps[1:]] + [1]
            self.up = nn.ModuleDict(
                {
                    tap: transposed_upsampler(num_classes, strides[tap] // s)
                    for tap, s in zip(self.taps, next_strides, strict=True)
                }
            )

    def _upsample(self, score: Tensor, tap: str, size: torch.Size) -> Tensor:
        """Scores [B, K, h, w] at `tap`'s stride -> [B, K, *size] at the next finer stride."""
        if self.upsample == "transposed":
            return self.up[tap](score)
        if score.shape[-2:] == size:
            return score
        align_corners = False if self.upsample == "bilinear" else None
        return F.interpolate(score, size=size, mode=self.upsample, align_corners=align_corners)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> logits [B, num_classes, H, W]."""
        h, w = x.shape[-2:]
        # Zero-pad bottom/right (zero is the mean colour after normalisation) to a multiple of the coarsest stride,
        # so each tap's grid divides the input exactly and every upsampling lands on the next tap's size.
        x = F.pad(x, (0, (-w) % self.size_divisor, 0, (-h) % self.size_divisor))
        features = self.backbone(x)
        score = self.score[self.taps[0]](features[self.taps[0]])
        for coarse, fine in pairwise(self.taps):
            skip = self.score[fine](features[fine])
            score = self._upsample(score, coarse, skip.shape[-2:]) + skip
        score = self._upsample(score, self.taps[-1], x.shape[-2:])
        return score[..., :h, :w]
