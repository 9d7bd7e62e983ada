"""Object detection (YOLOv3-style): data-driven anchors, objectness/class/GIoU losses, COCO mAP in original pixels,
PR curves and a confusion matrix with background each validation."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss

from pipeline.data.anchor_cache import cached_kmeans_anchors
from pipeline.errors import ConfigError
from pipeline.metrics.detection import COCO_STATS, CocoMAP, pr_curve_figure
from pipeline.ops.anchors import anchor_fit, anchor_plot, best_possible_recall
from pipeline.ops.assign import Assignment, assign_batch, ignored
from pipeline.ops.boxes import SlotGrid, decode, flatten_levels, paired_box_iou, unletterbox
from pipeline.ops.confusion import detection_confusion
from pipeline.ops.nms import select_detections
from pipeline.tasks.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Outbox,
    build_optimizers,
    schedule_from_config,
    to_primitive,
)
from pipeline.viz import confusion_matrix_figure, detection_panel

LOSS_KEYS = {"box", "obj", "cls", "anchor_iou", "ignore_iou", "obj_balance"}
POSTPROCESS_KEYS = set(inspect.signature(select_detections).parameters) - {"boxes", "objectness", "class_logits"}


class DetectionTask(pl.LightningModule):
    """Trains an anchor-based detector `net: [B, 3, H, W] -> per stride [B, A, H_s, W_s, 5 + K]` on box batches.

    Labels 1..K are the data's (class_names[0] is the background of the shared label space); the net's class
    logits are over the K foreground classes. Anchors [3, A, 2] (pixels at `input_size`, one row per stride
    8/16/32) come from `anchors` or, when null (or "kmeans"), from k-means over the training boxes when fitting
    starts (a fork passes the checkpoint's unless told otherwise); they
    then become the `anchors` hyper-parameter, so checkpoints carry them to eval and predict. At other input
    sizes they scale with the input. `loss` and `postprocess` hold the keys of LOSS_KEYS and `select_detections`.

    Each validation logs `pr_curves/epoch_<n>.png` and `plots/confusion_matrix.png` (overwritten every epoch, so
    the store keeps the last validation's): `ops.confusion.detection_confusion` of the detections scoring >=
    SHOWN_SCORE at IoU 0.5 in original pixels, summed over the epoch and the DDP ranks; `confusion` keeps it
    (int64 [C, C], rows predicted, columns true, index 0 background).
    """

    TARGETS = "boxes"
    LOSS_KEYS = LOSS_KEYS
    IOU_TYPES: tuple[str, ...] = ("bbox",)
    # The detections the validation panels draw and the confusion matrix counts: confident ones, not every
    # candidate mAP ranks.
    SHOWN_SCORE = 0.3

    def __init__(
        self,
        net: dict,
        optimizer: dict,
        scheduler: dict | None,
        num_classes: int,
        class_names: Sequence[str],
        input_size: int,
        loss: dict,
        postprocess: dict,
        anchors: list[list[float]] | str | None = None,
        anchor_cache: str | None = None,
        monitor: str = "val/map",
        scheduler_interval: str = "epoch",
        num_vis_images: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        net, optimizer, scheduler, class_names, anchors, loss, postprocess = (
            to_primitive(v) for v in (net, optimizer, scheduler, class_names, anchors, loss, postprocess)
        )
        if set(loss) != self.LOSS_KEYS or len(loss["obj_balance"]) != 3:
            raise ValueError(
                f"model.loss needs exactly the keys {sorted(self.LOSS_KEYS)} (obj_balance: 3 weights), got {loss}"
            )
        unknown = set(postprocess) - POSTPROCESS_KEYS
        if unknown:
            raise ValueError(f"model.postprocess: unknown keys {sorted(unknown)}; accepted: {sorted(POSTPROCESS_KEYS)}")
        self.save_hyperparameters(logger=False)
        self.net = instantiate(net, num_classes=num_classes - 1)
        if isinstance(anchors, str) and anchors != "kmeans":
            raise ValueError(f"model.anchors={anchors!r}: give [w, h] pairs, null or kmeans")
        self.anchors = self._check_anchors(anchors) if isinstance(anchors, list) else None
        self._grids: dict[tuple, tuple[Tensor | None, SlotGrid]] = {}  # slot grids by (shapes, size, device)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.val_map = CocoMAP(iou_types=self.IOU_TYPES)
        self._vis: dict[str, Any] | None = None
        self.results: list[dict] = []  # the last validation's detections (original pixels), for predictions.json
        self.confusion: Tensor | None = None  # the last validation's detection confusion matrix
        self.outbox = Outbox()  # figures, params and metrics for the run's record (pipeline.tracking logs them)

    def _check_anchors(self, anchors: list[list[float]]) -> Tensor:
        """[3A] [w, h] pairs -> [3, A, 2] sorted by area: the smallest go to stride 8, the largest to stride 32."""
        given = torch.tensor(anchors, dtype=torch.float32)
        count = 3 * self.net.num_anchors
        if given.shape != (count, 2) or not bool((given > 0).all()):
            raise ValueError(f"model.anchors needs {count} positive [w, h] pairs, got {anchors}")
        return given[given.prod(1).argsort()].reshape(3, -1, 2)

    # ---- anchors -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Before fitting: k-means anchors from the training boxes unless given or resumed; log them.

        They become the `anchors` hyper-parameter, so every checkpoint (and eval/predict) carries them. A plain
        tensor, not a buffer: weight averaging (EMA) must not average them.
        """
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        odd = [s for s in [*datamodule.train_sizes, datamodule.val_size, self.hparams.input_size] if s % 32]
        if odd:
            raise ConfigError(f"the detector needs input sizes that are multiples of 32 (strides 8/16/32), got {odd}: "
                              "check data.train_sizes, data.val_size and model.input_size")  # fmt: skip
        zero = self.trainer.is_global_zero
        sizes = torch.from_numpy(datamodule.train_box_sizes(self.hparams.input_size)) if zero else None
        if self.anchors is None:
            # Rank 0 clusters (or reads its cache) and every rank takes its anchors: the ranks agree by construction.
            # A failure there (too few boxes) reaches every rank, which would otherwise wait in the broadcast.
            found: list | str | None = None
            if zero:
                try:
                    found = cached_kmeans_anchors(sizes, 3 * self.net.num_anchors, self.hparams.seed,
                                                  self.hparams.anchor_cache)  # fmt: skip
                    found = [[round(float(v), 1) for v in wh] for wh in found]
                except ValueError as err:
                    found = f"anchor k-means over the training boxes failed: {err}"
            found = self.trainer.strategy.broadcast(found, src=0)
            if isinstance(found, str):
                raise ConfigError(f"{found}; give model.anchors=[[w, h], ...] instead")
            self.anchors = self._check_anchors(found)
            self.hparams.anchors = self.anchors.reshape(-1, 2).tolist()
        if zero:
            self._log_anchors(sizes)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed or forked run keeps the checkpoint's anchors (whatever k-means gives on today's data); a
        continued schedule takes its settings from this run's config."""
        self.anchors = self._check_anchors(checkpoint["hyper_parameters"]["anchors"])
        self.hparams.anchors = self.anchors.reshape(-1, 2).tolist()
        schedule_from_config(checkpoint, self.hparams.scheduler)

    @rank_zero_only
    def _log_anchors(self, sizes: Tensor) -> None:
        anchors = self.anchors.reshape(-1, 2)
        fit, recall = anchor_fit(sizes, anchors), best_possible_recall(sizes, anchors)
        text = " ".join(f"{w:g}x{h:g}" for w, h in anchors.tolist())
        print(f"Anchors at {self.hparams.input_size}px: {text} (fit: mean best IoU {fit:.3f}, recall {recall:.3f})")
        self.outbox.params["anchors"] = text
        self.outbox.metrics.update({"anchors/fit": fit, "anchors/best_possible_recall": recall})
        title = f"{len(sizes)} training boxes at {self.hparams.input_size}px"
        self.outbox.figures["anchors.png"] = anchor_plot(sizes, anchors, title)

    def level_anchors(self, size: tuple[int, int]) -> Tensor:
        """Anchors [3, A, 2] (w, h) in pixels of an input of `size` (H, W): widths scale with W, heights with H."""
        if self.anchors is None:
            raise RuntimeError("the detector has no anchors yet: set model.anchors or fit it (k-means runs then)")
        height, width = size
        scale = torch.tensor([width, height], dtype=torch.float32) / self.hparams.input_size
        return (self.anchors * scale).to(self.device)

    # ---- forward and loss ----------------------------------------------------------------------------------

    def forward(self, images: Tensor) -> tuple[Tensor, SlotGrid]:
        """images: [B, 3, S, S] RGB in 0..1 -> (raw slot predictions [B, P, 5 + K], the slots' geometry)."""
        return self._slots(self.net((images - self.mean) / self.std), tuple(images.shape[-2:]))

    def _slots(self, outputs: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, SlotGrid]:
        """The net's per stride outputs [B, A, H_s, W_s, 5 + K] for an input of `size` (H, W) -> ([B, P, 5 + K],
        the grid)."""
        shapes = tuple(tuple(o.shape[2:4]) for o in outputs)
        # Grids made under inference_mode hold inference tensors, which a later training step cannot save for backward.
        key = (shapes, size, outputs[0].device, torch.is_inference_mode_enabled())
        cached = self._grids.get(key)
        if cached is None or cached[0] is not self.anchors:  # built once per size, anchors and device
            if len(self._grids) >= 32:  # predict at many sizes: keep the cache bounded
                self._grids.clear()
            cached = self._grids[key] = (self.anchors, SlotGrid.build(list(shapes), self.net.strides,
                                                                      self.level_anchors(size)))  # fmt: skip
        return flatten_levels(outputs), cached[1]

    def _ground_truth(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's non-crowd boxes [N, 4], their labels [N] (1..K) and image index [N], concatenated on the
        device image by image (crowd regions only take part in `ignored`)."""
        counts = [len(gt) for gt in batch["boxes"]]
        images = torch.arange(len(counts), device=self.device)
        image = torch.repeat_interleave(images, torch.tensor(counts, device=self.device), output_size=sum(counts))
        crowd = torch.cat(batch["iscrowd"]).to(self.device)
        boxes = torch.cat(batch["boxes"]).to(self.device).reshape(-1, 4)
        return boxes[~crowd], torch.cat(batch["labels"]).to(self.device)[~crowd], image[~crowd]

    def _assignments(self, grid: SlotGrid, batch: dict) -> Assignment:
        """Which slot of which image trains on which of the batch's non-crowd boxes (`assign_batch`)."""
        boxes, _, image = self._ground_truth(batch)
        return assign_batch(boxes, image, grid, self.hparams.loss["anchor_iou"])

    def _loss(
        self, pred: Tensor, grid: SlotGrid, batch: dict, assignment: Assignment | None = None
    ) -> dict[str, Tensor]:
        """YOLOv3 loss over a batch: GIoU and class BCE on assigned slots, objectness BCE on the rest not ignored.

        `assignment` (from `_assignments`) when the caller needs it too, so it is computed once per step. The
        whole batch at once; only the ignore test loops over images (torchvision's `box_iou` is per image).
        """
        cfg = self.hparams.loss
        found = assignment if assignment is not None else self._assignments(grid, batch)
        gt_boxes, gt_labels, _ = self._ground_truth(batch)
        boxes = decode(pred[..., :4], grid)
        detached = boxes.detach()
        # Slots whose box already overlaps a ground truth (crowd regions included) are left out of objectness.
        keep = torch.stack(
            [~ignored(detached[b], gt.to(pred.device), cfg["ignore_iou"]) for b, gt in enumerate(batch["boxes"])]
        )
        keep[found.image, found.slot] = True
        pos_boxes, targets = boxes[found.image, found.slot], gt_boxes[found.box]
        # Objectness learns the IoU its box reaches (YOLOv5), so scores rank detections by localisation too.
        # The IoUs' dtype: float32 under bf16/16-mixed autocast (boxes decode in float32), float64 under 64-true.
        obj_target = torch.zeros_like(pred[..., 4], dtype=pos_boxes.dtype)
        obj_target[found.image, found.slot] = paired_box_iou(pos_boxes.detach(), targets).clamp(min=0)
        bce = F.binary_cross_entropy_with_logits(pred[..., 4], obj_target, reduction="none")
        obj = pred.new_zeros(())
        ends = [*grid.offsets[1:], pred.shape[1]]
        for weight, start, end in zip(cfg["obj_balance"], grid.offsets, ends, strict=True):
            level_keep = keep[:, start:end]
            obj = obj + weight * (bce[:, start:end] * level_keep).sum() / level_keep.sum().clamp(min=1)
        if len(pos_boxes):
            box = generalized_box_iou_loss(pos_boxes, targets, reduction="mean")
            cls_target = F.one_hot(gt_labels[found.box] - 1, pred.shape[-1] - 5).to(pred.dtype)
            cls = F.binary_cross_entropy_with_logits(pred[found.image, found.slot, 5:], cls_target)
        else:  # no objects in the batch: objectness alone
            box = cls = pred.new_zeros(())
        total = cfg["box"] * box + cfg["obj"] * obj + cfg["cls"] * cls
        return {"loss": total, "box": box.detach(), "obj": obj.detach(), "cls": cls.detach()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self._training_losses(batch)
        n = len(batch["image"])
        self.log("train/loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items() if k != "loss"}, on_epoch=True, batch_size=n)
        self.log("train/size", float(batch["image"].shape[-1]), on_step=True, on_epoch=False, batch_size=n)
        return losses["loss"]

    def _training_losses(self, batch: dict) -> dict[str, Tensor]:
        """{"loss": the weighted total to optimise, <part>: each part detached} for a training batch."""
        pred, grid = self(batch["image"])
        return self._loss(pred, grid, batch)

    # ---- detections and validation -------------------------------------------------------------------------

    def detect(self, images: Tensor) -> list[dict[str, Tensor]]:
        """images: [B, 3, S, S] in 0..1 -> per image {"boxes" [D, 4] (x1, y1, x2, y2), "scores", "labels" 1..K}."""
        return self._select(*self(images))

    def _select(self, pred: Tensor, grid: SlotGrid) -> list[dict[str, Tensor]]:
        """Slot predictions [B, P, 5 + K] -> per image detections after score threshold and NMS."""
        boxes = decode(pred[..., :4], grid)
        detections = []
        for b in range(len(pred)):
            kept_boxes, scores, labels = select_detections(
                boxes[b], pred[b, :, 4], pred[b, :, 5:], **self.hparams.postprocess
            )
            detections.append({"boxes": kept_boxes, "scores": scores, "labels": labels + 1})
        return detections

    def on_validation_epoch_start(self) -> None:
        self.results = []
        n = self.hparams.num_classes
        self._confusion = torch.zeros(n, n, dtype=torch.long)  # this epoch's counts on this rank

    @property
    def _collecting(self) -> bool:
        """Detections are kept for predictions.json only in `trainer.validate` (pipeline-eval), not while fitting."""
        return self.trainer.state.fn == TrainerFn.VALIDATING

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, detections = self._validation_outputs(batch)
        if loss is not None:
            self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(detections))
        preds, targets = [], []
        for det, image_id, scale, (h, w), gt in zip(
            detections, batch["image_id"], batch["scale"], batch["orig_size"], batch["gt"], strict=True
        ):
            pred = self._to_original(det, scale, h, w)
            preds.append(pred)
            targets.append({k: v.to(self.device) for k, v in gt.items()})
            self._confusion += detection_confusion(
                box_convert(pred["boxes"], "xywh", "xyxy"), pred["scores"], pred["labels"],
                box_convert(targets[-1]["boxes"], "xywh", "xyxy"), targets[-1]["labels"], targets[-1]["iscrowd"],
                self.hparams.num_classes, self.SHOWN_SCORE,
            )  # fmt: skip
            if self._collecting:
                self.results += self._records(image_id, pred)
        self.val_map.update(preds, targets)
        if batch_idx == 0:
            k = self.hparams.num_vis_images
            shown = {key: batch[key][:k] for key in ("image", "boxes", "labels", "masks") if key in batch}
            self._vis = {"batch": shown, "detections": detections[:k]}

    def _validation_outputs(self, batch: dict) -> tuple[Tensor | None, list[dict[str, Tensor]]]:
        """The batch's total loss (None where the net has none in eval mode) and its detections in letterboxed
        pixels (as `detect`)."""
        pred, grid = self(batch["image"])
        return self._loss(pred, grid, batch)["loss"], self._select(pred, grid)

    def _to_original(self, det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int) -> dict:
        """Letterboxed detections -> the metric's form in original pixels: {"boxes" xywh, "scores", "labels"}."""
        xywh = box_convert(unletterbox(det["boxes"], scale, height, width), "xyxy", "xywh")
        return {"boxes": xywh, "scores": det["scores"], "labels": det["labels"]}

    def _records(self, image_id: int, pred: dict[str, Tensor]) -> list[dict]:
        """One image's detections as plain records for predictions.json (labels, not yet category ids)."""
        return [
            {"image_id": image_id, "label": int(label), "bbox": box, "score": float(score)}
            for box, score, label in zip(
                pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(), strict=True
            )
        ]

    def on_validation_epoch_end(self) -> None:
        stats = self.val_map.summary("bbox")  # synced across DDP ranks
        if self._collecting and self.trainer.world_size > 1:  # every rank holds its shard: gather them all
            shards: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(shards, self.results)
            self.results = sorted((r for shard in shards for r in shard), key=lambda r: r["image_id"])
        self.val_map.reset()
        # Summed over the ranks (a collective: every rank takes part); rank 0 draws it.
        self.confusion = self.trainer.strategy.reduce(self._confusion.to(self.device), reduce_op="sum").cpu()
        self._log_stats(stats, "val/")
        self.log("val/nonfinite_detections", float(stats["nonfinite"]), sync_dist=True)
        names = self.hparams.class_names
        # Rendered on rank 0 only: the logger keeps rank 0's pictures, the other ranks would draw them for nothing.
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            epoch = self.current_epoch
            figures = self.outbox.figures
            if self._vis is not None:
                figures[f"val_images/epoch_{epoch:03d}.png"] = self._panel(**self._vis)
            figures[f"pr_curves/epoch_{epoch:03d}.png"] = pr_curve_figure(stats["pr_curves"], names)
            title = f"Detections scoring >= {self.SHOWN_SCORE:g} at IoU 0.5, epoch {epoch}"
            # Drawn with true classes as rows, as the segmentation matrix: each row reads "where this class went";
            # the background row holds the false alarms, the background column the missed objects.
            figures["plots/confusion_matrix.png"] = confusion_matrix_figure(self.confusion.T, names, title, unit="boxes")
        self._vis = None

    def _log_stats(self, stats: dict, prefix: str) -> None:
        """Log a `CocoMAP.summary` as <prefix>map, …, <prefix>map_50_voc, <prefix>AP/<class>; map and map_50 on the
        progress bar. The values are already global: sync_dist only averages identical values (and keeps
        Lightning from warning)."""
        headline = ("map", "map_50")
        self.log_dict({prefix + k: float(stats[k]) for k in headline}, prog_bar=True, sync_dist=True)
        values = {prefix + k: float(stats[k]) for k in (*COCO_STATS, "map_50_voc") if k not in headline}
        names = self.hparams.class_names
        values.update({f"{prefix}AP/{names[label]}": float(ap) for label, ap in stats["map_per_class"].items()})
        self.log_dict(values, sync_dist=True)

    def _panel(self, batch: dict, detections: list[dict[str, Tensor]]) -> np.ndarray:
        """Validation picture: ground truth | detections per image (with masks where the batch has them)."""
        names = self.hparams.class_names
        return detection_panel(batch["image"], batch["boxes"], batch["labels"], detections, names, batch.get("masks"),
                               min_score=self.SHOWN_SCORE)  # fmt: skip

    def configure_optimizers(self) -> Any:
        return build_optimizers(self)
