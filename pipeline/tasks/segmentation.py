"""Semantic segmentation: cross-entropy with void pixels, FCN-paper mIoU at each image's own resolution, overlays,
the confusion matrix and per-class IoU logged each validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from pipeline.metrics.segmentation import ConfusionMatrixIoU, iou_from_confmat
from pipeline.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from pipeline.ops.boxes import unletterbox_map
from pipeline.tasks.common import Outbox, build_optimizers, schedule_from_config, to_primitive
from pipeline.viz import comparison_panel, confusion_matrix_figure, iou_bar_figure


class SegmentationTask(pl.LightningModule):
    """Trains a dense classifier `net: [B, 3, H, W] -> [B, C, H, W]` on batches {"image", "mask"}.

    The net, optimizer and scheduler arrive as config dicts (`_target_` + args) and are built here, so the
    checkpoint's hyper-parameters are primitives and load under torch's weights-only unpickler.
    `monitor` names the validation metric that ranks checkpoints and that sweeps optimise. Validation scores
    the predictions mapped back to each image's original resolution (`val/mIoU`, `val/pixel_acc`, `val/IoU/<class>`),
    as the FCN paper and VOC do and as `pipeline-predict` outputs them; `val/mIoU_letterbox` is the same on the
    letterboxed `val_size` masks the loss sees. Each validation whose figures are wanted (`outbox.draw`) also logs
    `val_images/epoch_<n>.png`, `plots/confusion_matrix.png` (that confusion matrix, row-normalised) and
    `plots/iou_per_class.png`, the plots overwritten each time (the store keeps the last drawn; the artifact count
    stays bounded); `confmat` and `per_class_iou` keep every validation's values.
    """

    TARGETS = "semantic"

    def __init__(
        self,
        net: dict,
        optimizer: dict,
        scheduler: dict | None,
        num_classes: int,
        class_names: Sequence[str],
        ignore_index: int = 255,
        monitor: str = "val/mIoU",
        scheduler_interval: str = "epoch",
        num_vis_images: int = 4,
    ) -> None:
        super().__init__()
        # save_hyperparameters reads these locals: make them plain dicts/lists (no OmegaConf containers).
        net, optimizer, scheduler, class_names = (to_primitive(v) for v in (net, optimizer, scheduler, class_names))
        if isinstance(net.get("backbone", {}), str):  # a checkpoint written before the model/backbone group
            flat = {k: net.pop(k) for k in ("backbone", "pretrained", "weights", "dilate_last", "width") if k in net}
            net["backbone"] = {"name": flat.pop("backbone"), **flat}
        self.save_hyperparameters(logger=False)  # the full config goes to MLflow once, by pipeline.tracking
        self.net = instantiate(net)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.val_iou = ConfusionMatrixIoU(num_classes, ignore_index)
        self.val_iou_letterbox = ConfusionMatrixIoU(num_classes, ignore_index)
        self._vis: dict[str, torch.Tensor] | None = None
        # The last validation's confusion matrix [C, C] (rows: true class; void excluded) and per-class IoU [C].
        self.confmat: torch.Tensor | None = None
        self.per_class_iou: torch.Tensor | None = None
        self.outbox = Outbox()  # figures for the run's record (pipeline.tracking logs them)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] RGB in 0..1 -> logits [B, C, H, W]."""
        return self.net((images - self.mean) / self.std)

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over non-void pixels; 0 (not cross-entropy's NaN) for an all-void batch."""
        total = F.cross_entropy(logits, masks, ignore_index=self.hparams.ignore_index, reduction="sum")
        return total / (masks != self.hparams.ignore_index).sum().clamp(min=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self._loss(logits, batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(logits))
        self.log("train/size", float(batch["image"].shape[-1]), on_step=True, on_epoch=False, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        loss = self._loss(logits, batch["mask"])
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(logits))
        self.val_iou_letterbox.update(logits, batch["mask"])
        for image_logits, original in zip(logits, batch["orig_mask"], strict=True):
            self.val_iou.update(unletterbox_map(image_logits, *original.shape)[None], original[None])
        if batch_idx == 0:
            k = self.hparams.num_vis_images
            self._vis = {"image": batch["image"][:k], "mask": batch["mask"][:k], "pred": logits[:k].argmax(1)}

    def on_validation_epoch_end(self) -> None:
        confmat = self.val_iou.compute_confmat()  # synced across DDP ranks: every rank logs the same values
        stats = iou_from_confmat(confmat)
        self.confmat, self.per_class_iou = confmat.cpu(), stats["per_class_IoU"].cpu()
        letterboxed = self.val_iou_letterbox.summary()
        self.val_iou.reset()
        self.val_iou_letterbox.reset()
        # Already global; sync_dist only averages identical values (and keeps Lightning from warning).
        self.log_dict(
            {"val/mIoU": stats["mIoU"].float(), "val/pixel_acc": stats["pixel_acc"].float()},
            prog_bar=True,
            sync_dist=True,
        )
        self.log("val/mIoU_letterbox", letterboxed["mIoU"].float(), sync_dist=True)
        per_class = zip(self.hparams.class_names, stats["per_class_IoU"], strict=True)
        self.log_dict(
            {f"val/IoU/{name}": iou.float() for name, iou in per_class if not torch.isnan(iou)}, sync_dist=True
        )
        # Rendered on rank 0 only: the logger keeps rank 0's pictures, the other ranks would draw them for nothing.
        if not self.trainer.sanity_checking and self.trainer.is_global_zero and self.outbox.draw:
            if self._vis is not None:
                vis, num_classes = self._vis, self.hparams.num_classes
                panel = comparison_panel(vis["image"], vis["mask"], vis["pred"], num_classes)
                self.outbox.figures[f"val_images/epoch_{self.current_epoch:03d}.png"] = panel
            self._log_plots()
        self._vis = None

    def _log_plots(self) -> None:
        """The last validation's confusion matrix and per-class IoU as `plots/…` images (replaced each epoch)."""
        names, epoch, figures = self.hparams.class_names, self.current_epoch, self.outbox.figures
        title = f"Confusion matrix, epoch {epoch} (mIoU {float(self.per_class_iou.nanmean()):.3f})"
        figures["plots/confusion_matrix.png"] = confusion_matrix_figure(self.confmat, names, title)
        figures["plots/iou_per_class.png"] = iou_bar_figure(self.per_class_iou, names, f"IoU per class, epoch {epoch}")

    def predict_masks(self, images: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Letterboxed images [B, 3, S, S] in 0..1 and each one's original (H, W) -> labels [H, W] per image."""
        return [unletterbox_map(logits, *size).argmax(0) for logits, size in zip(self(images), sizes, strict=True)]

    def configure_optimizers(self) -> Any:
        return build_optimizers(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A continued schedule takes its settings (a cosine's length, say) from this run's config."""
        schedule_from_config(checkpoint, self.hparams.scheduler)
