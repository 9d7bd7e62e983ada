"""torchvision's Mask R-CNN (ResNet-50-FPN v2) as an instance net: the reference architecture to compare with."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2


class TorchvisionMaskRCNN(nn.Module):
    """`maskrcnn_resnet50_fpn_v2` without downloads, at a fixed square input size, with box-relative masks out.

    `num_classes` counts the background (labels 1..K, as ours). `weights`: an optional local state_dict file
    (e.g. torchvision's COCO weights); tensors whose shape differs from this model's (the class-specific heads
    when K differs) keep their fresh initialisation and are listed. Other keyword arguments go to torchvision
    (box_score_thresh, box_nms_thresh, box_detections_per_img, ...).
    """

    def __init__(self, num_classes: int, input_size: int, weights: str | None = None, **kwargs) -> None:
        super().__init__()
        # min_size = max_size = the letterboxed input size: torchvision's own resize then changes nothing.
        self.model = maskrcnn_resnet50_fpn_v2(
            weights=None, weights_backbone=None, num_classes=num_classes, min_size=input_size, max_size=input_size,
            **kwargs,
        )  # fmt: skip
        if weights:
            self.load_weights(Path(weights).expanduser())

    def load_weights(self, path: Path) -> list[str]:
        """Load a state_dict file where shapes match; returns (and prints) the keys left at their initialisation."""
        if not path.is_file():
            raise FileNotFoundError(f"model.net.weights={path}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.model.load_state_dict(usable, strict=False)
        fresh = sorted(set(own) - set(usable))
        print(f"Loaded {len(usable)} tensors from {path}; {len(fresh)} left fresh: {', '.join(fresh[:6])}"
              f"{' …' if len(fresh) > 6 else ''}")  # fmt: skip
        return fresh

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """images [B, 3, S, S] in 0..1; targets {"boxes" [N, 4] xyxy, "labels" 1..K, "masks" uint8 [N, S, S]}."""
        return self.model(list(images), targets)

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        """images [B, 3, S, S] in 0..1 -> per image {"boxes" [D, 4] input pixels, "scores", "labels" 1..K,
        "masks" [D, 28, 28] box-relative probabilities} (torchvision's detections before pasting)."""
        model = self.model
        batch, _ = model.transform(list(images))
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        for det, (height, width) in zip(detections, batch.image_sizes, strict=True):  # back to the input's pixels
            ratio = det["boxes"].new_tensor([images.shape[-1] / width, images.shape[-2] / height])
            det["boxes"] = det["boxes"] * ratio.repeat(2)
            det["masks"] = det["masks"][:, 0]
        return detections
