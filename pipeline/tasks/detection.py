"""Object detection with a net of torchvision's contract (losses in training, detections in eval): data-driven
anchors for nets that have them, COCO mAP in original pixels, PR curves and a confusion matrix with background each
validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor
from torchvision.ops import box_convert

from pipeline.data.anchor_cache import cached_kmeans_anchors
from pipeline.errors import ConfigError
from pipeline.metrics.coco_evaluator import CocoEvaluator
from pipeline.metrics.detection import COCO_STATS, pr_curve_figure
from pipeline.models.slots import Slots
from pipeline.ops.anchors import anchor_fit, anchor_plot, best_possible_recall
from pipeline.ops.boxes import unletterbox
from pipeline.tasks.common import Outbox, build_optimizers, schedule_from_config, to_primitive
from pipeline.viz import confusion_matrix_figure, detection_panel

# A checkpoint written before `model.loss` named its class holds the YOLO loss's bare keywords.
LEGACY_LOSS = "pipeline.losses.yolo.YOLOLoss"


class DetectionTask(pl.LightningModule):
    """Trains a detection net on box batches: `net(images [B, 3, S, S] in 0..1, targets)` returns a dict of losses
    in training mode ("loss" the total to optimise, the rest logged as `train/loss_<name>`), and in eval mode per
    image detections {"boxes" [D, 4] input pixels, "scores", "labels" 1..K}, with targets (losses or {}, detections).

    The net is built from `net` with `num_classes` (with background: class_names[0]), `input_size`, and where given
    `loss` (a `_target_` config: unknown keys fail on its signature) and `postprocess` (NMS settings). A net with
    data-driven anchors (`net.slots`, ours) gets them from `anchors` or, when null (or "kmeans"), from k-means over
    the training boxes when fitting starts (a fork passes the checkpoint's unless told otherwise); they then become
    the `anchors` hyper-parameter ([w, h] pixels at `input_size`), so checkpoints carry them to eval and predict.

    Each validation whose figures are wanted (`outbox.draw`) hands over (`outbox`, logged by pipeline.tracking)
    `val_images/epoch_<n>.png`,
    `pr_curves/epoch_<n>.png` and `plots/confusion_matrix.png`: `ops.confusion.detection_confusion` of the detections
    scoring >= SHOWN_SCORE at IoU 0.5 in original pixels, summed over the epoch and the DDP ranks; `evaluator`
    (`metrics.coco_evaluator.CocoEvaluator`) keeps it, and in pipeline-eval every detection's record.
    """

    TARGETS = "boxes"
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
        loss: dict | None = None,
        postprocess: dict | None = None,
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
        if loss is not None and "_target_" not in loss:
            loss = {"_target_": LEGACY_LOSS, **loss}
        self.save_hyperparameters(logger=False)
        extras = {key: value for key, value in (("loss", loss), ("postprocess", postprocess)) if value is not None}
        self.net = instantiate(net, num_classes=num_classes, input_size=input_size, **extras)
        # Nets with data-driven anchors (ours) hold them in `slots`; torchvision's has fixed ones.
        self.slots: Slots | None = getattr(self.net, "slots", None)
        if isinstance(anchors, str) and anchors != "kmeans":
            raise ValueError(f"model.anchors={anchors!r}: give [w, h] pairs, null or kmeans")
        if isinstance(anchors, list):
            if self.slots is None:
                raise ValueError(f"model.anchors: {type(self.net).__name__} has fixed anchors; leave it out")
            self.slots.set_anchors(anchors)
        # The last validation's mAP, confusion matrix and (pipeline-eval) prediction records for predictions.json.
        self.evaluator = CocoEvaluator(num_classes, self.IOU_TYPES, self.SHOWN_SCORE)
        self._vis: dict[str, Any] | None = None
        self.outbox = Outbox()  # figures, params and metrics for the run's record (pipeline.tracking logs them)

    # ---- anchors -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Before fitting a net with data-driven anchors: k-means anchors from the training boxes unless given or
        resumed; hand them over for the run's record."""
        if stage != "fit" or self.slots is None:
            return
        datamodule = self.trainer.datamodule
        odd = [s for s in [*datamodule.train_sizes, datamodule.val_size, self.hparams.input_size] if s % 32]
        if odd:
            raise ConfigError(f"the detector needs input sizes that are multiples of 32 (strides 8/16/32), got {odd}: "
                              "check data.train_sizes, data.val_size and model.input_size")  # fmt: skip
        zero = self.trainer.is_global_zero
        sizes = torch.from_numpy(datamodule.train_box_sizes(self.hparams.input_size)) if zero else None
        if self.slots.anchors is None:
            # Rank 0 clusters (or reads its cache) and every rank takes its anchors: the ranks agree by construction.
            # A failure there (too few boxes) reaches every rank, which would otherwise wait in the broadcast.
            found: list | str | None = None
            if zero:
                try:
                    found = cached_kmeans_anchors(sizes, 3 * self.slots.num_anchors, self.hparams.seed,
                                                  self.hparams.anchor_cache)  # fmt: skip
                    found = [[round(float(v), 1) for v in wh] for wh in found]
                except ValueError as err:
                    found = f"anchor k-means over the training boxes failed: {err}"
            found = self.trainer.strategy.broadcast(found, src=0)
            if isinstance(found, str):
                raise ConfigError(f"{found}; give model.anchors=[[w, h], ...] instead")
            self.slots.set_anchors(found)
            self.hparams.anchors = self.slots.anchors.reshape(-1, 2).tolist()
        if zero:
            self._log_anchors(sizes)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed or forked run keeps the checkpoint's anchors (whatever k-means gives on today's data); a
        continued schedule takes its settings from this run's config."""
        anchors = checkpoint["hyper_parameters"].get("anchors")
        if self.slots is not None and anchors is not None:
            self.slots.set_anchors(anchors)
            self.hparams.anchors = self.slots.anchors.reshape(-1, 2).tolist()
        schedule_from_config(checkpoint, self.hparams.scheduler)

    @rank_zero_only
    def _log_anchors(self, sizes: Tensor) -> None:
        anchors = self.slots.anchors.reshape(-1, 2)
        fit, recall = anchor_fit(sizes, anchors), best_possible_recall(sizes, anchors)
        text = " ".join(f"{w:g}x{h:g}" for w, h in anchors.tolist())
        print(f"Anchors at {self.hparams.input_size}px: {text} (fit: mean best IoU {fit:.3f}, recall {recall:.3f})")
        self.outbox.params["anchors"] = text
        self.outbox.metrics.update({"anchors/fit": fit, "anchors/best_possible_recall": recall})
        title = f"{len(sizes)} training boxes at {self.hparams.input_size}px"
        self.outbox.figures["anchors.png"] = anchor_plot(sizes, anchors, title)

    # ---- the net -------------------------------------------------------------------------------------------

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> Any:
        """The net's contract (see the class): losses in training mode, detections in eval mode."""
        return self.net(images, targets)

    def detect(self, images: Tensor) -> list[dict[str, Tensor]]:
        """images: [B, 3, S, S] in 0..1 -> per image {"boxes" [D, 4] (x1, y1, x2, y2), "scores", "labels" 1..K}."""
        return self.net(images)

    def _targets(self, batch: dict) -> list[dict[str, Tensor]]:
        """The batch's ground truth per image as the net takes it: {"boxes" [N, 4], "labels" [N], "iscrowd" [N]}."""
        per_image = zip(batch["boxes"], batch["labels"], batch["iscrowd"], strict=True)
        return [{"boxes": boxes, "labels": labels, "iscrowd": crowd} for boxes, labels, crowd in per_image]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.net(batch["image"], self._targets(batch))
        n = len(batch["image"])
        self.log("train/loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=n)
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items() if k != "loss"}, on_epoch=True, batch_size=n)
        self.log("train/size", float(batch["image"].shape[-1]), on_step=True, on_epoch=False, batch_size=n)
        return losses["loss"]

    # ---- validation ----------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        # Detections are kept for predictions.json only in `trainer.validate` (pipeline-eval), not while fitting.
        self.evaluator.reset(collect=self.trainer.state.fn == TrainerFn.VALIDATING)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses, detections = self.net(batch["image"], self._targets(batch))
        if "loss" in losses:  # torchvision's nets compute losses only in training mode
            self.log("val/loss", losses["loss"], on_epoch=True, sync_dist=True, batch_size=len(detections))
        per_image = zip(detections, batch["scale"], batch["orig_size"], strict=True)
        preds = [self._to_original(det, scale, h, w) for det, scale, (h, w) in per_image]
        targets = [{k: v.to(self.device) for k, v in gt.items()} for gt in batch["gt"]]
        self.evaluator.update(preds, targets, list(batch["image_id"]))
        if batch_idx == 0:
            k = self.hparams.num_vis_images
            shown = {key: batch[key][:k] for key in ("image", "boxes", "labels", "masks") if key in batch}
            self._vis = {"batch": shown, "detections": detections[:k]}

    def _to_original(self, det: dict[str, Tensor], scale: tuple[float, float], height: int, width: int) -> dict:
        """Letterboxed detections -> the metric's form in original pixels: {"boxes" xywh, "scores", "labels"}."""
        xywh = box_convert(unletterbox(det["boxes"], scale, height, width), "xyxy", "xywh")
        return {"boxes": xywh, "scores": det["scores"], "labels": det["labels"]}

    def on_validation_epoch_end(self) -> None:
        # Every rank takes part (collectives); rank 0 draws.
        every = self.evaluator.compute(
            self.trainer.world_size,
            lambda counts: self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum"),
        )
        for iou_type, type_stats in every.items():
            self._log_stats(type_stats, "val/" if iou_type == "bbox" else f"val/{iou_type}_")
        stats = every["bbox"]
        self.log("val/nonfinite_detections", float(stats["nonfinite"]), sync_dist=True)
        names = self.hparams.class_names
        # Rendered on rank 0 only: the logger keeps rank 0's pictures, the other ranks would draw them for nothing.
        if not self.trainer.sanity_checking and self.trainer.is_global_zero and self.outbox.draw:
            epoch = self.current_epoch
            figures = self.outbox.figures
            if self._vis is not None:
                figures[f"val_images/epoch_{epoch:03d}.png"] = self._panel(**self._vis)
            figures[f"pr_curves/epoch_{epoch:03d}.png"] = pr_curve_figure(stats["pr_curves"], names)
            title = f"Detections scoring >= {self.SHOWN_SCORE:g} at IoU 0.5, epoch {epoch}"
            # Drawn with true classes as rows, as the segmentation matrix: each row reads "where this class went";
            # the background row holds the false alarms, the background column the missed objects.
            confusion = confusion_matrix_figure(self.evaluator.confusion.T, names, title, unit="boxes")
            figures["plots/confusion_matrix.png"] = confusion
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
