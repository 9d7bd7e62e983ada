"""Post-processing time per image against the forward pass, at 100 detections per image.

For the detector (`experiment=shapes_yolo`) and the instance model (`experiment=shapes_instance`) the task is built
from the composed config (random init, seeded; anchors from k-means over the training boxes as `setup("fit")`
computes them), in eval mode under `torch.inference_mode`, and fed one validation batch of the shapes data
(`data.batch_size` images letterboxed to `data.val_size`, generated into a scratch directory). Timed separately
in the order validation and `detect` run them, one warm-up round then `--repeats` rounds through all steps (so
load that drifts touches every step alike), each step the median of its rounds:
- forward: `net.outputs(images)` (normalise, backbone, neck, heads), then flatten the slot outputs and build their
  grid (`net.slots.grid`), with the net alone shown as a sub-row;
- decode + NMS: `pipeline.models.slots.detections(pred, grid, postprocess)` (box decoding, objectness x class
  scores, score threshold, top-k, torchvision's class-aware `batched_nms`, keep `max_detections`);
- instance model only: the mask head `net._with_masks(detections, levels)` (1x1 projections of the neck levels,
  multiscale RoIAlign along the detections, mask FCN over all classes, the own class's probabilities; the three
  parts are also timed alone as sub-rows) and the paste into each image's original resolution
  `task.masks_to_original(...)` (thresholded bool masks).
The config's post-processing settings are kept (score threshold 0.001, IoU 0.6, top 1000 into NMS, 100 kept);
`--detections` sets `model.postprocess.max_detections`, and the run checks that every image really keeps that
many (a random-init head scores nearly every slot above 0.001, so NMS sees the full top-k). The reference is the
forward pass: the ratio is post-processing (decode + NMS, mask head, paste) / forward, per image, of the medians.
The fastest round of each step is shown too. On a machine whose cores are shared, torch's 2 threads wait for each
other at every op and small ops (NMS, paste) suffer most; `--threads 1` is steadier there.

    python bench/postprocess.py                      # ~25 s on 2 idle cores (CPU)
    python bench/postprocess.py --threads 1          # on a loaded machine
    python bench/postprocess.py --repeats 20 --device cuda
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import torch

FAMILIES = {"detector": "shapes_yolo", "instance": "shapes_instance"}


def build(family: str, args: argparse.Namespace, root: Path) -> tuple[Any, dict]:
    """The family's task (random init, k-means anchors, eval mode, on the device) and its first validation batch."""
    overrides = [f"paths.root_dir={root}", f"paths.output_dir={root / 'outputs'}", "data.num_workers=0",
                 f"data.spec.num_train={args.num_train}", f"data.spec.num_val={args.batch_size}",
                 f"data.batch_size={args.batch_size}",
                 f"model.postprocess.max_detections={args.detections}"]  # fmt: skip
    task, data = harness.task_and_data(harness.train_config(f"experiment={FAMILIES[family]}", *overrides))
    batch = next(iter(data.val_dataloader()))
    return task.to(args.device).eval(), batch


def candidates(task: Any, pred: torch.Tensor) -> tuple[float, float]:
    """Mean per image of the (slot, class) pairs above the score threshold, and of those that enter NMS (top-k)."""
    settings = task.hparams.postprocess
    scores = torch.sigmoid(pred[..., 4:5]) * torch.sigmoid(pred[..., 5:])
    above = (scores > settings["score_threshold"]).flatten(1).sum(1).float()
    return float(above.mean()), float(above.clamp(max=settings["pre_nms_top_k"]).mean())


def inference_steps(task: Any, batch: dict, images: torch.Tensor, instance: bool) -> dict[str, Callable[[dict], Any]]:
    """The timed steps of one batch's inference, in the order `detect` and validation run them."""
    from pipeline.models.slots import detections
    from pipeline.ops.boxes import flatten_levels
    from pipeline.ops.roi import multiscale_roi_align

    net = task.net

    def forward(state: dict) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
        outputs, levels = net.outputs(images)
        return flatten_levels(outputs), net.slots.grid(outputs, tuple(images.shape[-2:])), levels

    steps: dict[str, Callable[[dict], Any]] = {
        "net": lambda s: net.outputs(images),
        "forward": forward,
        "select": lambda s: detections(s["forward"][0], s["forward"][1], net.postprocess),
    }
    if instance:
        places = list(zip(batch["scale"], batch["orig_size"], strict=True))
        steps.update({
            "masks": lambda s: net._with_masks(s["select"], s["forward"][2]),
            "lateral": lambda s: [lateral(level) for lateral, level in zip(net.mask_lateral, s["forward"][2],
                                                                            strict=True)],
            "roi_align": lambda s: multiscale_roi_align(s["lateral"], [d["boxes"] for d in s["masks"]], net.strides,
                                                        net.roi_size),
            "mask_fcn": lambda s: net.mask_head(s["roi_align"]),
            "paste": lambda s: [task.masks_to_original(det, scale, h, w) for det, (scale, (h, w))
                                in zip(s["masks"], places, strict=True)],
        })  # fmt: skip
    return steps


