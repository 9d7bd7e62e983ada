"""The default training (FCN-8s on shapes): `pipeline-train` against a raw PyTorch loop, side by side.

Ours: the real entry point as a user runs it (Hydra, Lightning, MLflow, multi-scale, checkpoints), in a
scratch project dir; we read val/mIoU per epoch back from MLflow with its timestamps, so the time to reach a
target mIoU (`--target`, 0.90) includes everything a user waits for (data generation, start-up, validation,
logging).
Reference: the same net, data, optimizer and schedule in a plain PyTorch loop (fixed size, no logging), run
for the same number of epochs, to show what the pipeline costs per step.

    python bench/fcn_shapes.py                     # defaults: the full default training
    python bench/fcn_shapes.py --epochs 2 --skip-reference   # a quick look
"""

from __future__ import annotations

import time
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from pipeline.data.coco import CocoSemanticSource
from pipeline.data.datamodule import SegmentationSamples
from pipeline.data.shapes import ShapesSpec, ensure_shapes
from pipeline.data.transforms import compose as compose_transforms
from pipeline.metrics.segmentation import ConfusionMatrixIoU
from pipeline.tasks.segmentation import SegmentationTask


def run_ours(project: harness.Project, overrides: list[str], target: float) -> dict:
    """Run pipeline-train; return wall time, per-epoch mIoU and the time the target was first reached."""
    start = time.time()  # epoch seconds, as MLflow's timestamps
    wall = harness.run_timed([*harness.TRAIN, *overrides], project.root, project.env, quiet=False)
    run_id = harness.latest_run(project.uri).info.run_id
    history = harness.history(project.uri, run_id, "val/mIoU")
    reached = next((m.timestamp / 1000 - start for m in history if m.value >= target), None)
    steps = max(m.step for m in harness.history(project.uri, run_id, "train/loss_step")) + 1
    return {"wall_s": wall, "miou": [m.value for m in history], "reached_s": reached, "steps": steps}


def run_reference(workdir: Path, overrides: list[str], epochs: int) -> dict:
    """The same model/data/optimizer in a bare PyTorch loop at the base size; returns time and final mIoU."""
    cfg = harness.train_config(*overrides, f"paths.root_dir={workdir}", "paths.output_dir=/tmp")
    torch.manual_seed(cfg.seed)
    root = ensure_shapes(Path(cfg.data.root), ShapesSpec(**cfg.data.spec))
    size = int(cfg.data.val_size)
    augment = compose_transforms([instantiate(t) for t in cfg.data.train_transforms])

    def samples(split: str, aug) -> SegmentationSamples:
        source = CocoSemanticSource(root / "images" / split, root / "annotations" / f"instances_{split}.json")
        return SegmentationSamples(source, aug, size, 255)

    train = DataLoader(samples("train", augment), batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(samples("val", compose_transforms([])), batch_size=cfg.data.batch_size)
    task = SegmentationTask(**{k: v for k, v in cfg.model.items() if k not in ("_target_", "_recursive_")})
    optimizer = instantiate(cfg.model.optimizer, params=task.parameters())
    scheduler = instantiate(cfg.model.scheduler, optimizer=optimizer, T_max=epochs)
    start, steps = time.time(), 0
    for _ in range(epochs):
        task.train()
        for batch in train:
            loss = F.cross_entropy(task(batch["image"]), batch["mask"], ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        scheduler.step()
    train_s = time.time() - start
    task.eval()
    metric = ConfusionMatrixIoU(cfg.data.num_classes)
    with torch.no_grad():
        for batch in val:
            metric.update(task(batch["image"]), batch["mask"])
    return {"wall_s": train_s, "miou": float(metric.summary()["mIoU"]), "steps": steps}


def main() -> None:
    parser = harness.arguments(__doc__, summary=False)
    harness.add_training(parser)
    parser.add_argument("--target", type=float, default=0.90, help="val mIoU to reach")
    parser.add_argument("--skip-reference", action="store_true", help="only run the pipeline")
    args = harness.parse(parser)
    overrides, epochs = harness.training_overrides(args)

    with harness.project() as project:
        ours = run_ours(project, overrides, args.target)
        ref = None if args.skip_reference else run_reference(project.root, overrides, epochs)

    print(
        f"\nFCN on shapes, {epochs} epochs, {torch.get_num_threads()} torch threads, overrides: {overrides or 'none'}"
    )
    print(f"{'':<28}{'pipeline-train':>18}{'raw PyTorch loop':>20}")
    print(f"{'wall time (s)':<28}{ours['wall_s']:>18.1f}{(ref['wall_s'] if ref else float('nan')):>20.1f}")
    print(f"{'optimizer steps':<28}{ours['steps']:>18d}{(ref['steps'] if ref else 0):>20d}")
    print(f"{'final val mIoU':<28}{ours['miou'][-1]:>18.4f}{(ref['miou'] if ref else float('nan')):>20.4f}")
    print(f"{'best val mIoU':<28}{max(ours['miou']):>18.4f}")
    reached = f"{ours['reached_s']:.1f}" if ours["reached_s"] is not None else "not reached"
    print(f"{f'time to mIoU >= {args.target:.2f} (s)':<28}{reached:>18}")
    print("per-epoch val mIoU:", " ".join(f"{v:.3f}" for v in ours["miou"]))


if __name__ == "__main__":
    main()
