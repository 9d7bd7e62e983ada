"""Start-up cost: the wall time of a 1-step `pipeline-train` run against the bare import time of the libraries it
needs, each a fresh process.

Sides, every repeat all three in an order turned by one each repeat (medians of `--repeats`):
- reference, bare imports: `python -c "import torch, pytorch_lightning, mlflow, torchvision, albumentations"`;
- `pipeline-train --cfg job`: compose and print the config (imports + Hydra, nothing trained);
- a 1-step `pipeline-train experiment=shapes_yolo` (one training batch, one validation batch, MLflow run,
  checkpoints), in a fresh project directory whose shapes data and store a warm-up run made first.
Headline: the 1-step run's median over the bare imports' median; target at most 1.3x.

    python bench/startup.py                 # 3 repeats
    python bench/startup.py --repeats 5
"""

from __future__ import annotations

import sys
from functools import partial

import harness

IMPORTS = "import torch, pytorch_lightning, mlflow, torchvision, albumentations"
ONE_STEP = ["experiment=shapes_yolo", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "data.num_workers=0", "trainer.accelerator=cpu"]  # fmt: skip


def main() -> None:
    args = harness.parse(harness.arguments(__doc__, repeats=3))
    commands = {
        "bare imports": [sys.executable, "-c", IMPORTS],
        "pipeline-train --cfg job": [*harness.TRAIN, *ONE_STEP, "--cfg", "job"],
        "1-step shapes_yolo run": [*harness.TRAIN, *ONE_STEP],
    }
    with harness.project() as project:
        sides = {name: partial(harness.run_timed, c, project.root, project.env) for name, c in commands.items()}
        sides["1-step shapes_yolo run"]()  # warm-up: generates the data, migrates the store
        times = harness.alternate(sides, args.repeats)
    floor = harness.median(times["bare imports"])
    print(f"\nStart-up, median of {args.repeats} fresh processes each (order turned every repeat)")
    print(f"{'':<28}{'median (s)':>12}{'x bare imports':>16}   repeats (s)")
    for name, values in times.items():
        value = harness.median(values)
        print(f"{name:<28}{value:>12.2f}{value / floor:>16.2f}   " + " ".join(f"{v:.2f}" for v in values))
    ratio = harness.median(times["1-step shapes_yolo run"]) / floor
    harness.write_summary(args.summary, [harness.row("startup", "1-step shapes_yolo run, wall time", ratio, "x",
                                                     "bare imports", "<= 1.3", ratio <= 1.3)])  # fmt: skip


if __name__ == "__main__":
    main()
