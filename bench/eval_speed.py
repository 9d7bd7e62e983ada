"""Evaluation speed: the validation metrics as validation feeds them, against their references, side by side.

Box and mask mAP: `CocoMAP` fed batch by batch exactly as validation feeds it (`DetectionTask` with
iou_types ("bbox",), `InstanceTask` with ("bbox", "segm"): `update(preds, targets)` per batch with dense bool
masks in original pixels, then `summary(...)`), against pycocotools' COCOeval run directly on the raw results
(COCO index of the ground truth, `loadRes`, evaluate, accumulate, summarize; `bbox` dropped from the segm
results as `pycocotools_stats` does). CocoMAP runs on both of torchmetrics' backends: `faster_coco_eval` (the
pipeline's default) and `pycocotools`; faster-coco-eval's own COCOeval_faster is timed directly too. One seeded
prediction set: `--images` images of 160-320 px, 3-12 objects of 4 classes (polygons, about 50/37/13% in COCO's
small/medium/large areas, a third placed overlapping another), a crowd region (uncompressed RLE) in 30% of the
images, and exactly `--detections` per image: 1-4 jittered copies of each object (10% with a wrong label), a few
inside each crowd region, the rest false positives; masks as RLE.

mIoU: `ConfusionMatrixIoU.update` on `--miou-masks` label maps of `--miou-size`² with 21 classes and 255 void,
against a numpy `bincount` confusion matrix of the same arrays, from label maps and from logits [B, 21, H, W]
(argmax inside the timed part on both sides).

Every figure is the median of `--repeats` runs, the methods taking turns within each repeat; the table gives wall
times, the ratio of the medians to the reference's and the largest absolute difference over the 12 COCO numbers.
Headline rows: each CocoMAP path's ratio (target <= 0.25x pycocotools with numbers equal to 1e-6) and the mIoU
update's ratio to numpy.

    python bench/eval_speed.py                      # full run (~4.5 min on 2 idle cores)
    python bench/eval_speed.py --images 50 --repeats 1
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import dataclass, field
from functools import partial

import faster_coco_eval
import harness
import numpy as np
import pycocotools.mask as mask_utils
import torch
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.metrics.detection import COCO_STATS, CocoMAP
from pipeline.metrics.segmentation import ConfusionMatrixIoU

NUM_CLASSES = 4
BATCH = 16  # images per validation batch (conf/data/shapes.yaml)
SIDES = ((8, 48), (48, 160), (160, 400))  # polygon sizes whose areas fall mostly in COCO's small, medium, large


@dataclass
class Image:
    """One image's ground truth and detections: boxes xywh float32, labels 1..K, RLEs for masks."""

    height: int
    width: int
    gt_boxes: np.ndarray  # [N, 4] float32 xywh
    gt_labels: np.ndarray  # [N] int64
    gt_crowd: np.ndarray  # [N] int64
    gt_area: np.ndarray  # [N] float32, mask area as in COCO files
    gt_segm: list = field(default_factory=list)  # polygon lists (objects) or uncompressed RLE (crowd)
    gt_rles: list = field(default_factory=list)  # compressed RLE of each ground-truth mask
    dt_boxes: np.ndarray | None = None  # [D, 4] float32 xywh
    dt_labels: np.ndarray | None = None  # [D] int64
    dt_scores: np.ndarray | None = None  # [D] float32
    dt_rles: list = field(default_factory=list)  # compressed RLE of each detection mask


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, h: int, w: int) -> np.ndarray:
    """A star-shaped polygon around (cx, cy) with radii up to (rx, ry), clipped to the image: [V, 2] float32."""
    vertices = int(rng.integers(6, 15))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, vertices))
    radius = rng.uniform(0.6, 1.0, vertices)
    xs = np.clip(cx + rx * radius * np.cos(angles), 0, w)
    ys = np.clip(cy + ry * radius * np.sin(angles), 0, h)
    return np.stack([xs, ys], 1).astype(np.float32)


