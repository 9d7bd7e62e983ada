"""Pictures people would rather look at than read: masks and boxes drawn on images, side-by-side panels, confusion
matrices, per-class IoU and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid


def palette(num_classes: int) -> torch.Tensor:
    """A fixed, distinguishable colour per class as uint8 [C, 3]; class 0 (background) is black."""
    generator = torch.Generator().manual_seed(1234)
    colours = torch.randint(64, 256, (num_classes, 3), generator=generator, dtype=torch.uint8)
    base = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]])
    colours[: min(num_classes, len(base))] = base[: min(num_classes, len(base))].to(torch.uint8)
    return colours


def overlay(image: torch.Tensor, mask: torch.Tensor, num_classes: int, alpha: float = 0.5) -> torch.Tensor:
    """Blend non-background classes of a label mask [H, W] onto an image [3, H, W] (uint8 or float 0..1)."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    image, mask = image.cpu(), mask.cpu()
    present = [c for c in range(1, num_classes) if bool((mask == c).any())]
    if not present:
        return image
    masks = torch.stack([mask == c for c in present])
    colours = [tuple(int(v) for v in palette(num_classes)[c]) for c in present]
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=colours)


def comparison_panel(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> np.ndarray:
    """One row per image: input | ground truth | prediction, as uint8 [H, W, 3] for an image artifact."""
    tiles = []
    for image, target, pred in zip(images, targets, preds, strict=True):
        plain = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
        tiles += [plain, overlay(plain, target, num_classes), overlay(plain, pred, num_classes)]
    grid = make_grid(tiles, nrow=3, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def draw_boxes(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boxes [N, 4] (x1, y1, x2, y2), labels 1..K, drawn in class colours on an image [3, H, W] -> uint8 [3, H, W]."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    image = image.cpu()
    if len(boxes) == 0:
        return image
    colours = palette(len(class_names))
    names = [class_names[int(c)] for c in labels]
    if scores is not None:
        names = [f"{n} {float(s):.2f}" for n, s in zip(names, scores, strict=True)]
    return draw_bounding_boxes(
        image,
        boxes.detach().cpu().float(),
        labels=names,
        colors=[tuple(int(v) for v in colours[int(c)]) for c in labels],
        width=max(1, image.shape[-1] // 160),
    )


def draw_instances(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor | None,
    class_names: list[str],
    scores: torch.Tensor | None = None,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Instance masks [N, H, W] (bool; None: boxes only) in class colours, then their boxes, on an image [3, H, W]
    -> uint8 [3, H, W]."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    image = image.cpu()
    if masks is not None and len(masks):
        colours = palette(len(class_names))
        image = draw_segmentation_masks(
            image, masks.cpu().bool(), alpha=alpha, colors=[tuple(int(v) for v in colours[int(c)]) for c in labels]
        )
    return draw_boxes(image, boxes, labels, class_names, scores)


def detection_panel(
    images: torch.Tensor,
    gt_boxes: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    detections: list[dict[str, torch.Tensor]],
    class_names: list[str],
    gt_masks: list[torch.Tensor] | None = None,
    min_score: float = 0.3,
) -> np.ndarray:
    """One row per image: ground truth | detections scoring at least `min_score`, as uint8 [H, W, 3].

    Instance masks (bool [N, H, W]: `gt_masks`, the detections' "masks") are drawn under their boxes when given.
    """
    tiles = []
    gt_masks = gt_masks if gt_masks is not None else [None] * len(images)
    for image, boxes, labels, masks, det in zip(images, gt_boxes, gt_labels, gt_masks, detections, strict=True):
        shown = det["scores"] >= min_score
        tiles.append(draw_instances(image, boxes, labels, masks, class_names))
        det_masks = det["masks"][shown] if "masks" in det else None
        tiles.append(
            draw_instances(
                image, det["boxes"][shown], det["labels"][shown], det_masks, class_names, det["scores"][shown]
            )
        )
    grid = make_grid(tiles, nrow=2, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def box_size_scatter(sizes: dict[str, np.ndarray]) -> np.ndarray:
    """Box widths vs heights [N, 2] (pixels) per split on log-log axes, with COCO's area limits, as uint8 [H, W, 3]."""
    figure = Figure(figsize=(6, 5), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for split, wh in sizes.items():
        if len(wh):
            axes.scatter(wh[:, 0], wh[:, 1], s=4, alpha=0.4, linewidths=0, label=f"{split} ({len(wh)})")
    for side, name in ((32, "small | medium"), (96, "medium | large")):
        w = np.geomspace(1, 4096, 64)
        axes.plot(w, side**2 / w, color="grey", linestyle="--", linewidth=0.8)
        axes.annotate(name, (side, side), fontsize=7, color="grey")
    axes.set(xscale="log", yscale="log", xlabel="box width (px)", ylabel="box height (px)", title="Box sizes")
    axes.grid(alpha=0.3)
    if any(len(wh) for wh in sizes.values()):
        axes.legend(loc="upper left")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def objective_plot(rows: list[dict[str, Any]], keys: list[str], monitor: str) -> np.ndarray:
    """uint8 [H, W, 3]: the objective against each varied key (numbers on a log axis when they span 10×)."""
    fig = Figure(figsize=(3.2 * max(1, len(keys)), 3.0), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys or ["job"]):
        ax = fig.add_subplot(1, max(1, len(keys)), i + 1)
        xs = [str(r.get(key, r["job"])) for r in rows]
        ys = [r["value"] for r in rows]
        if all(is_number(x) for x in xs):
            nums = [float(x) for x in xs]
            ax.scatter(nums, ys)
            if min(nums) > 0 and max(nums) / min(nums) >= 10:
                ax.set_xscale("log")
            if len(set(nums)) <= 8:  # a grid: label exactly the values tried
                ax.set_xticks(sorted(set(nums)), [f"{v:g}" for v in sorted(set(nums))], rotation=30)
                ax.minorticks_off()
        else:
            labels = sorted(set(xs))
            ax.scatter([labels.index(x) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel(monitor)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def row_normalised(matrix: torch.Tensor | np.ndarray) -> np.ndarray:
    """Counts [C, C] -> float64 [C, C] whose rows sum to 1; NaN rows where a row has no count (a class absent)."""
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def confusion_matrix_figure(
    matrix: torch.Tensor | np.ndarray, class_names: Sequence[str], title: str, unit: str = "pixels"
) -> np.ndarray:
    """Counts [C, C] (rows: true class, columns: predicted) drawn row-normalised, each row's total `unit` in its
    label, as RGB uint8 [H, W, 3].

    Each row reads "where this class went"; a row without counts stays blank. Up to 30 classes, cells holding at
    least 0.005 of their row are annotated (text is most of the drawing time: ~0.1 s for 4 classes on a CPU core).
    """
    counts = np.asarray(matrix, dtype=np.int64)
    shares = row_normalised(counts)
    size = len(class_names)
    side = min(24.0, 3.0 + 0.45 * size)
    figure = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")  # makes room for the colour bar
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(shares), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's " + unit)
    rows = [f"{name} ({total:,})" for name, total in zip(class_names, counts.sum(1), strict=True)]
    fontsize = 9 if size <= 12 else 6
    small = fontsize - 1
    axes.set_xticks(range(size), list(class_names), rotation=45, ha="right", fontsize=fontsize)
    axes.set_yticks(range(size), rows, fontsize=fontsize)
    axes.set(xlabel="predicted", ylabel=f"true ({unit})", title=title)
    if size <= 30:
        for (row, col), share in np.ndenumerate(shares):
            if share >= 0.005:
                colour = "white" if share > 0.5 else "black"
                text = axes.text(col, row, f"{share:.2f}", ha="center", va="center", fontsize=small, color=colour)
                text.set_in_layout(False)  # inside the axes: the layout need not measure it
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def iou_bar_figure(per_class_iou: torch.Tensor | np.ndarray, class_names: Sequence[str], title: str) -> np.ndarray:
    """Per-class IoU [C] as bars with the mean over present classes (dashed, its value in the title), as RGB uint8
    [H, W, 3]; NaN (a class with neither true nor predicted pixels) is marked "absent" instead of a bar."""
    iou = np.asarray(per_class_iou, dtype=np.float64)
    figure = Figure(figsize=(min(24.0, 3.0 + 0.4 * len(iou)), 3.5), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colours = [tuple(int(v) / 255 for v in c) for c in palette(len(iou))]
    colours[0] = (0.5, 0.5, 0.5)  # background is black in the overlays: grey here
    axes.bar(range(len(iou)), np.nan_to_num(iou), color=colours)
    for index, value in enumerate(iou):
        label = "absent" if np.isnan(value) else f"{value:.2f}"
        axes.text(index, 0.01 if np.isnan(value) else value + 0.01, label, ha="center", va="bottom", fontsize=7)
    if not np.isnan(iou).all():
        axes.axhline(np.nanmean(iou), color="black", linestyle="--", linewidth=0.8)
        title = f"{title} (dashed: mean {np.nanmean(iou):.3f})"
    many = len(iou) > 8
    axes.set_xticks(range(len(iou)), list(class_names), rotation=45 if many else 0, ha="right" if many else "center")
    axes.set(ylim=(0, 1.08), ylabel="IoU", title=title)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def training_curves_figure(
    epochs: Sequence[int],
    losses: dict[str, Sequence[float]],
    learning_rates: dict[str, Sequence[float]],
) -> np.ndarray:
    """Loss curves (top) and learning rates (bottom, log axis when positive) per epoch, as RGB uint8 [H, W, 3].

    `losses` and `learning_rates` map a curve's name to one value per epoch of `epochs` (NaN: not measured that
    epoch, e.g. no validation); epochs count from 0, as Lightning and the `val_images/epoch_<n>` names do.
    """
    x = np.asarray(epochs, dtype=np.float64)
    figure = Figure(figsize=(6, 5), dpi=100)
    canvas = FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for name, values in losses.items():
        y = np.asarray(values, dtype=np.float64)
        shown = ~np.isnan(y)
        top.plot(x[shown], y[shown], marker="o" if shown.sum() < 30 else None, markersize=3, label=name)
    top.set(ylabel="loss", title="Training curves")
    top.grid(alpha=0.3)
    if losses:
        top.legend(loc="upper right")
    rates = [np.asarray(v, dtype=np.float64) for v in learning_rates.values()]
    for name, y in zip(learning_rates, rates, strict=True):
        bottom.plot(x, y, label=name)
    if rates and all(np.nanmin(y) > 0 for y in rates if (~np.isnan(y)).any()):
        bottom.set_yscale("log")
    bottom.set(xlabel="epoch", ylabel="learning rate")
    bottom.grid(alpha=0.3)
    if len(learning_rates) > 1:
        bottom.legend(loc="upper right")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def is_number(text: str) -> bool:
    """Whether a config value (a string) reads as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True