def bench_family(family: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Per image seconds of each step of one family's inference, with the detections they produced."""
    begun = time.perf_counter()
    task, batch = build(family, args, root)
    images = batch["image"].to(args.device)
    built = time.perf_counter() - begun
    instance = family == "instance"
    with torch.inference_mode():
        steps, state = harness.rounds(inference_steps(task, batch, images, instance), args.repeats, args.device)
        above, into_nms = candidates(task, state["forward"][0])
    detections = state["select"]
    if instance and any(m.shape[0] != len(d["boxes"]) for m, d in zip(state["paste"], detections, strict=True)):
        raise RuntimeError("pasted masks do not match the detections")
    counts = [len(d["boxes"]) for d in detections]
    if min(counts) < args.detections:
        raise RuntimeError(f"{family}: images keep {min(counts)}..{max(counts)} detections, not {args.detections}")
    return {
        "per_image": {k: harness.median(v) / len(images) for k, v in steps.items()},
        "per_image_min": {k: min(v) / len(images) for k, v in steps.items()},
        "images": len(images),
        "size": tuple(images.shape[-2:]),
        "orig": sorted({tuple(int(v) for v in hw) for hw in batch["orig_size"]}),
        "counts": counts,
        "above": above,
        "into_nms": into_nms,
        "postprocess": dict(task.hparams.postprocess),
        "setup_s": built,
        "timed_s": time.perf_counter() - begun - built,
    }


LABELS = {
    "forward": "forward: net.outputs, slot grid",
    "net": "  of which the net",
    "select": "decode + NMS: slots.detections",
    "masks": "mask head: _with_masks",
    "lateral": "  of which 1x1 projections of the levels",
    "roi_align": "  of which multiscale RoIAlign",
    "mask_fcn": "  of which the mask FCN (all classes)",
    "paste": "paste to original: masks_to_original",
}
POSTPROCESS = ("select", "masks", "paste")


def report(family: str, result: dict[str, Any], args: argparse.Namespace) -> float:
    """Print one family's table (ms per image, ratio to the forward pass); return post-processing / forward."""
    per_image = result["per_image"]
    forward = per_image["forward"]
    post = sum(per_image.get(k, 0.0) for k in POSTPROCESS)
    h, w = result["size"]
    orig = ", ".join(f"{a}x{b}" for a, b in result["orig"])
    print(f"\n=== {family} (experiment={FAMILIES[family]}): batch of {result['images']} at {h}x{w} "
          f"(original {orig}), {args.device}, median of {args.repeats} ===")  # fmt: skip
    fastest = result["per_image_min"]
    print(f"| {'step':<42} | ms/image | x forward | fastest ms/image |")
    print(f"|{'-' * 44}|---:|---:|---:|")
    for key, label in LABELS.items():
        if key in per_image:
            print(f"| {label:<42} | {per_image[key] * 1e3:8.3f} | {per_image[key] / forward:9.3f} | "
                  f"{fastest[key] * 1e3:16.3f} |")  # fmt: skip
    post_fastest = sum(fastest.get(k, 0.0) for k in POSTPROCESS)
    print(f"| {'post-processing total':<42} | {post * 1e3:8.3f} | {post / forward:9.3f} | {post_fastest * 1e3:16.3f} |")
    counts = result["counts"]
    settings = result["postprocess"]
    print(f"detections per image {min(counts)}..{max(counts)} (max_detections {settings['max_detections']}); "
          f"per image {result['above']:.0f} (slot, class) pairs above score {settings['score_threshold']}, "
          f"{result['into_nms']:.0f} into NMS (pre_nms_top_k {settings['pre_nms_top_k']}, "
          f"IoU {settings['iou_threshold']}); set-up {result['setup_s']:.1f} s, "
          f"timing {result['timed_s']:.1f} s")  # fmt: skip
    return post / forward


def nms_source() -> str:
    """Where the NMS that `select_detections` calls comes from (module and function name)."""
    import pipeline.ops.nms as nms

    used = nms.batched_nms
    return f"{inspect.getmodule(used).__name__}.{used.__name__} (called in {nms.__name__}.select_detections)"


def main() -> None:
    parser = harness.arguments(__doc__, repeats=5, device=True, threads=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batch-size", type=int, default=16, help="validation batch (conf/data/shapes.yaml: 16)")
    parser.add_argument("--detections", type=int, default=100, help="model.postprocess.max_detections")
    parser.add_argument("--num-train", type=int, default=32, help="training images (their boxes give the anchors)")
    args = harness.parse(parser)
    begun = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    nms = nms_source()
    print(f"NMS: {nms}; torchvision's: {nms.startswith('torchvision.')}")
    rows = []
    with harness.project() as project:
        for family in args.families.split(","):
            ratio = report(family, bench_family(family, args, project.root), args)
            what = f"{family}: post-processing / forward per image at {args.detections} detections ({args.device})"
            rows.append(harness.row("postprocess", what, ratio, "x", "forward pass"))
    print(f"\ntotal wall time {time.perf_counter() - begun:.0f} s")
    harness.write_summary(args.summary, rows)


if __name__ == "__main__":
    main()
