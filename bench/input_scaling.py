"""Input-size scaling: the FCN's and the detector's forward time against input pixels, 128² to 1024².

A fully convolutional net's cost should grow linearly with the input area. For the FCN (`experiment=shapes_fcn`,
FCN-8s) and the detector (`experiment=shapes_yolo`), the task is built from the composed config (random init,
seeded) and its net alone is timed in eval mode under `torch.inference_mode`: `task.net(x)` on one seeded random
image, already ImageNet-normalised, batch 1, at each square size of `--sizes` (128, 256, 384, 512, 768, 1024).
Every size runs once to warm up, then `--repeats` rounds go through all sizes in turn (so load that drifts
during the run touches every size alike); each size's time is the median of its rounds. The table gives size,
pixels, ms and ms per megapixel; the fitted exponent is b in log(time) = a + b * log(pixels), least squares over
the sizes >= `--fit-from` (256: at 128² fixed per-layer costs still weigh) and over all sizes. The reference is
linear scaling: the target is b ~ 1.0 (0.9-1.1).

On CPU, activations above glibc's largest mmap threshold (32 MiB: 16 channels of 768² float32 and up) are
mapped afresh and page-faulted on every allocation (an out-of-place ReLU writing one costs ~20x more per pixel
than at 512²), which bends the fit super-linear. The third command keeps every allocation on the heap (malloc's
tunables are read at process start, so they go in the environment) and shows how much of the exponent is the
allocator.

    python bench/input_scaling.py                    # ~40 s on 2 idle cores (CPU)
    python bench/input_scaling.py --repeats 9 --device cuda
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python bench/input_scaling.py
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from typing import Any

import harness
import numpy as np
import torch

FAMILIES = {"fcn": "shapes_fcn", "detector": "shapes_yolo"}
SIZES = (128, 256, 384, 512, 768, 1024)
TARGET = (0.9, 1.1)


def build_net(family: str, device: str) -> torch.nn.Module:
    """The family's net as its task builds it from the composed training config (random init), in eval mode."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    cfg = harness.train_config(f"experiment={FAMILIES[family]}", "paths.output_dir=unused")
    pl.seed_everything(cfg.seed, verbose=False)
    return instantiate(cfg.model).net.to(device).eval()


def time_sizes(net: torch.nn.Module, sizes: list[int], repeats: int, device: str) -> dict[int, list[float]]:
    """Seconds of `net(x)` per size for each of `repeats` rounds over all sizes, after one warm-up call per size."""
    generator = torch.Generator().manual_seed(0)
    from pipeline.tasks.common import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    inputs = {s: ((torch.rand(1, 3, s, s, generator=generator) - mean) / std).to(device) for s in sizes}
    with torch.inference_mode():
        return harness.rounds({s: partial(lambda x, _: net(x), inputs[s]) for s in sizes}, repeats, device)[0]


def exponent(sizes: list[int], times: list[float]) -> float:
    """b of the least-squares fit log(time) = a + b * log(pixels)."""
    pixels = np.array(sizes, dtype=np.float64) ** 2
    return float(np.polyfit(np.log(pixels), np.log(np.array(times)), 1)[0])


def report(family: str, seconds: dict[int, list[float]], fit_from: int, args: argparse.Namespace) -> float:
    """Print one family's table and fits; return the exponent fitted over the sizes >= `fit_from`."""
    sizes = sorted(seconds)
    median = {s: harness.median(seconds[s]) for s in sizes}
    print(f"\n=== {family} (experiment={FAMILIES[family]}): net forward, batch 1, {args.device}, "
          f"median of {args.repeats} ===")  # fmt: skip
    print("| size | pixels | ms | ms / megapixel | fastest ms |")
    print("|---:|---:|---:|---:|---:|")
    for s in sizes:
        ms = median[s] * 1e3
        print(f"| {s}² | {s * s:,} | {ms:.2f} | {ms / (s * s / 1e6):.1f} | {min(seconds[s]) * 1e3:.2f} |")
    upper = [s for s in sizes if s >= fit_from]
    if len(upper) < 2:
        raise SystemExit(f"--fit-from {fit_from} leaves {len(upper)} size(s): the fit needs two")
    b_upper = exponent(upper, [median[s] for s in upper])
    b_all = exponent(sizes, [median[s] for s in sizes])
    low, high = TARGET
    verdict = "meets" if low <= b_upper <= high else "MISSES"
    fastest = exponent(upper, [min(seconds[s]) for s in upper])
    print(f"fitted exponent b (time ~ pixels^b) of the medians: sizes >= {fit_from}: {b_upper:.3f} ({verdict} "
          f"{low}-{high}); all sizes: {b_all:.3f}; of the fastest rounds, sizes >= {fit_from}: "
          f"{fastest:.3f}")  # fmt: skip
    return b_upper


def main() -> None:
    parser = harness.arguments(__doc__, repeats=5, device=True, threads=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="square input sides, multiples of 32")
    parser.add_argument("--fit-from", type=int, default=256, help="smallest size in the headline fit")
    args = harness.parse(parser)
    begun = time.perf_counter()
    malloc = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")) or "glibc defaults"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, malloc: {malloc}")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows: list[dict[str, Any]] = []
    for family in args.families.split(","):
        net = build_net(family, args.device)
        b = report(family, time_sizes(net, sizes, args.repeats, args.device), args.fit_from, args)
        what = f"{family}: net forward time ~ pixels^b, sizes {args.fit_from}-{max(sizes)} ({args.device})"
        rows.append(harness.row("input_scaling", what, b, "exponent", "pixels", "~1.0 (0.9-1.1)",
                                TARGET[0] <= b <= TARGET[1]))  # fmt: skip
    print(f"\ntotal wall time {time.perf_counter() - begun:.0f} s")
    harness.write_summary(args.summary, rows)


if __name__ == "__main__":
    main()
