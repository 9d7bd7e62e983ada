"""mIoU as the FCN paper defines it: one confusion matrix accumulated over the whole validation set."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassJaccardIndex


class ConfusionMatrixIoU(MulticlassJaccardIndex):
    """MulticlassJaccardIndex whose update stays fast under `deterministic=True`.

    torchmetrics replaces `torch.bincount` by an [N, C*C] comparison whenever deterministic algorithms are on;
    an integer bincount without weights is exact whatever the summation order, so we always use it.
    `compute()` is torchmetrics' macro mIoU; `summary()` adds per-class IoU and pixel accuracy.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, average="macro", validate_args=False)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """preds: [B, C, H, W] logits or [B, H, W] labels; target: [B, H, W] labels (ignore_index = void)."""
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        preds, target = preds.flatten().long(), target.flatten().long()
        n = self.num_classes
        void = target == self.ignore_index if self.ignore_index is not None else torch.zeros_like(target, dtype=bool)
        bad = ~void & ((target < 0) | (target >= n))
        if bad.any():
            raise ValueError(
                f"target holds label {int(target[bad][0])} outside 0..{n - 1} "
                f"(and not ignore_index={self.ignore_index})"
            )
        # Void pixels are counted into one extra bin that is dropped: cheaper than torchmetrics' boolean indexing,
        # which copies every kept pixel (half of an update's time on 512 x 512 masks, bench/eval_speed.py).
        index = torch.where(void, n * n, target * n + preds)
        self.confmat += torch.bincount(index, minlength=n * n + 1)[: n * n].reshape(n, n)

    def summary(self) -> dict[str, torch.Tensor]:
        """mIoU, per-class IoU [C] and pixel accuracy from the (DDP-synced) confusion matrix.

        A class with no ground-truth and no predicted pixel in the whole set has IoU NaN and is left out of the
        mean (torchmetrics' macro average does the same); ignore_index pixels never count.
        """
        return iou_from_confmat(self.compute_confmat())

    def compute_confmat(self) -> torch.Tensor:
        """The confusion matrix [C, C] (rows: target, columns: prediction), synced across processes."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=self._should_unsync):
            return self.confmat.clone()


def iou_from_confmat(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class IoU = n_ii / (t_i + sum_j n_ji - n_ii), its mean over present classes, and pixel accuracy."""
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    per_class = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = confmat.sum()
    return {
        "mIoU": per_class.nanmean(),
        "per_class_IoU": per_class,
        "pixel_acc": tp.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64),
    }