def _jitter(rng: np.random.Generator, poly: np.ndarray, h: int, w: int) -> np.ndarray:
    """A detection's outline: the polygon shifted, rescaled and with its vertices moved by ~10% of its size."""
    centre = poly.mean(0)
    size = float(np.ptp(poly, 0).max()) + 1.0
    moved = (poly - centre) * np.exp(rng.normal(0, 0.12)) + centre + rng.normal(0, 0.1 * size, 2)
    moved += rng.normal(0, 0.03 * size, poly.shape)
    return np.clip(moved, [0, 0], [w, h]).astype(np.float32)


def _box(poly: np.ndarray) -> np.ndarray:
    """[V, 2] polygon -> xywh [4] float32 (at least 1 px wide and high)."""
    low, high = poly.min(0), poly.max(0)
    return np.array([*low, *np.maximum(high - low, 1.0)], dtype=np.float32)


def _rle(poly: np.ndarray, h: int, w: int) -> dict:
    """Rasterised polygon as one compressed RLE (pycocotools' own polygon rule, as annToRLE)."""
    return mask_utils.merge(mask_utils.frPyObjects([poly.astype(np.float64).ravel().tolist()], h, w))


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """bool [H, W] -> COCO's uncompressed RLE {"size", "counts": run lengths in column order, zeros first}."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = runs.tolist() if flat[0] == 0 else [0, *runs.tolist()]
    return {"size": list(mask.shape), "counts": counts}


def make_set(images: int, detections: int, seed: int) -> list[Image]:
    """The seeded prediction set described in the module docstring; scores distinct (no tie order effects)."""
    rng = np.random.default_rng(seed)
    out: list[Image] = []
    raw_scores: list[np.ndarray] = []
    for _ in range(images):
        h, w = (int(v) for v in rng.integers(160, 321, 2))
        polys, labels, crowd_rles = [], [], []
        for k in range(int(rng.integers(3, 13))):
            low, high = SIDES[int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
            side = float(np.exp(rng.uniform(np.log(low), np.log(min(high, 1.2 * min(h, w))))))
            if k and rng.random() < 1 / 3:  # overlapping a previous object by about half its size
                cx, cy = polys[int(rng.integers(len(polys)))].mean(0) + rng.normal(0, 0.4 * side, 2)
            else:
                cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
            cx, cy = float(np.clip(cx, 2, w - 2)), float(np.clip(cy, 2, h - 2))
            poly = _polygon(rng, cx, cy, side / 2 * rng.uniform(0.6, 1.4), side / 2 * rng.uniform(0.6, 1.4), h, w)
            if mask_utils.area(_rle(poly, h, w)) == 0:
                continue
            polys.append(poly)
            labels.append(int(rng.integers(1, NUM_CLASSES + 1)))
        crowd_boxes = []
        if rng.random() < 0.3:  # a crowd region: a blob over a third to a half of the image
            cw, ch = int(w * rng.uniform(0.4, 0.7)), int(h * rng.uniform(0.4, 0.7))
            x0, y0 = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            outline = _polygon(rng, x0 + cw / 2, y0 + ch / 2, cw / 2, ch / 2, h, w)
            crowd_rles.append(_uncompressed_rle(mask_utils.decode(_rle(outline, h, w)).astype(bool)))
            crowd_boxes.append((_box(outline), int(rng.integers(1, NUM_CLASSES + 1))))
        gt_rles = [_rle(p, h, w) for p in polys]
        gt_rles += [mask_utils.frPyObjects(r, h, w) for r in crowd_rles]
        image = Image(
            height=h,
            width=w,
            gt_boxes=np.array([_box(p) for p in polys] + [b for b, _ in crowd_boxes], np.float32).reshape(-1, 4),
            gt_labels=np.array(labels + [c for _, c in crowd_boxes], dtype=np.int64),
            gt_crowd=np.array([0] * len(polys) + [1] * len(crowd_boxes), dtype=np.int64),
            gt_area=np.array([mask_utils.area(r) for r in gt_rles], dtype=np.float32),
            gt_segm=[[p.astype(np.float64).ravel().tolist()] for p in polys] + crowd_rles,
            gt_rles=gt_rles,
        )
        det_polys, det_labels, scores = [], [], []
        for poly, label in zip(polys, labels, strict=True):
            for copy_index in range(int(rng.integers(1, 5))):
                det_polys.append(_jitter(rng, poly, h, w))
                wrong = rng.random() < 0.1
                det_labels.append(int(rng.integers(1, NUM_CLASSES + 1)) if wrong else label)
                scores.append(rng.uniform(0.3, 1.0) if copy_index == 0 else rng.uniform(0.0, 0.8))
        for (x0, y0, cw, ch), label in crowd_boxes:
            for _ in range(int(rng.integers(3, 9))):  # people inside the crowd: ignored when matched to it
                side = rng.uniform(8, 0.5 * min(cw, ch))
                cx, cy = rng.uniform(x0, x0 + cw), rng.uniform(y0, y0 + ch)
                det_polys.append(_polygon(rng, cx, cy, side / 2, side / 2, h, w))
                det_labels.append(label)
                scores.append(rng.uniform(0.2, 0.9))
        while len(det_polys) < detections:  # false positives anywhere
            side = float(np.exp(rng.uniform(np.log(8), np.log(0.6 * min(h, w)))))
            cx, cy = rng.uniform(0.05 * w, 0.95 * w), rng.uniform(0.05 * h, 0.95 * h)
            det_polys.append(_polygon(rng, cx, cy, side / 2, side / 2, h, w))
            det_labels.append(int(rng.integers(1, NUM_CLASSES + 1)))
            scores.append(rng.uniform(0.0, 0.6))
        det_polys, det_labels, scores = det_polys[:detections], det_labels[:detections], scores[:detections]
        image.dt_boxes = np.stack([_box(p) for p in det_polys]).astype(np.float32)
        image.dt_labels = np.array(det_labels, dtype=np.int64)
        image.dt_rles = [_rle(p, h, w) for p in det_polys]
        raw_scores.append(np.array(scores))
        out.append(image)
    # Distinct float32 scores in the same order as the drawn ones: ties would make mAP depend on sort stability.
    flat = np.concatenate(raw_scores)
    ranks = np.empty(flat.size)
    ranks[np.argsort(flat, kind="stable")] = np.arange(1, flat.size + 1)
    ranks = (ranks / (flat.size + 1)).astype(np.float32)
    start = 0
    for image in out:
        image.dt_scores = ranks[start : start + len(image.dt_labels)]
        start += len(image.dt_labels)
    return out


def coco_files(images: list[Image]) -> tuple[dict, list[dict]]:
    """The instances file (as a dict) and the raw results list with `bbox`, `score` and compressed RLE masks."""
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)]
    gt = {"info": {}, "images": [], "annotations": [], "categories": categories}
    results = []
    for image_id, image in enumerate(images, start=1):
        gt["images"].append({"id": image_id, "height": image.height, "width": image.width})
        for box, label, crowd, area, segm in zip(
            image.gt_boxes, image.gt_labels, image.gt_crowd, image.gt_area, image.gt_segm, strict=True
        ):
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [float(v) for v in box], "area": float(area), "iscrowd": int(crowd), "segmentation": segm,
            })  # fmt: skip
        for box, label, score, rle in zip(image.dt_boxes, image.dt_labels, image.dt_scores, image.dt_rles, strict=True):
            results.append({
                "image_id": image_id, "category_id": int(label), "bbox": [float(v) for v in box], "score": float(score),
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("utf-8")},
            })  # fmt: skip
    return gt, results


def _dense(rles: list[dict], h: int, w: int) -> torch.Tensor:
    """Compressed RLEs -> bool [N, H, W] (C order, as the task's pasted masks)."""
    if not rles:
        return torch.zeros((0, h, w), dtype=torch.bool)
    return torch.from_numpy(np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))).bool()


