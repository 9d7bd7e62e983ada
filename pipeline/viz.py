"""Pictures people would rather look at than read: masks overlaid on images, side-by-side panels."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import draw_segmentation_masks, make_grid


def palette(num_classes: int) -> torch.Tensor:
    """A fixed, distinguishable colour per class as uint8 [C, 3]; class 0 (background) is black."""
    generator = torch.Generator().manual_seed(1234)
    colours = torch.randint(64, 256, (num_classes, 3), generator=generator, dtype=torch.uint8)
    base = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]])
    colours[: min(num_classes, len(base))] = base[: min(num_classes, len(base))].to(torch.uint8)
    return colours


def overlay(image: torch.Tensor, mask: torch.Tensor, num_classes: int, alpha: float = 0.5) -> torch.Tensor:
    """Blend non-background classes of a label mask [H, W] onto an image [3, H, W] (uint8 or float 0..1)."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    image, mask = image.cpu(), mask.cpu()
    present = [c for c in range(1, num_classes) if bool((mask == c).any())]
    if not present:
        return image
    masks = torch.stack([mask == c for c in present])
    colours = [tuple(int(v) for v in palette(num_classes)[c]) for c in present]
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=colours)


def comparison_panel(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> np.ndarray:
    """One row per image: input | ground truth | prediction, as uint8 [H, W, 3] for an image artifact."""
    tiles = []
    for image, target, pred in zip(images, targets, preds, strict=True):
        plain = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
        tiles += [plain, overlay(plain, target, num_classes), overlay(plain, pred, num_classes)]
    grid = make_grid(tiles, nrow=3, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).numpy()
