"""Instance segmentation: the detection task with masks, for either instance net (ours or torchvision's Mask R-CNN);
COCO box and mask mAP in original pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.ops.roi import roi_generator
from pipeline.tasks.common import to_primitive
from pipeline.tasks.detection import DetectionTask

MASK_KEYS = {"threshold"}
# A checkpoint written before `model.loss` named its class: the mask loss's keywords, two of them under masks.
LEGACY_LOSS = "pipeline.losses.mask.MaskYOLOLoss"
LEGACY_MASK_KEYS = ("rois_per_image", "positive_iou")


class InstanceTask(DetectionTask):
    """DetectionTask for an instance net (`net`: `MaskYOLO` or `TorchvisionMaskRCNN`), whose detections also carry
    "masks" [D, M, M] (box-relative probabilities of their own class) and whose targets carry the instance masks.

    Inference: masks pasted into the original image by the net's own convention (`net.masks_to_original`) and
    thresholded at `masks.threshold`. Each image's target also carries "generator", which draws its mask RoIs where
    the net samples them (`_roi_generator`). Logs val/map… (boxes) and val/segm_map… (masks), and the detector's
    pictures: PR curves (boxes) and the confusion matrix `plots/confusion_matrix.png` (boxes matched by box IoU).
    torchvision's net brings its own losses, proposals and NMS (no anchors k-means, no `loss`, no validation loss).
    """

    TARGETS = "instances"
    IOU_TYPES = ("bbox", "segm")

    def __init__(self, masks: dict, **kwargs: Any) -> None:
        # Plain types before super() saves the hyper-parameters (Lightning reads them from this frame too), so
        # checkpoints hold no OmegaConf objects and load with weights_only.
        masks, kwargs = to_primitive(masks), {key: to_primitive(value) for key, value in kwargs.items()}
        loss = kwargs.get("loss")
        if loss is not None and "_target_" not in loss:
            kwargs["loss"] = {"_target_": LEGACY_LOSS, **loss, **{k: masks.pop(k) for k in LEGACY_MASK_KEYS}}
        super().__init__(**kwargs)
        if set(masks) != MASK_KEYS:
            raise ValueError(f"model.masks needs exactly the keys {sorted(MASK_KEYS)}, got {dict(masks)}")

    def _roi_generator(self, batch: dict, b: int) -> torch.Generator:
        """The generator that picks image b's mask RoIs: seeded by (seed, global step, rank, b) in training, by
        (seed, image id) in evaluation.

        A generator of its own rather than torch's global one (which `callbacks.StepSeed` seeds from (seed, step,
        rank) before each training step, so either would resume exactly): the draw then depends on neither the
        callback, nor the draws before it in the step, nor the device (CPU generator). In evaluation the global
        step stands still, so the image id keys the draw: val/loss_mask sees the same RoIs of an image at every
        validation, whatever the batch size or number of ranks.
        """
        seed = self.hparams.seed
        if self.training:
            return roi_generator(seed, self.global_step, self.global_rank, b)
        return roi_generator(seed, int(batch["image_id"][b]))

    def _targets(self, batch: dict) -> list[dict[str, Tensor]]:
        """DetectionTask's targets plus "masks" uint8 [N, S, S] and the mask RoIs' "generator"."""
        targets = super()._targets(batch)
        for b, (target, masks) in enumerate(zip(targets, batch["masks"], strict=True)):
            target.update(masks=masks, generator=self._roi_generator(batch, b))
        return targets

    def masks_to_original(self, det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int) -> Tensor:
        """det["masks"] [D, M, M] box-relative, det["boxes"] [D, 4] letterboxed -> bool [D, height, width] in the
        original image, pasted by the net's own convention (validation, panels and predict all use it)."""
        return self.net.masks_to_original(det, scale, height, width, self.hparams.masks["threshold"])

    def _to_original(self, det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int) -> dict:
        masks = self.masks_to_original(det, scale, height, width)
        return {**super()._to_original(det, scale, height, width), "masks": masks}

    def _panel(self, batch: dict, detections: list[dict[str, Tensor]]) -> np.ndarray:
        """Validation picture: ground-truth masks and boxes | detections with their masks pasted, per image."""
        height, width = batch["image"].shape[-2:]
        pasted = [{**d, "masks": self.masks_to_original(d, (1.0, 1.0), height, width)} for d in detections]
        return super()._panel(batch, pasted)