def _batch(images: list[Image], masks: bool) -> tuple[list[dict], list[dict]]:
    """One validation batch as the task's validation_step hands it to CocoMAP.update."""
    preds, targets = [], []
    for image in images:
        pred = {
            "boxes": torch.from_numpy(image.dt_boxes),
            "scores": torch.from_numpy(image.dt_scores),
            "labels": torch.from_numpy(image.dt_labels),
        }
        target = {
            "boxes": torch.from_numpy(image.gt_boxes),
            "labels": torch.from_numpy(image.gt_labels),
            "iscrowd": torch.from_numpy(image.gt_crowd),
            "area": torch.from_numpy(image.gt_area),
        }
        if masks:
            pred["masks"] = _dense(image.dt_rles, image.height, image.width)
            target["masks"] = _dense(image.gt_rles, image.height, image.width)
        preds.append(pred)
        targets.append(target)
    return preds, targets


def run_cocomap(images: list[Image], iou_types: tuple[str, ...], backend: str) -> tuple[dict, dict[str, list]]:
    """Seconds {"update", "compute", "total"} and the 12 stats per iou type of one validation-style evaluation."""
    metric = CocoMAP(iou_types=iou_types, backend=backend)
    update = 0.0
    for start in range(0, len(images), BATCH):
        preds, targets = _batch(images[start : start + BATCH], "segm" in iou_types)  # data, not timed
        update += harness.timed(partial(metric.update, preds, targets))[1]
        del preds, targets
    summaries, compute = harness.timed(lambda: {t: metric.summary(t) for t in iou_types})
    stats = {t: [summaries[t][k] for k in COCO_STATS] for t in iou_types}
    return {"update": update, "compute": compute, "total": update + compute}, stats


