"""COCO box and mask mAP whose numbers equal pycocotools' COCOeval, plus VOC 11-point AP and precision-recall curves."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities.distributed import gather_all_tensors

COCO_STATS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip
# faster-coco-eval logs its progress and the whole summary table at INFO on every compute; Hydra's logging setup
# would print that after every validation epoch.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
# pycocotools' thresholds in float64; torchmetrics' float32 defaults put recalls that land exactly on a
# threshold on the other side (../shared/DESIGN.md measured up to 7e-5 of mAP difference).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
REC_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()


class CocoMAP(MeanAveragePrecision):
    """torchmetrics' MeanAveragePrecision with pycocotools' exact thresholds, on faster-coco-eval by default.

    `backend` "faster_coco_eval" (default: its C++ COCOeval gives pycocotools' numbers on every metric test and on
    bench/eval_speed.py's 500-image set, in a fraction of the time) or "pycocotools" (the reference).

    `iou_types` ("bbox", "segm" or both): boxes are xywh in original image pixels, masks bool [N, H, W] in
    original pixels; targets may carry the annotation file's `area` (pycocotools uses it, not the box or mask
    area, for small/medium/large) and `iscrowd`. A detection's own area for the "segm" ranges is its mask area
    (as COCO's segm results, detectron2 and mmdetection). Detections with a non-finite box or score are dropped
    before the metric (pycocotools counts NaN boxes as matches) and counted in `nonfinite`.
    `class_metrics` stays off: it re-runs COCOeval once per class (twice the compute time) for per-class APs that
    `summary` reads from the extended summary's precision array instead.
    """

    def __init__(self, iou_types: tuple[str, ...] = ("bbox",), backend: str = "faster_coco_eval", **kwargs) -> None:
        super().__init__(
            box_format="xywh",
            iou_type=tuple(iou_types),
            iou_thresholds=IOU_THRESHOLDS,
            rec_thresholds=REC_THRESHOLDS,
            max_detection_thresholds=[1, 10, 100],
            extended_summary=True,
            backend=backend,
            **kwargs,
        )
        self.warn_on_many_detections = False  # more than 100 per image is normal at score threshold 0.001
        self.add_state("nonfinite", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: list[dict[str, Tensor]], target: list[dict[str, Tensor]]) -> None:
        """Add one batch: preds {"boxes" [N, 4], "scores" [N], "labels" [N]}, target {"boxes", "labels", …}.

        A target `area` of 0 becomes the smallest positive float: torchmetrics replaces areas <= 0 by the box area,
        pycocotools keeps 0 (small range).
        """
        finite = []
        for pred in preds:
            ok = torch.isfinite(pred["boxes"].reshape(-1, 4)).all(1) & torch.isfinite(pred["scores"])
            self.nonfinite += int((~ok).sum())
            finite.append({key: value[ok] for key, value in pred.items()})
        target = [_positive_area(item) for item in target]
        super().update(finite, target)

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:  # noqa: ANN001 (torchmetrics' signature)
        """Pad every rank to the same image count with empty images, then gather.

        torchmetrics gathers list states element by element, so ranks holding different numbers of images (our
        unpadded validation split) would hang; an image with neither ground truth nor detections changes no
        COCO number.
        """
        count = torch.tensor([len(self.groundtruth_labels)], device=self.device)
        counts = gather_all_tensors(count, group=process_group or self.process_group)
        missing = int(torch.stack(counts).max()) - len(self.groundtruth_labels)
        for name in self._reductions:
            state = getattr(self, name)
            if isinstance(state, list) and state and isinstance(state[0], Tensor):
                state.extend(state[0].new_zeros((0, *state[0].shape[1:])) for _ in range(missing))
            elif name in ("detection_mask", "groundtruth_mask") and "segm" in self.iou_type:
                state.extend(() for _ in range(missing))  # an image's masks are a tuple of RLEs
        super()._sync_dist(dist_sync_fn=dist_sync_fn, process_group=process_group)

    def summary(self, iou_type: str = "bbox") -> dict:
        """The 12 COCO stats, per-class AP, VOC 11-point AP@0.5, PR curves at IoU 0.5 and the non-finite count.

        Of one of the metric's `iou_types`; computing is cached, so asking for both evaluates once.

        Keys: COCO_STATS (floats, -1 where pycocotools gives -1: no ground truth in that range),
        "map_per_class" {label: AP} and "pr_curves" {label: (recall [101], precision [101])} for labels with
        ground truth, "map_50_voc" and "nonfinite". Without any detection the stats are 0 (-1 for an area range
        without ground truth), where pycocotools' loadRes would crash.

        "map_50_voc" is VOC2007's 11-point interpolation applied to COCOeval's matching, not the VOC devkit's
        number: per label with non-crowd ground truth, the mean over recall r = 0, 0.1, …, 1 of the highest
        precision at recall >= r (0 where no detection reaches r), at IoU >= 0.5, area "all", the 100
        best-scoring detections per image; then the mean over those labels. That is exactly pycocotools'
        interpolated precision at recall thresholds 0, 0.1, …, 1 (indices 0, 10, …, 100 of the precision array).
        The matches are COCOeval's: in score order each detection takes the still-unmatched non-crowd ground
        truth of highest IoU (>= 0.5); failing that, a crowd region it covers by intersection over the
        detection's own area >= 0.5, which makes it ignored (neither TP nor FP; a crowd region takes any number);
        crowd regions never count in recall. It differs from the VOC devkit (voc_eval) where VOC assigns each
        detection its single highest-IoU object (a duplicate of a found object is a false positive even when
        another object it overlaps is free), ignores a detection only when that object is `difficult` (by
        IoU, not intersection over the detection), needs IoU > 0.5 (strictly), adds 1 to inclusive pixel sides,
        and keeps every detection; VOC2010+ reports the area under the whole curve instead of 11 points. Our VOC
        readers turn `difficult` objects into crowd regions, so they are ignored COCO's way. For masks
        ("segm_map_50_voc") the same with mask IoU, which the VOC devkit does not define.
        """
        if iou_type not in self.iou_type:
            raise ValueError(f"this metric computes {self.iou_type}, not {iou_type!r}")
        prefix = "" if len(self.iou_type) == 1 else f"{iou_type}_"  # torchmetrics' key names
        result = self.compute()
        stats = {key: float(result[prefix + key]) for key in COCO_STATS}
        # precision [T, R, K, A, M]: IoU threshold, recall threshold, class (sorted labels), area, max dets.
        key = prefix + "precision"
        precision = result[key].double().numpy() if key in result else np.zeros((10, 101, 0, 4, 3))
        labels = [int(c) for c in result["classes"].reshape(-1).tolist()]
        per_class, curves, voc = {}, {}, []
        for k, label in enumerate(labels[: precision.shape[2]]):
            p = precision[:, :, k, 0, -1]  # area "all", 100 detections
            if (p == -1).all():  # no ground truth of this class
                continue
            per_class[label] = float(p[p > -1].mean())
            at_50 = np.clip(p[0], 0.0, None)  # -1 marks "no ground truth" only; unreached recalls are already 0
            curves[label] = (np.asarray(REC_THRESHOLDS), at_50)
            voc.append(float(at_50[::10].mean()))
        return {
            **stats,
            "map_per_class": per_class,
            "map_50_voc": float(np.mean(voc)) if voc else 0.0,
            "pr_curves": curves,
            "nonfinite": int(self.nonfinite),
        }


def _positive_area(item: dict[str, Tensor]) -> dict[str, Tensor]:
    """The target with `area` 0 raised to the smallest positive float, which torchmetrics passes on unchanged."""
    if "area" not in item:
        return item
    area = item["area"] if item["area"].is_floating_point() else item["area"].float()
    return {**item, "area": area.clamp_min(torch.finfo(area.dtype).tiny)}


def pycocotools_stats(annotations: str | Path, predictions: str | Path, iou_type: str = "bbox") -> list[float]:
    """pycocotools' own 12 COCO numbers for a results file against an instances file (the reference).

    For "segm" the results' `bbox` fields are dropped first, as detectron2's and mmdetection's evaluators do:
    with a bbox present, loadRes sizes each detection by its box instead of its mask, which moves only the
    small/medium/large numbers (a detection's area decides in which range an unmatched one counts).
    """
    results = json.loads(Path(predictions).read_text())
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def pr_curve_figure(curves: dict[int, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]) -> np.ndarray:
    """Precision-recall curves at IoU 0.5, one line per class with its AP@0.5 in the legend, as RGB uint8 [H, W, 3]."""
    figure = Figure(figsize=(5, 4), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (recall, precision) in sorted(curves.items()):
        axes.plot(recall, precision, label=f"{class_names[label]} (AP@0.5 {precision.mean():.3f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall at IoU 0.5")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(loc="lower left")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
