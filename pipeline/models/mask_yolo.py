"""Instance segmentation as Mask R-CNN extends Faster R-CNN: the YOLO detector plus a per-box mask branch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.slots import detections
from pipeline.models.yolo import YOLO, training_targets
from pipeline.ops.boxes import flatten_levels
from pipeline.ops.masks import masks_to_original
from pipeline.ops.roi import multiscale_roi_align


class MaskHead(nn.Module):
    """Mask R-CNN's mask FCN: RoI features [R, C, S, S] -> 4 conv3x3 -> transposed conv x2 -> logits [R, K, 2S, 2S]."""

    def __init__(self, in_channels: int, num_classes: int, width: int, num_convs: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(width, width, 2, stride=2), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, num_classes, 1))
        self.layers = nn.Sequential(*layers)
        for module in self.layers:
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, features: Tensor) -> Tensor:
        """features: [R, C, S, S] -> per-class mask logits [R, K, 2S, 2S]."""
        return self.layers(features)


class MaskYOLO(YOLO):
    """YOLO plus a mask branch: per box, RoIAlign of the neck (level chosen by box size, as FPN) -> MaskHead.

    Same contract as YOLO, with "masks" [D, 2S, 2S] in each detection (box-relative probabilities of its own class)
    and targets carrying "masks" uint8 [N, H, W] and "generator" (the mask RoIs' draw); the loss (`model.loss`,
    e.g. `pipeline.losses.mask.MaskYOLOLoss`) reads the levels along boxes through `mask_logits`, which samples
    at pixel centres as the mask targets do (`ops.roi.multiscale_roi_align`). `mask_width` is the channel count
    the levels are projected to and the head's width; `roi_size` the RoIAlign output (masks come out at twice that).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: dict,
        num_anchors: int = 3,
        neck_width: int = 128,
        mask_width: int = 32,
        roi_size: int = 14,
        **detector: Any,
    ) -> None:
        super().__init__(num_classes, backbone, num_anchors, neck_width, **detector)
        self.mask_lateral = nn.ModuleList(nn.Conv2d(w, mask_width, 1) for w in self.widths)
        self.roi_size = roi_size
        self.mask_head = MaskHead(mask_width, num_classes - 1, mask_width)
        if self.channels_last:  # the mask layers too (YOLO converted only its own)
            self.to(memory_format=torch.channels_last)

    def forward(
        self, images: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]] | tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """As YOLO's, the detections with their masks; the loss reads the levels along boxes via `mask_logits`."""
        outputs, levels = self.outputs(images)
        grid = self.slots.grid(outputs, tuple(images.shape[-2:]))
        pred = flatten_levels(outputs)

        def mask_logits(rois: list[Tensor]) -> Tensor:
            return self.mask_logits(levels, rois)

        if self.training:
            return self.loss(pred, grid, training_targets(targets), mask_logits)
        losses = None if targets is None else self.loss(pred, grid, targets, mask_logits)
        found = self._with_masks(detections(pred, grid, self.postprocess), levels)
        return found if losses is None else (losses, found)

    def mask_logits(self, levels: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Per-class mask logits [R, K, 2S, 2S] for each image's boxes [R_b, 4] (x1, y1, x2, y2 input pixels)."""
        features = [lateral(level) for lateral, level in zip(self.mask_lateral, levels, strict=True)]
        return self.mask_head(multiscale_roi_align(features, boxes, self.strides, self.roi_size))

    def _with_masks(self, found: list[dict[str, Tensor]], levels: list[Tensor]) -> list[dict[str, Tensor]]:
        """Add "masks" [D, 2S, 2S]: each detection's box-relative mask probabilities for its own class."""
        logits = self.mask_logits(levels, [d["boxes"] for d in found])
        labels = torch.cat([d["labels"] for d in found])
        probs = logits[torch.arange(len(logits), device=logits.device), labels - 1].sigmoid()
        for det, masks in zip(found, probs.split([len(d["boxes"]) for d in found]), strict=True):
            det["masks"] = masks
        return found

    @staticmethod
    def masks_to_original(
        det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int, threshold: float
    ) -> Tensor:
        """det["masks"] [D, M, M] box-relative, det["boxes"] [D, 4] letterboxed -> bool [D, height, width] in the
        original image, by our pixel-centre convention (`ops.masks.masks_to_original`)."""
        return masks_to_original(det, scale, height, width, threshold)
