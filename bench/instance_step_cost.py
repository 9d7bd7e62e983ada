"""Benchmark: what the mask branch costs per batch, detector alone vs detector + mask branch, side by side.

One training step (forward, backward, AdamW) on a 16-image training batch at 128 px, and one validation batch
(forward, post-processing, masks for every detection), for `experiment=shapes_yolo` and
`experiment=shapes_instance` with the same fixed anchors. Median of `--repeats` timed runs after one warm-up.

    python bench/instance_step_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pipeline.cli import CONF_DIR

ANCHORS = "[" + ",".join(f"[{4 * i},{3 * i}]" for i in range(1, 10)) + "]"


def _median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(experiment: str, root: str, repeats: int) -> dict[str, float]:
    """Median seconds of one training step and one validation batch, and the detections in that batch."""
    torch.manual_seed(0)
    overrides = [f"experiment={experiment}", f"model.anchors={ANCHORS}", "data.num_workers=0", f"data.root={root}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    task = instantiate(cfg.model)
    data = instantiate(cfg.data, targets=task.TARGETS)
    data.prepare_data()
    data.setup("fit")
    train = data.train_set.collate([data.train_set[(i, 128)] for i in range(16)])
    val = data.val_set.collate([data.val_set[i] for i in range(16)])
    optimizer = torch.optim.AdamW(task.parameters())

    def train_step() -> None:
        loss = task(train["image"], task._targets(train))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def val_batch() -> None:
        with torch.no_grad():
            _, detections = task(val["image"], task._targets(val))
            for det, scale, (h, w) in zip(detections, val["scale"], val["orig_size"], strict=True):
                task._to_original(det, scale, h, w)

    train_s = _median_seconds(train_step, repeats)
    task.eval()
    val_s = _median_seconds(val_batch, repeats)
    return {"train_step_s": train_s, "val_batch_s": val_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = {exp: measure(exp, root, args.repeats) for exp in ("shapes_yolo", "shapes_instance")}
    print(f"\n{torch.get_num_threads()} torch threads, batch 16 at 128 px, median of {args.repeats}")
    print(f"{'':<18}{'train step (s)':>16}{'val batch (s)':>16}")
    for experiment, r in results.items():
        print(f"{experiment:<18}{r['train_step_s']:>16.3f}{r['val_batch_s']:>16.3f}")


if __name__ == "__main__":
    main()
