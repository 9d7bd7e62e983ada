"""FCN-32s, 16s, 8s, 4s and 2s on shapes with the same budget: mIoU over all pixels, near class boundaries and in
the interior.

Each variant is `pipeline-train model=fcn<v>` as a user runs it (the default experiment otherwise), one after the
other in one fresh project directory, the same epochs and seed. Its last.ckpt is then scored on the validation images
at their original resolution (the protocol of `val/mIoU`) three ways, from one confusion matrix per region:
all pixels; pixels within `--band` px of a ground-truth class boundary (the trimap of Kohli et al. / DeepLab,
where coarse strides lose); and the interior (the rest). The paper's claim is that the finer skips (16s, 8s)
recover boundary detail: the band column is where the ordering should show. A one-off investigation (not in
bench/run_all.py); BENCHMARKS.md records its result.

    python bench/investigations/fcn_variants.py                    # 30 epochs each (~4 min each on 2 cores)
    python bench/investigations/fcn_variants.py --epochs 2         # a quick look
    python bench/investigations/fcn_variants.py --variants 4s 2s   # some of them
"""

from __future__ import annotations

from pathlib import Path

import _path  # noqa: F401 (bench/ on sys.path, for the harness)
import harness
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from pipeline.metrics.segmentation import ConfusionMatrixIoU
from pipeline.training.loading import load_task

VARIANTS = ("32s", "16s", "8s", "4s", "2s")


def boundary_band(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Labels [H, W] -> bool [H, W]: pixels with a differently labelled pixel within `radius` (Chebyshev)."""
    labels = mask[None, None].float()
    window = 2 * radius + 1
    high = F.max_pool2d(labels, window, stride=1, padding=radius)
    low = -F.max_pool2d(-labels, window, stride=1, padding=radius)
    return (high != low)[0, 0]


def train(project: harness.Project, variant: str, epochs: int, extra: list[str]) -> tuple[Path, list[float], float]:
    """pipeline-train model=fcn<variant>; returns its run dir, per-epoch val/mIoU and wall time."""
    runs = project.root / "outputs" / "train" / "runs"
    before = set(runs.glob("*"))
    command = [*harness.TRAIN, f"model=fcn{variant}", f"trainer.max_epochs={epochs}", *extra]
    wall = harness.run_timed(command, project.root, project.env, quiet=False)
    (run_dir,) = set(runs.glob("*")) - before
    history = harness.history(project.uri, harness.latest_run(project.uri).info.run_id, "val/mIoU")
    return run_dir, [m.value for m in history], wall


def score(ckpt: Path, radius: int) -> dict[str, float]:
    """mIoU of the checkpoint on its validation set at original resolution: all pixels, boundary band, interior."""
    task, cfg, _ = load_task(ckpt)
    data = instantiate(cfg.data, targets=task.TARGETS, num_workers=0)
    data.setup("validate")
    ignore = int(cfg.data.ignore_index)
    metrics = {region: ConfusionMatrixIoU(int(cfg.data.num_classes), ignore) for region in ("all", "band", "interior")}
    with torch.no_grad():
        for batch in data.val_dataloader():
            sizes = [tuple(m.shape) for m in batch["orig_mask"]]
            for labels, truth in zip(task.predict_masks(batch["image"], sizes), batch["orig_mask"], strict=True):
                band = boundary_band(truth, radius)
                logits = F.one_hot(labels, int(cfg.data.num_classes)).permute(2, 0, 1)[None].float()
                for region, keep in (("all", None), ("band", band), ("interior", ~band)):
                    target = truth.clone() if keep is not None else truth
                    if keep is not None:
                        target[~keep] = ignore
                    metrics[region].update(logits, target[None])
    return {region: float(metric.summary()["mIoU"]) for region, metric in metrics.items()}


def main() -> None:
    parser = harness.arguments(__doc__, summary=False)
    parser.add_argument("--epochs", type=int, default=30, help="trainer.max_epochs of every variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which to train")
    parser.add_argument("--band", type=int, default=3, help="boundary band half-width in pixels")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = harness.parse(parser)
    rows = []
    with harness.project() as project:
        for variant in args.variants:
            run_dir, history, wall = train(project, variant, args.epochs, args.overrides)
            rows.append((variant, wall, history, score(run_dir / "checkpoints" / "last.ckpt", args.band)))

    print(f"\nFCN variants on shapes, {args.epochs} epochs each, {torch.get_num_threads()} torch threads, "
          f"boundary band {args.band} px, overrides: {args.overrides or 'none'}")  # fmt: skip
    print(f"{'variant':<10}{'wall (s)':>10}{'last val/mIoU':>15}{'best':>8}{'mIoU all':>10}{'band':>8}"
          f"{'interior':>10}")  # fmt: skip
    for variant, wall, history, scores in rows:
        if abs(scores["all"] - history[-1]) > 1e-6:  # the task's own metric, recomputed here independently
            print(f"FCN-{variant}: mIoU over all pixels {scores['all']:.6f} differs from the logged {history[-1]:.6f}")
        print(f"FCN-{variant:<6}{wall:>10.1f}{history[-1]:>15.4f}{max(history):>8.4f}{scores['all']:>10.4f}"
              f"{scores['band']:>8.4f}{scores['interior']:>10.4f}")  # fmt: skip
    for variant, _, history, _ in rows:
        print(f"per-epoch val/mIoU FCN-{variant}:", " ".join(f"{v:.3f}" for v in history))


if __name__ == "__main__":
    main()
