"""Anchors remembered across jobs: k-means over the training box sizes, cached in a folder by their fingerprint.

File I/O, so it lives beside tracking and checkpoints rather than in the pure `ops/`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from pipeline.ops.anchors import kmeans_anchors


def cached_kmeans_anchors(wh: Tensor, k: int, seed: int, cache_dir: str | os.PathLike | None) -> Tensor:
    """`kmeans_anchors(wh, k, seed=seed)`, remembered in `cache_dir` under a fingerprint of the sizes, k and seed.

    A second job on the same data (a sweep, a fork) reads the anchors back instead of clustering again; other
    boxes, k or seed give another fingerprint. A cache file that cannot be read is recomputed and rewritten.
    """
    if cache_dir is None:
        return kmeans_anchors(wh, k=k, seed=seed)
    digest = hashlib.sha256(wh.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    digest.update(f"k={k} seed={seed} v1".encode())
    path = Path(cache_dir) / f"{digest.hexdigest()[:32]}.json"
    try:
        return torch.tensor(json.loads(path.read_text())["anchors"], dtype=wh.dtype)
    except (OSError, ValueError, KeyError):
        pass
    anchors = kmeans_anchors(wh, k=k, seed=seed)
    try:  # best effort: a read-only data dir only costs the next job its k-means
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_text(json.dumps({"anchors": anchors.tolist(), "boxes": len(wh), "k": k, "seed": seed}))
        staging.replace(path)  # whole or absent, also with parallel jobs
    except OSError as err:
        print(f"Anchor cache {path} not written ({err})")
    return anchors
