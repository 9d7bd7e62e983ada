"""Non-network share of a detector / instance training step on CPU: target assignment and loss against the full
step.

One training batch of `--batch` shapes images at `--size` px (the experiments' nets and loss settings, fixed
anchors), timed with the task's own code: the full step (forward, loss, backward, optimizer step) against the
part that is not the network: target assignment and the loss computed on the net's outputs taken as a leaf
(the loss module's `assign` + its YOLO terms, forward and backward down to those outputs), and for the
instance model also the choice of mask RoIs (`mask_rois`, not the mask head, which is network). Each timed call
follows an untimed one of the same part; every repeat times both parts, in an order turned each repeat; the share
is the median of the part over the median of the full step, target <= 5 %. Logging (`self.log`) is not in it: it
needs a Trainer; bench/overhead.py covers it.

To compare two versions of the code side by side, run the same script against each checkout (it prints which
`pipeline` it imported):

    python bench/step_share.py
    PYTHONPATH=/path/to/other/checkout python bench/step_share.py
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import harness
import torch
from hydra.utils import instantiate

import pipeline
from pipeline.losses.yolo import YOLOLoss
from pipeline.ops.boxes import flatten_levels

FAMILIES = {"detector": "shapes_yolo", "instance": "shapes_instance"}
ANCHORS = "[" + ",".join(f"[{4 * i},{3 * i}]" for i in range(1, 10)) + "]"


def bench(family: str, batch_size: int, size: int, repeats: int) -> dict[str, float]:
    """Median ms of the full step and of its non-network parts for `family`."""
    with harness.project() as project:
        cfg = harness.train_config(
            f"experiment={FAMILIES[family]}", f"model.anchors={ANCHORS}", f"data.batch_size={batch_size}",
            f"data.train_sizes=[{size}]", "data.spec.num_train=32", "data.spec.num_val=4", "data.num_workers=0",
            f"paths.root_dir={project.root}", f"paths.output_dir={project.root / 'outputs'}")  # fmt: skip
        torch.manual_seed(0)
        task = instantiate(cfg.model)
        data = instantiate(cfg.data, targets=task.TARGETS, parallel_jobs=1)
        data.prepare_data()
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    task.train()
    instance = family == "instance"

    targets = task._targets(batch)  # the ground truth as the net takes it (instance: masks, RoI generator)

    def full() -> None:
        loss = task.net(batch["image"], targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    net, loss_fn = task.net, task.net.loss
    outputs, _ = net.outputs(batch["image"])
    grid = net.slots.grid(outputs, tuple(batch["image"].shape[-2:]))
    pred = flatten_levels(outputs).detach()

    def loss_part() -> None:
        leaf = pred.clone().requires_grad_()
        assignment = loss_fn.assign(grid, targets, leaf.device)
        YOLOLoss.forward(loss_fn, leaf, grid, targets, assignment)["loss"].backward()
        if instance:
            loss_fn.mask_rois(leaf.detach(), grid, targets, assignment)

    parts = {"full": full, "assignment + loss (+ mask RoIs)": loss_part}
    times = harness.alternate({name: partial(harness.seconds_after_warmup, part, 1) for name, part in parts.items()},
                              repeats)  # fmt: skip
    return {name: 1000 * harness.median([s for (s,) in values]) for name, values in times.items()}


def main() -> None:
    parser = harness.arguments(__doc__, repeats=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    args = harness.parse(parser)
    rows = []
    print(f"batch {args.batch} at {args.size} px, median of {args.repeats}, torch threads {torch.get_num_threads()}, "
          f"pipeline from {Path(pipeline.__file__).parent}")  # fmt: skip
    for family in FAMILIES:
        result = bench(family, args.batch, args.size, args.repeats)
        part = result["assignment + loss (+ mask RoIs)"]
        share = part / result["full"]
        print(f"{family:<9} full step {result['full']:.1f} ms; assignment + loss (+ mask RoIs) {part:.1f} ms "
              f"= {100 * share:.1f} % of the step")  # fmt: skip
        rows.append(harness.row("step_share", f"{family}: assignment + loss share of a training step", share, "x",
                                "full training step", "<= 0.05", share <= 0.05))  # fmt: skip
    harness.write_summary(args.summary, rows)


if __name__ == "__main__":
    main()
