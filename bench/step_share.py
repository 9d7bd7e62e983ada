"""Benchmark (issue 14 hot paths): the non-network share of a detector / instance training step on CPU.

One training batch of `--batch` shapes images at `--size` px (the experiments' nets and loss settings, fixed
anchors), timed with the task's own code: the full step (forward, loss, backward, optimizer step) against the
part that is not the network: target assignment and the loss computed on the net's outputs taken as a leaf
(`_assignments` + `_loss`, forward and backward down to those outputs), and for the instance model also the
choice of mask RoIs (`_mask_rois`, not the mask head, which is network). Median of `--repeats` after a warm-up,
the parts taking turns. Logging (`self.log`) is not in it: it needs a Trainer; bench/overhead.py covers it.

Issue 14's target: that share <= 5 % on CPU (measured before the change at ~10 %: 13 ms of assignment and loss,
plus logging, in a ~183 ms step). To compare two versions of the code side by side, run the same script
against each checkout:

    python bench/step_share.py
    PYTHONPATH=/path/to/other/checkout python bench/step_share.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import summary
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import pipeline
from pipeline.cli import CONF_DIR

FAMILIES = {"detector": "shapes_yolo", "instance": "shapes_instance"}
ANCHORS = "[" + ",".join(f"[{4 * i},{3 * i}]" for i in range(1, 10)) + "]"


def _median_ms(step: Callable[[], object], repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` calls of `step` (after one warm-up call)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return times


def bench(family: str, batch_size: int, size: int, repeats: int) -> dict[str, float]:
    """Median ms of the full step and of its non-network parts for `family`."""
    with tempfile.TemporaryDirectory() as root, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"experiment={FAMILIES[family]}", f"model.anchors={ANCHORS}", f"data.batch_size={batch_size}",
            f"data.train_sizes=[{size}]", "data.spec.num_train=32", "data.spec.num_val=4", "data.num_workers=0",
            f"paths.output_dir={root}"])  # fmt: skip
        torch.manual_seed(0)
        task = instantiate(cfg.model)
        data = instantiate(cfg.data, targets=task.TARGETS, parallel_jobs=1)
        data.prepare_data()
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    task.train()
    instance = family == "instance"

    def full() -> None:
        loss = task._training_losses(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    outputs = task(batch["image"])
    pred, grid = outputs[0].detach(), outputs[1]

    def loss_part() -> None:
        leaf = pred.clone().requires_grad_()
        assignment = task._assignments(grid, batch)
        task._loss(leaf, grid, batch, assignment)["loss"].backward()
        if instance:
            task._mask_rois(leaf.detach(), grid, batch, assignment)

    times: dict[str, list[float]] = {"full": [], "assignment + loss (+ mask RoIs)": []}
    for _ in range(repeats):  # interleaved
        times["full"] += _median_ms(full, 1)
        times["assignment + loss (+ mask RoIs)"] += _median_ms(loss_part, 1)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--summary", help="write the shares as JSON rows (bench/run_all.py)")
    args = parser.parse_args()
    rows = []
    print(f"batch {args.batch} at {args.size} px, median of {args.repeats}, torch threads {torch.get_num_threads()}, "
          f"pipeline from {Path(pipeline.__file__).parent}")  # fmt: skip
    for family in FAMILIES:
        result = bench(family, args.batch, args.size, args.repeats)
        part = result["assignment + loss (+ mask RoIs)"]
        share = part / result["full"]
        print(f"{family:<9} full step {result['full']:.1f} ms; assignment + loss (+ mask RoIs) {part:.1f} ms "
              f"= {100 * share:.1f} % of the step")  # fmt: skip
        rows.append(summary.row("step_share", f"{family}: assignment + loss share of a training step", share, "x",
                                "full training step", "<= 0.05", share <= 0.05))  # fmt: skip
    summary.write(args.summary, rows)


if __name__ == "__main__":
    main()
