"""The mask branch's cost per batch: training step and validation batch of the detector + mask branch against the
detector alone, side by side.

One training step (forward, backward, AdamW) on a 16-image training batch at 128 px, and one validation batch
(forward, post-processing, masks for every detection), for `experiment=shapes_yolo` and
`experiment=shapes_instance` with the same fixed anchors. Median of `--repeats` timed runs after one warm-up, in
seconds (no ratio is printed). A one-off investigation (not in bench/run_all.py) behind the instance model's
epoch budget in BENCHMARKS.md; bench/postprocess.py measures its validation cost against the forward pass.

    python bench/investigations/instance_step_cost.py
"""

from __future__ import annotations

import _path  # noqa: F401 (bench/ on sys.path, for the harness)
import harness
import torch
from hydra.utils import instantiate

ANCHORS = "[" + ",".join(f"[{4 * i},{3 * i}]" for i in range(1, 10)) + "]"


def measure(experiment: str, root: str, repeats: int) -> dict[str, float]:
    """Median seconds of one training step and one validation batch, and the detections in that batch."""
    torch.manual_seed(0)
    overrides = [f"experiment={experiment}", f"model.anchors={ANCHORS}", "data.num_workers=0", f"data.root={root}"]
    cfg = harness.train_config(*overrides)
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

    train_s = harness.median(harness.seconds_after_warmup(train_step, repeats))
    task.eval()
    val_s = harness.median(harness.seconds_after_warmup(val_batch, repeats))
    return {"train_step_s": train_s, "val_batch_s": val_s}


def main() -> None:
    args = harness.parse(harness.arguments(__doc__, repeats=5, summary=False))
    with harness.project() as project:
        data = project.root / "data" / "shapes"
        results = {exp: measure(exp, str(data), args.repeats) for exp in ("shapes_yolo", "shapes_instance")}
    print(f"\n{torch.get_num_threads()} torch threads, batch 16 at 128 px, median of {args.repeats}")
    print(f"{'':<18}{'train step (s)':>16}{'val batch (s)':>16}")
    for experiment, r in results.items():
        print(f"{experiment:<18}{r['train_step_s']:>16.3f}{r['val_batch_s']:>16.3f}")


if __name__ == "__main__":
    main()
