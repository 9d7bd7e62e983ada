"""Instance segmentation as Mask R-CNN extends Faster R-CNN: the YOLO detector plus a per-box mask branch."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.models.yolo import YOLO
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

    `forward` gives the detector's slot predictions and the neck levels; `mask_logits` reads the levels along
    boxes (ground truth in training, detections at inference) with `ops.roi.multiscale_roi_align`, which samples
    at pixel centres as the mask targets do. `mask_width` is the channel count the levels are projected to and
    the head's width; `roi_size` the RoIAlign output (masks come out at twice that).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: dict,
        num_anchors: int = 3,
        neck_width: int = 128,
        mask_width: int = 32,
        roi_size: int = 14,
    ) -> None:
        super().__init__(num_classes, backbone, num_anchors, neck_width)
        self.mask_lateral = nn.ModuleList(nn.Conv2d(w, mask_width, 1) for w in self.widths)
        self.roi_size = roi_size
        self.mask_head = MaskHead(mask_width, num_classes, mask_width)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """x: [B, 3, H, W] -> (per stride slot predictions [B, A, H_s, W_s, 5 + K], neck levels)."""
        levels = self.neck(x)
        return self.head(levels), levels

    def mask_logits(self, levels: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """Per-class mask logits [R, K, 2S, 2S] for each image's boxes [R_b, 4] (x1, y1, x2, y2 input pixels)."""
        features = [lateral(level) for lateral, level in zip(self.mask_lateral, levels, strict=True)]
        return self.mask_head(multiscale_roi_align(features, boxes, self.strides, self.roi_size))
