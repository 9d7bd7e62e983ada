"""Instance segmentation: the detector's losses plus a per-box mask loss; COCO box and mask mAP in original pixels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor

from pipeline.metrics.detection import CocoMAP
from pipeline.ops.assign import Assignment
from pipeline.ops.boxes import SlotGrid, decode, paired_box_iou
from pipeline.ops.masks import encode_rle, mask_targets, masks_to_original
from pipeline.ops.roi import roi_generator, sample_rois
from pipeline.tasks.common import Outbox, to_primitive
from pipeline.tasks.detection import LOSS_KEYS, DetectionTask

MASK_KEYS = {"threshold", "rois_per_image", "positive_iou"}


class InstanceTask(DetectionTask):
    """The anchor detector plus a Mask R-CNN mask branch (`net`: `MaskYOLO`): instances with box, score, class, mask.

    Training: the detector's losses plus per-pixel BCE of the ground-truth class's mask logits [28, 28] against
    the instance masks RoIAligned along each mask RoI: the ground-truth boxes plus the detector's boxes of the
    slots assigned to them that overlap their ground truth by `masks.positive_iou` (as Mask R-CNN's positive
    proposals), at most `masks.rois_per_image`, drawn at random where there are more. Inference: masks of the
    post-NMS detections, pasted into the original image and thresholded at `masks.threshold`. Logs val/map…
    (boxes) and val/segm_map… (masks), and the detector's pictures: PR curves (boxes) and the confusion matrix
    `plots/confusion_matrix.png` (boxes matched by box IoU).
    """

    TARGETS = "instances"
    LOSS_KEYS = LOSS_KEYS | {"mask"}
    IOU_TYPES = ("bbox", "segm")

    def __init__(self, masks: dict, **kwargs: Any) -> None:
        # Plain types before super() saves the hyper-parameters (Lightning reads them from this frame too), so
        # checkpoints hold no OmegaConf objects and load with weights_only.
        masks, kwargs = to_primitive(masks), {key: to_primitive(value) for key, value in kwargs.items()}
        super().__init__(**kwargs)
        if set(masks) != MASK_KEYS:
            raise ValueError(f"model.masks needs exactly the keys {sorted(MASK_KEYS)}, got {dict(masks)}")

    def forward(self, images: Tensor) -> tuple[Tensor, SlotGrid, list[Tensor]]:
        """images: [B, 3, S, S] in 0..1 -> (slot predictions [B, P, 5 + K], their geometry, the neck levels)."""
        outputs, levels = self.net((images - self.mean) / self.std)
        pred, grid = self._slots(outputs, tuple(images.shape[-2:]))
        return pred, grid, levels

    # ---- training ------------------------------------------------------------------------------------------

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

    def _mask_rois(
        self, pred: Tensor, grid: SlotGrid, batch: dict, assignment: Assignment
    ) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """Per image mask RoIs [R_b, 4]; for all of them the owning instance (row of the batch's non-crowd masks),
        its label 1..K, and those masks [N, S, S].

        At most `masks.rois_per_image` per image: the ground-truth boxes (a uniform random subset where there are
        more, `ops.roi.sample_rois`), then detector boxes assigned to them, drawn the same way, in the room left.
        """
        cfg = self.hparams.masks
        cap = cfg["rois_per_image"]
        boxes = decode(pred[..., :4].detach(), grid)
        per_image = torch.bincount(assignment.image, minlength=len(pred)).tolist()  # assignment is sorted by image
        rois, owners, labels, masks = [], [], [], []
        start = 0  # the image's first row among the batch's non-crowd boxes
        for b, (gt, gt_labels, crowd, gt_masks, slots, box) in enumerate(
            zip(batch["boxes"], batch["labels"], batch["iscrowd"], batch["masks"], assignment.slot.split(per_image),
                assignment.box.split(per_image), strict=True)
        ):  # fmt: skip
            generator = self._roi_generator(batch, b)
            gt, gt_labels, gt_masks = (t[~crowd].to(pred.device) for t in (gt, gt_labels, gt_masks))
            index = box - start
            chosen = sample_rois(len(gt), cap, generator).to(pred.device)
            positive = paired_box_iou(boxes[b, slots], gt[index]) >= cfg["positive_iou"]
            extra = torch.nonzero(positive).flatten()
            extra = extra[sample_rois(len(extra), cap - len(chosen), generator).to(extra.device)]
            rois.append(torch.cat([gt[chosen], boxes[b, slots[extra]]]))
            owner = torch.cat([chosen, index[extra]])
            owners.append(owner + start)
            labels.append(gt_labels[owner])
            masks.append(gt_masks)
            start += len(gt)
        return rois, torch.cat(owners), torch.cat(labels), torch.cat(masks)

    def _mask_loss(
        self, levels: list[Tensor], pred: Tensor, grid: SlotGrid, batch: dict, assignment: Assignment | None = None
    ) -> Tensor:
        """BCE of the ground-truth class's mask logits against the RoIAligned instance masks (0 without RoIs)."""
        assignment = assignment if assignment is not None else self._assignments(grid, batch)
        rois, owners, labels, masks = self._mask_rois(pred, grid, batch, assignment)
        logits = self.net.mask_logits(levels, rois)
        if len(logits) == 0:  # keeps the mask head in the graph (DDP needs every parameter used)
            return logits.sum()
        targets = mask_targets(masks, torch.cat(rois), owners, logits.shape[-1])
        picked = logits[torch.arange(len(logits), device=logits.device), labels - 1]
        return F.binary_cross_entropy_with_logits(picked, targets)

    def _losses(self, batch: dict) -> tuple[dict[str, Tensor], Tensor, SlotGrid, list[Tensor]]:
        pred, grid, levels = self(batch["image"])
        assignment = self._assignments(grid, batch)  # the detector's positives are also mask RoIs
        losses = self._loss(pred, grid, batch, assignment)
        mask = self._mask_loss(levels, pred, grid, batch, assignment)
        losses["loss"] = losses["loss"] + self.hparams.loss["mask"] * mask
        losses["mask"] = mask.detach()
        return losses, pred, grid, levels

    def _training_losses(self, batch: dict) -> dict[str, Tensor]:
        return self._losses(batch)[0]

    # ---- inference -----------------------------------------------------------------------------------------

    def _with_masks(self, detections: list[dict[str, Tensor]], levels: list[Tensor]) -> list[dict[str, Tensor]]:
        """Add "masks" [D, 28, 28]: each detection's box-relative mask probabilities for its own class."""
        logits = self.net.mask_logits(levels, [d["boxes"] for d in detections])
        labels = torch.cat([d["labels"] for d in detections])
        probs = logits[torch.arange(len(logits), device=logits.device), labels - 1].sigmoid()
        for det, masks in zip(detections, probs.split([len(d["boxes"]) for d in detections]), strict=True):
            det["masks"] = masks
        return detections

    def detect(self, images: Tensor) -> list[dict[str, Tensor]]:
        """images [B, 3, S, S] -> per image {"boxes" [D, 4], "scores", "labels", "masks" [D, 28, 28] box-relative}."""
        pred, grid, levels = self(images)
        return self._with_masks(self._select(pred, grid), levels)

    def _validation_outputs(self, batch: dict) -> tuple[Tensor, list[dict[str, Tensor]]]:
        losses, pred, grid, levels = self._losses(batch)
        detections = self._with_masks(self._select(pred, grid), levels)
        return losses["loss"], detections

    def masks_to_original(self, det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int) -> Tensor:
        """det["masks"] [D, M, M] box-relative, det["boxes"] [D, 4] letterboxed -> bool [D, height, width] in the
        original image, pasted by this model's own convention (validation, panels and predict all use it)."""
        return masks_to_original(det, scale, height, width, self.hparams.masks["threshold"])

    def _to_original(self, det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int) -> dict:
        masks = self.masks_to_original(det, scale, height, width)
        return {**super()._to_original(det, scale, height, width), "masks": masks}

    def _records(self, image_id: int, pred: dict[str, Tensor]) -> list[dict]:
        records = super()._records(image_id, pred)
        for record, mask in zip(records, pred["masks"], strict=True):
            record["segmentation"] = encode_rle(mask)
        return records

    def on_validation_epoch_end(self) -> None:
        # Computed once: the box numbers in super() come from the same (cached) evaluation.
        self._log_stats(self.val_map.summary("segm"), "val/segm_")
        super().on_validation_epoch_end()

    def _panel(self, batch: dict, detections: list[dict[str, Tensor]]) -> np.ndarray:
        """Validation picture: ground-truth masks and boxes | detections with their masks pasted, per image."""
        height, width = batch["image"].shape[-2:]
        pasted = [{**d, "masks": self.masks_to_original(d, (1.0, 1.0), height, width)} for d in detections]
        return super()._panel(batch, pasted)


class TorchvisionInstanceTask(InstanceTask):
    """torchvision's Mask R-CNN (`net`: `TorchvisionMaskRCNN`) in the same task: same data, metrics, MLflow logging,
    eval and predict as our head, so both compare in one experiment. Losses, proposals and NMS are torchvision's
    own (no anchors k-means, no YOLO loss settings); no validation loss (torchvision computes losses only in
    training mode).
    """

    def __init__(
        self,
        net: dict,
        optimizer: dict,
        scheduler: dict | None,
        num_classes: int,
        class_names: Sequence[str],
        input_size: int,
        masks: dict,
        monitor: str = "val/segm_map",
        scheduler_interval: str = "epoch",
        num_vis_images: int = 4,
        seed: int = 0,
    ) -> None:
        pl.LightningModule.__init__(self)  # not DetectionTask's: it builds anchors, YOLO loss and NMS settings
        net, optimizer, scheduler, class_names, masks = (
            to_primitive(v) for v in (net, optimizer, scheduler, class_names, masks)
        )
        if set(masks) != {"threshold"}:
            raise ValueError(f"model.masks needs exactly the key 'threshold', got {masks}")
        # Passed explicitly: Lightning finds init arguments only in frames that call super().
        self.save_hyperparameters(
            {
                "net": net,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "num_classes": num_classes,
                "class_names": class_names,
                "input_size": input_size,
                "masks": masks,
                "monitor": monitor,
                "scheduler_interval": scheduler_interval,
                "num_vis_images": num_vis_images,
                "seed": seed,
            },
            logger=False,
        )
        self.net = instantiate(net, num_classes=num_classes, input_size=input_size)
        self.anchors = None
        self.val_map = CocoMAP(iou_types=self.IOU_TYPES)
        self._vis: dict[str, Any] | None = None
        self.results: list[dict] = []
        self.confusion: Tensor | None = None
        self.outbox = Outbox()

    def setup(self, stage: str) -> None:
        """Nothing to prepare: torchvision's anchors are fixed."""

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """No anchors to restore."""

    def _training_losses(self, batch: dict) -> dict[str, Tensor]:
        targets = [
            {"boxes": boxes[~crowd], "labels": labels[~crowd], "masks": masks[~crowd]}
            for boxes, labels, crowd, masks in zip(
                batch["boxes"], batch["labels"], batch["iscrowd"], batch["masks"], strict=True
            )
        ]
        losses = self.net.losses(batch["image"], targets)
        total = sum(losses.values())
        return {"loss": total, **{k.removeprefix("loss_"): v.detach() for k, v in losses.items()}}

    def detect(self, images: Tensor) -> list[dict[str, Tensor]]:
        return self.net(images)

    def masks_to_original(self, det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int) -> Tensor:
        """As InstanceTask's, by torchvision's own paste (`paste_masks_in_image`), as its reference recipe scores."""
        return self.net.masks_to_original(det, scale, height, width, self.hparams.masks["threshold"])

    def _validation_outputs(self, batch: dict) -> tuple[Tensor | None, list[dict[str, Tensor]]]:
        return None, self.net(batch["image"])