def run_direct(gt: dict, results: list[dict], iou_type: str, library: str) -> tuple[float, list[float]]:
    """Seconds and the 12 stats of COCOeval run directly (index, loadRes, evaluate, accumulate, summarize)."""
    # Fresh records: loadRes and COCOeval replace fields of the dicts they are given (areas, polygons -> RLE).
    results = [{k: v for k, v in r.items() if k != ("bbox" if iou_type == "segm" else "segmentation")} for r in results]
    gt = copy.deepcopy(gt)
    tic = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if library == "pycocotools":
            coco = COCO()
            coco.dataset = gt
            coco.createIndex()
            evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        else:
            coco = FasterCOCO(gt)
            evaluator = COCOeval_faster(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    seconds = time.perf_counter() - tic
    return seconds, [float(s) for s in evaluator.stats[:12]]


def _max_diff(a: list[float], b: list[float]) -> float:
    """Largest absolute difference over the 12 stats."""
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def bench_map(images: list[Image], repeats: int, faster: bool) -> list[tuple]:
    """Rows (name, seconds, reference seconds, max |Δ| to pycocotools, note) for bbox and bbox+segm."""
    gt, results = coco_files(images)
    backends = ["pycocotools"] + (["faster_coco_eval"] if faster else [])
    times: dict[str, list[float]] = {}
    stats: dict[str, list[float]] = {}

    def record(name: str, seconds: float, values: list[float] | None = None) -> None:
        times.setdefault(name, []).append(seconds)
        if values is not None:
            if name in stats and stats[name] != values:
                raise RuntimeError(f"{name}: the 12 numbers changed between repeats")
            stats[name] = values

    for repeat in range(repeats):
        for iou_type in ("bbox", "segm"):
            record(f"pycocotools {iou_type}", *run_direct(gt, results, iou_type, "pycocotools"))
            if faster:
                record(f"faster_coco_eval {iou_type}", *run_direct(gt, results, iou_type, "faster"))
        for backend in backends:
            seconds, values = run_cocomap(images, ("bbox",), backend)
            record(f"CocoMAP[{backend}] bbox", seconds["total"], values["bbox"])
            record(f"CocoMAP[{backend}] bbox update", seconds["update"])
            seconds, values = run_cocomap(images, ("bbox", "segm"), backend)
            record(f"CocoMAP[{backend}] bbox+segm", seconds["total"])
            record(f"CocoMAP[{backend}] bbox+segm update", seconds["update"])
            record(f"CocoMAP[{backend}] bbox+segm:bbox", 0.0, values["bbox"])
            record(f"CocoMAP[{backend}] bbox+segm:segm", 0.0, values["segm"])
        print(f"  repeat {repeat + 1}/{repeats} done", flush=True)
    med = {name: harness.median(values) for name, values in times.items()}
    ref_bbox, ref_segm = med["pycocotools bbox"], med["pycocotools segm"]
    ref_both = ref_bbox + ref_segm
    rows = [("pycocotools COCOeval, bbox", ref_bbox, ref_bbox, 0.0, "reference")]
    for backend in backends:
        name = f"CocoMAP[{backend}]"
        update = med[f"{name} bbox update"]
        rows.append((f"{name} bbox (detector validation)", med[f"{name} bbox"], ref_bbox,
                     _max_diff(stats[f"{name} bbox"], stats["pycocotools bbox"]),
                     f"update {update:.2f} s + compute {med[f'{name} bbox'] - update:.2f} s"))  # fmt: skip
    if faster:
        rows.append(("faster_coco_eval COCOeval_faster, bbox", med["faster_coco_eval bbox"], ref_bbox,
                     _max_diff(stats["faster_coco_eval bbox"], stats["pycocotools bbox"]), "direct"))  # fmt: skip
    rows.append(("pycocotools COCOeval, segm", ref_segm, ref_segm, 0.0, "reference"))
    if faster:
        rows.append(("faster_coco_eval COCOeval_faster, segm", med["faster_coco_eval segm"], ref_segm,
                     _max_diff(stats["faster_coco_eval segm"], stats["pycocotools segm"]), "direct"))  # fmt: skip
    rows.append(("pycocotools COCOeval, bbox + segm", ref_both, ref_both, 0.0, "reference"))
    for backend in backends:
        name = f"CocoMAP[{backend}]"
        update = med[f"{name} bbox+segm update"]
        diff_bbox = _max_diff(stats[f"{name} bbox+segm:bbox"], stats["pycocotools bbox"])
        diff_segm = _max_diff(stats[f"{name} bbox+segm:segm"], stats["pycocotools segm"])
        rows.append((f"{name} bbox+segm (instance validation)", med[f"{name} bbox+segm"], ref_both,
                     max(diff_bbox, diff_segm),
                     f"update {update:.2f} s + compute {med[f'{name} bbox+segm'] - update:.2f} s; "
                     f"|Δ| bbox {diff_bbox:.1e}, segm {diff_segm:.1e}"))  # fmt: skip
    print("\n  pycocotools' 12 numbers on this set:")
    for iou_type in ("bbox", "segm"):
        print(f"  {iou_type}: " + " ".join(f"{v:.4f}" for v in stats[f"pycocotools {iou_type}"]))
    return rows


def _label_maps(rng: np.random.Generator, count: int, size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets int64 [count, S, S] (blobs of classes 1..C-1 on 0, 255 void bands) and predictions that mostly agree."""
    yy, xx = np.mgrid[0:size, 0:size]
    target = np.zeros((count, size, size), dtype=np.int64)
    for t in target:
        for _ in range(int(rng.integers(4, 12))):
            cx, cy, rx, ry = rng.uniform(0, size, 2).tolist() + rng.uniform(size / 20, size / 4, 2).tolist()
            t[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = rng.integers(1, classes)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, size - 8, 2)
            t[y0 : y0 + int(rng.integers(2, 8)), x0 : x0 + int(rng.integers(8, size // 2))] = 255
    pred = np.roll(np.where(target == 255, 0, target), tuple(rng.integers(-6, 7, 2)), axis=(1, 2))
    noise = rng.random(pred.shape) < 0.03
    pred[noise] = rng.integers(0, classes, int(noise.sum()))
    return target, pred


def _numpy_confmat(target: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """Reference: [C, C] counts (rows target) by one bincount over non-void pixels."""
    valid = target != 255
    return np.bincount(target[valid] * classes + pred[valid], minlength=classes * classes).reshape(classes, classes)


def bench_miou(count: int, size: int, repeats: int, seed: int, classes: int = 21) -> list[tuple]:
    """Rows (name, ours s, numpy s, matrices equal) from label maps and from logits, batches of 8."""
    rng = np.random.default_rng(seed)
    target, pred = _label_maps(rng, count, size, classes)
    batches = [(torch.from_numpy(target[i : i + 8]), torch.from_numpy(pred[i : i + 8])) for i in range(0, count, 8)]

    rows = []
    for kind in ("labels", "logits"):
        ours_times, ref_times, equal = [], [], True
        for _ in range(repeats):
            metric = ConfusionMatrixIoU(classes, ignore_index=255)
            confmat = np.zeros((classes, classes), dtype=np.int64)
            ours = ref = 0.0
            for t, p in batches:
                if kind == "logits":  # argmax is the prediction: noise below 1 keeps it, continuous noise has no ties
                    p = torch.nn.functional.one_hot(p, classes).permute(0, 3, 1, 2).float().contiguous()
                    p += torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.9
                ours += harness.timed(partial(metric.update, p, t))[1]
                tic = time.perf_counter()
                labels = p.numpy().argmax(1) if kind == "logits" else p.numpy()
                confmat += _numpy_confmat(t.numpy(), labels, classes)
                ref += time.perf_counter() - tic
            equal &= bool(np.array_equal(metric.compute_confmat().numpy(), confmat))
            ours_times.append(ours)
            ref_times.append(ref)
        name = f"ConfusionMatrixIoU.update from {kind}"
        rows.append((name, harness.median(ours_times), harness.median(ref_times), equal))
    return rows


def main() -> None:
    parser = harness.arguments(__doc__, repeats=3)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--miou-masks", type=int, default=64)
    parser.add_argument("--miou-size", type=int, default=512)
    parser.add_argument("--no-faster", action="store_true", help="time the pycocotools backend and reference only")
    args = harness.parse(parser)
    faster = not args.no_faster
    print(f"torch threads {torch.get_num_threads()}; faster-coco-eval {faster_coco_eval.__version__}")

    tic = time.perf_counter()
    images = make_set(args.images, args.detections, args.seed)
    n_gt = sum(len(i.gt_labels) for i in images)
    n_crowd = sum(int(i.gt_crowd.sum()) for i in images)
    n_dt = sum(len(i.dt_labels) for i in images)
    print(f"set: {len(images)} images, {n_gt} ground-truth objects ({n_crowd} crowd regions), {n_dt} detections; "
          f"made in {time.perf_counter() - tic:.1f} s")  # fmt: skip

    rows = bench_map(images, args.repeats, faster)
    print(f"\nmAP, median of {args.repeats} (seconds; ratio to the pycocotools reference; largest |Δ| of 12 stats)")
    print(f"| {'':48} | time (s) | × pycocotools | max abs diff | note |")
    print(f"|{'-' * 50}|---:|---:|---:|---|")
    for name, seconds, reference, diff, note in rows:
        print(f"| {name:48} | {seconds:.2f} | {seconds / reference:.2f}× | {diff:.1e} | {note} |")

    miou = bench_miou(args.miou_masks, args.miou_size, args.repeats, args.seed)
    print(f"\nmIoU, {args.miou_masks} masks of {args.miou_size}², 21 classes + void, batches of 8, "
          f"median of {args.repeats}")  # fmt: skip
    print("| | ours (s) | numpy bincount (s) | ratio | matrices equal |")
    print("|---|---:|---:|---:|---|")
    for name, ours, ref, equal in miou:
        print(f"| {name} | {ours:.3f} | {ref:.3f} | {ours / ref:.2f}× | {equal} |")
    harness.write_summary(args.summary, summary_rows(rows, miou))


def summary_rows(rows: list[tuple], miou: list[tuple]) -> list[dict]:
    """The shipped paths' time ratios (target 0.25x pycocotools, equal numbers) and the mIoU update's."""
    out = []
    for name, seconds, reference, diff, _ in rows:
        if name.startswith("CocoMAP["):  # the shipped metric (either backend), not the references
            ratio = seconds / reference
            met = ratio <= 0.25 and diff <= 1e-6
            out.append(harness.row("eval_speed", f"{name} (max |diff| {diff:.1e})", ratio, "x", "pycocotools COCOeval",
                                   "<= 0.25, |diff| <= 1e-6", met))  # fmt: skip
    for name, ours, ref, equal in miou:
        out.append(harness.row("eval_speed", f"{name} (matrices equal: {equal})", ours / ref, "x", "numpy bincount"))
    return out


if __name__ == "__main__":
    main()
