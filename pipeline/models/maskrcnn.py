"""torchvision's Mask R-CNN as an instance net: the reference architecture to compare with, on its ResNet-50-FPN v2
or on any of our backbones (timm's included) under torchvision's FPN."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pipeline.models.backbones import TAP_STRIDES, Backbone, build_backbone

# The taps under the FPN, fine to coarse (c2 where the backbone has it), and the FPN's width (torchvision's).
FPN_TAPS = ("c2", "c3", "c4", "c5")
FPN_WIDTH = 256


class BackboneFPN(nn.Module):
    """Our Backbone under torchvision's FPN, as torchvision's `BackboneWithFPN` puts one over a ResNet:
    [B, 3, H, W] -> {tap: [B, 256, H/s, W/s] for each of `taps`, "pool": the coarsest level max-pooled by 2}.

    `out_channels` is the attribute MaskRCNN reads to size its heads.
    """

    def __init__(self, backbone: Backbone, taps: tuple[str, ...]) -> None:
        super().__init__()
        self.body = backbone
        self.taps = taps
        channels = [backbone.channels[tap] for tap in taps]
        self.fpn = FeaturePyramidNetwork(channels, FPN_WIDTH, extra_blocks=LastLevelMaxPool())
        self.out_channels = FPN_WIDTH

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((tap, features[tap]) for tap in self.taps))


def fpn_maskrcnn(backbone: Backbone, num_classes: int, **kwargs: Any) -> MaskRCNN:
    """torchvision's MaskRCNN (its default heads) over `backbone`'s taps c2..c5 (c3..c5 where it has no c2) + FPN.

    Anchors and RoI pooling follow the levels: one anchor size per level, 8x its stride (torchvision's 32..512 for
    strides 4..64, the pooled level included), ratios 0.5/1/2; boxes and masks are pooled from the tap levels, by
    FPN's box-size rule over the levels there are. `kwargs` go to MaskRCNN (sizes, thresholds, ...).
    """
    taps = tuple(tap for tap in FPN_TAPS if tap in backbone.strides)
    strides = [backbone.strides[tap] for tap in taps]
    if taps not in (FPN_TAPS, FPN_TAPS[1:]) or strides != [TAP_STRIDES[tap] for tap in taps]:
        have = ", ".join(f"{tap} (stride {stride})" for tap, stride in backbone.strides.items())
        raise ValueError(
            f"Mask R-CNN needs backbone taps c3, c4, c5 (and c2) at strides 8, 16, 32 (and 4); backbone "
            f"{backbone.name!r} has {have} (dilate_last?)"
        )
    levels = [*strides, 2 * strides[-1]]
    anchors = AnchorGenerator(tuple((8 * stride,) for stride in levels), ((0.5, 1.0, 2.0),) * len(levels))
    return MaskRCNN(
        BackboneFPN(backbone, taps),
        num_classes,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(list(taps), output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(list(taps), output_size=14, sampling_ratio=2),
        **kwargs,
    )


class TorchvisionMaskRCNN(nn.Module):
    """`maskrcnn_resnet50_fpn_v2` without downloads, fed our letterboxed batches, with box-relative masks out; or,
    given `backbone` (`build_backbone`'s arguments: one of ours or any timm model), torchvision's MaskRCNN over
    that backbone's taps under torchvision's FPN (`fpn_maskrcnn`).

    Sizes as torchvision's reference recipe for multi-scale training (references/detection/train.py passes
    `_skip_resize=True` with `--data-augmentation multiscale` or `lsj`): in training, GeneralizedRCNNTransform's
    resize is skipped, so each multi-scale batch reaches the backbone at its own size (only normalised and
    padded to a multiple of 32); in eval it resizes the short side to `min_size`, capped by `max_size`, and
    min_size = max_size = `input_size` makes that the identity for our letterboxed [S, S] inputs at S =
    `input_size` (scale factor 1). Without the flag the transform scaled every training batch back to
    `input_size`, and multi-scale training did nothing. The flag is torchvision's private keyword (0.29):
    tests/unit/models/test_maskrcnn.py records the backbone's input sizes, so a change of it fails loudly.

    `num_classes` counts the background (labels 1..K, as ours). `weights`: an optional local state_dict file
    (e.g. torchvision's COCO weights); tensors whose shape differs from this model's (the class-specific heads
    when K differs) keep their fresh initialisation and are listed. Other keyword arguments go to torchvision
    (box_score_thresh, box_nms_thresh, box_detections_per_img, ...).
    """

    def __init__(
        self, num_classes: int, input_size: int, weights: str | None = None, backbone: dict | None = None, **kwargs
    ) -> None:
        super().__init__()
        sizes = {"min_size": input_size, "max_size": input_size, "_skip_resize": True}
        if backbone is None:
            self.model = maskrcnn_resnet50_fpn_v2(
                weights=None, weights_backbone=None, num_classes=num_classes, **sizes, **kwargs
            )
        else:
            self.model = fpn_maskrcnn(build_backbone(**backbone), num_classes, **sizes, **kwargs)
        if weights:
            self.load_weights(Path(weights).expanduser())

    def load_weights(self, path: Path) -> list[str]:
        """Load a state_dict file where shapes match; returns (and prints) the keys left at their initialisation.

        A file (bare, or under a `state_dict` key) of which no tensor fits this model is an error naming the file
        and a few keys expected and found: loading it would silently leave the whole net at random init.
        """
        if not path.is_file():
            raise FileNotFoundError(f"model.net.weights={path}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"model.net.weights={path} holds a {type(state).__name__}, not a state dict")
        own = self.model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            named = [k for k in state if k in own]
            why = f"; {len(named)} share a name but not the shape, e.g. {named[:3]}" if named else ""
            raise ValueError(
                f"no tensor in model.net.weights={path} fits this Mask R-CNN: expected keys "
                f"like {list(own)[:3]}, found {list(state)[:3]} ({len(state)} keys){why}"
            )
        self.model.load_state_dict(usable, strict=False)
        fresh = sorted(set(own) - set(usable))
        print(f"Loaded {len(usable)} tensors from {path}; {len(fresh)} left fresh: {', '.join(fresh[:6])}"
              f"{' …' if len(fresh) > 6 else ''}")  # fmt: skip
        return fresh

    def forward(
        self, images: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]] | tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """images [B, 3, S, S] in 0..1; targets per image {"boxes" [N, 4] xyxy, "labels" 1..K, "iscrowd" [N], "masks"
        uint8 [N, S, S]} (crowd regions left out: torchvision has no ignore regions).

        Training mode: {"loss": the sum of torchvision's losses, <name>: each detached, `loss_` prefix dropped}. Eval
        mode: per image {"boxes" [D, 4] input pixels, "scores", "labels" 1..K, "masks" [D, 28, 28] box-relative
        probabilities} (torchvision's detections before pasting); with targets ({}, detections): torchvision
        computes losses only in training mode.
        """
        if self.training:
            if targets is None:
                raise ValueError("in training mode the net needs targets (it returns their losses)")
            kept = [{k: t[k][~t["iscrowd"]] for k in ("boxes", "labels", "masks")} for t in targets]
            losses = self.model(list(images), kept)
            total = sum(losses.values())
            return {"loss": total, **{k.removeprefix("loss_"): v.detach() for k, v in losses.items()}}
        found = self.detections(images)
        return found if targets is None else ({}, found)

    def detections(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Eval mode's detections (see `forward`), with the boxes back in the input's pixels."""
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

    @staticmethod
    def masks_to_original(
        det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int, threshold: float
    ) -> Tensor:
        """det["masks"] [D, M, M] box-relative probabilities, det["boxes"] [D, 4] letterboxed pixels -> bool
        [D, height, width] in original pixels, pasted as torchvision's GeneralizedRCNNTransform.postprocess does.

        The boxes are scaled by the letterbox scale alone (torchvision's `resize_boxes`; not clipped, so a mask
        keeps the box it was predicted for), then `paste_masks_in_image` (a 1-cell zero border, boxes rounded
        to whole pixels, the mask resized bilinearly to the box, the part outside the image cut off); pixels with
        probability >= `threshold` are inside. Same signature as `pipeline.ops.masks.masks_to_original` (our
        pixel-centre convention), which it replaces for this net.
        """
        sx, sy = scale
        boxes = det["boxes"] / det["boxes"].new_tensor([sx, sy, sx, sy])
        return paste_masks_in_image(det["masks"][:, None], boxes, (height, width))[:, 0] >= threshold
