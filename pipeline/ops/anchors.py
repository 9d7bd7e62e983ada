"""Data-driven anchors: k-means over training box sizes with distance 1 - shape IoU (YOLOv2 / YOLOv3).

Boxes and anchors are compared by shape only, as if they shared a centre, so the distance is scale-aware without
being dominated by large boxes the way Euclidean distance on (w, h) is. `anchor_fit` is YOLOv2's "Avg IOU" (mean
best-anchor shape IoU); `best_possible_recall` is the share of boxes some anchor fits at all. YOLOv5's autoanchor
reports a best possible recall and a mean best fit too, but over a width/height ratio metric rather than IoU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

# The plot draws at most this many boxes (a fixed random subset): Agg scatter time grows with the point count.
_MAX_PLOT_POINTS = 20_000
# Rounds each k-means restart runs before the best-fitting one is kept and run on to convergence.
_PROBE_ITERATIONS = 20


def shape_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU [N, M] of sizes wh1 [N, 2] and wh2 [M, 2] placed at a common centre: the shape-only overlap."""
    if wh1.ndim != 2 or wh1.shape[1] != 2 or wh2.ndim != 2 or wh2.shape[1] != 2:
        raise ValueError(f"shape_iou needs [N, 2] and [M, 2] sizes, got {list(wh1.shape)} and {list(wh2.shape)}")
    dtype = torch.promote_types(wh1.dtype, wh2.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    wh1, wh2 = wh1.to(dtype), wh2.to(dtype)
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(wh1[:, None, 1], wh2[None, :, 1])
    union = wh1.prod(1)[:, None] + wh2.prod(1)[None, :] - inter
    # Two zero-area sizes have no union; their IoU is 0 rather than nan.
    return inter / union.clamp(min=torch.finfo(dtype).tiny)


def _check_sizes(wh: Tensor, k: int) -> None:
    """Raise ValueError unless wh is [N, 2] with N >= k finite, positive sizes (the caller drops degenerate boxes)."""
    if wh.ndim != 2 or wh.shape[1] != 2:
        raise ValueError(f"box sizes must be [N, 2] (w, h), got shape {list(wh.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    bad = int((~(torch.isfinite(wh) & (wh > 0)).all(1)).sum())
    if bad:
        raise ValueError(
            f"{bad} of {len(wh)} box sizes have a non-positive or non-finite width or height; filter them out first"
        )
    if len(wh) < k:
        raise ValueError(f"k-means needs at least k={k} boxes, got {len(wh)}")


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run CPU k-means on one intra-op thread, restoring the count after.

    Its [N, k] ops are too small for threads to pay, and on a busy machine (data loaders, a second job) every
    OpenMP barrier waits for a descheduled thread: 20 000 boxes took 10 s on two loaded cores instead of 0.3 s.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Sizes:
    """Box sizes [N, 2] with the per-column views k-means reuses every iteration (contiguous w, h, area; sorts)."""

    def __init__(self, wh: Tensor) -> None:
        self.wh = wh
        self.w, self.h = wh[:, 0:1].contiguous(), wh[:, 1:2].contiguous()
        self.area = self.w * self.h
        self.sorted, self.order = wh.sort(0)

    def iou(self, centres: Tensor) -> Tensor:
        """Shape IoU [N, k] with centres [k, 2]; sizes are validated positive, so the union never vanishes."""
        inter = torch.minimum(self.w, centres[:, 0]) * torch.minimum(self.h, centres[:, 1])
        return inter / (self.area + centres.prod(1) - inter)


def _seed_centres(sizes: _Sizes, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ centres [k, 2]: draw candidates ~ (1 - best shape IoU)^2, keep the one that helps most."""
    n = len(sizes.wh)
    # As scikit-learn's k-means++: several candidates per step make a bad start (two centres in a cluster) rare.
    trials = 2 + int(math.log(k))
    centres = sizes.wh[torch.randint(n, (1,), generator=generator, device=sizes.wh.device)]
    dist = 1 - sizes.iou(centres)[:, 0]
    for _ in range(1, k):
        weights = dist.square()
        if weights.sum() > 0:
            candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        else:  # every box already matches a centre exactly (fewer distinct sizes than k)
            candidates = torch.randint(n, (trials,), generator=generator, device=sizes.wh.device)
        cand_dist = torch.minimum(dist[:, None], 1 - sizes.iou(sizes.wh[candidates]))
        pick = cand_dist.square().sum(0).argmin()
        centres = torch.cat([centres, sizes.wh[candidates[pick]][None]])
        dist = cand_dist[:, pick]
    return centres


def _lloyd(sizes: _Sizes, centres: Tensor, iterations: int) -> Tensor:
    """Up to `iterations` assign/update rounds from centres [k, 2]; stops once no box changes cluster."""
    k, n = len(centres), len(sizes.wh)
    previous = None
    for _ in range(iterations):
        best_iou, assignment = sizes.iou(centres).max(1)
        if previous is not None and torch.equal(assignment, previous):
            break
        previous = assignment
        counts = torch.bincount(assignment, minlength=k)
        # Lower median per cluster, vectorised: stably regroup each column's sorted values by cluster, then take
        # the middle element of every cluster's run.
        middle = (counts.cumsum(0) - counts + (counts - 1).clamp(min=0) // 2).clamp(max=n - 1)
        centres = torch.empty_like(centres)
        for dim in range(2):
            regroup = assignment[sizes.order[:, dim]].sort(stable=True).indices
            centres[:, dim] = sizes.sorted[regroup, dim][middle]
        empty = counts == 0
        if empty.any():  # re-seed empty clusters at the boxes the current centres fit worst
            centres[empty] = sizes.wh[best_iou.argsort()[: int(empty.sum())]]
    return centres


def kmeans_anchors(wh: Tensor, k: int = 9, iterations: int = 300, seed: int = 0, restarts: int = 3) -> Tensor:
    """k anchors [k, 2] (w, h), by area ascending, clustering sizes wh [N, 2] with distance 1 - shape IoU.

    Centres update to each cluster's median width and height rather than the mean of the YOLOv2 paper: box sizes
    are heavy-tailed, and in pixel space a few large boxes drag a cluster's mean towards them, while the median
    stays with the bulk of the cluster (and, being a lower median per axis, at widths and heights that occur).
    Initialisation is greedy k-means++ from a `torch.Generator` seeded with `seed`, so a seed always gives the same
    anchors. Each of `restarts` starts runs a short probe; the best-fitting one (`anchor_fit`) then runs to
    convergence or `iterations` in all, which costs little more than one run. Sorted by area, anchors[0:3] suit
    stride 8, [3:6] stride 16 and [6:9] stride 32. Computed in float32; returned in wh's float dtype.
    Raises ValueError for fewer than k boxes or any non-positive or non-finite size.
    """
    _check_sizes(wh, k)
    if iterations < 0 or restarts < 1:
        raise ValueError(f"need iterations >= 0 and restarts >= 1, got {iterations} and {restarts}")
    out_dtype = wh.dtype if wh.dtype.is_floating_point else torch.get_default_dtype()
    with _one_cpu_thread(wh.device):
        sizes = _Sizes(wh.detach().to(torch.float32))
        generator = torch.Generator(device=wh.device).manual_seed(seed)
        probe = min(iterations, _PROBE_ITERATIONS) if restarts > 1 else 0
        runs = [_lloyd(sizes, _seed_centres(sizes, k, generator), probe) for _ in range(restarts)]
        fits = [sizes.iou(centres).amax(1).mean().item() for centres in runs]
        centres = _lloyd(sizes, runs[fits.index(max(fits))], iterations - probe)
    return centres[centres.prod(1).argsort()].to(out_dtype)


def anchor_fit(wh: Tensor, anchors: Tensor) -> float:
    """Anchor fit: mean over boxes wh [N, 2] of the best anchor's shape IoU (YOLOv2's "Avg IOU"); nan if N = 0."""
    return shape_iou(wh, anchors).amax(1).mean().item() if len(wh) else float("nan")


def best_possible_recall(wh: Tensor, anchors: Tensor, threshold: float = 0.25) -> float:
    """Fraction of boxes wh [N, 2] whose best anchor [k, 2] reaches `threshold` shape IoU; nan if N = 0."""
    return (shape_iou(wh, anchors).amax(1) >= threshold).double().mean().item() if len(wh) else float("nan")


def anchor_plot(wh: Tensor, anchors: Tensor, title: str = "") -> np.ndarray:
    """RGB uint8 [H, W, 3] plot of box sizes wh [N, 2] with anchors [k, 2] marked, to log beside the anchors.

    Log-log axes, since 1 - IoU is scale-relative and sizes span orders of magnitude. Draws on an Agg canvas of a
    standalone Figure (never registered with pyplot, so nothing to close and no global backend switch).
    """
    fit = anchor_fit(wh, anchors)
    points = wh.detach().double().cpu().numpy()
    if len(points) > _MAX_PLOT_POINTS:
        keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:_MAX_PLOT_POINTS]
        points = points[keep.numpy()]
    marks = anchors.detach().double().cpu().reshape(-1, 2).numpy()
    fig = Figure(figsize=(7, 6), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.25, color="tab:blue", linewidths=0, label="boxes")
    ax.scatter(
        marks[:, 0],
        marks[:, 1],
        s=160,
        marker="X",
        color="tab:red",
        edgecolors="black",
        linewidths=0.8,
        label="anchors",
    )
    for index, (w, h) in enumerate(marks.tolist()):
        ax.annotate(f"{index}: {w:.0f}x{h:.0f}", (w, h), xytext=(6, 6), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"{title + ': ' if title else ''}anchor fit {fit:.3f} (mean best IoU)", fontsize=10)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
