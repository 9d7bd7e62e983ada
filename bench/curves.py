"""The validation curves of a `bench/peers.py --workdir DIR` run as small PNGs for the docs: each side's own
per-epoch validation figure against minutes of training.

Ours: the metric from the run's MLflow store, at each validation's timestamp (minutes since the run started:
data checks and anchors included). Ultralytics: `metrics/mAP50-95(B)` / `metrics/mAP50(B)` from its results.csv against its `time` column
(its own validation: other matching rules than pycocotools, so read the shapes, not the last digits). The smp
loop: the val mIoU per epoch it printed, at epoch x its seconds per epoch.

    python bench/curves.py DIR --out docs/img     # one PNG per dataset and budget found in DIR
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
from pathlib import Path

import harness
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS_METRICS = {"bccd": ("val/map", "val/map_50"), "isbi": ("val/mIoU", "val/pixel_acc")}
YOLO_COLUMNS = {"val/map": "metrics/mAP50-95(B)", "val/map_50": "metrics/mAP50(B)"}


def ours(project: Path, key: str) -> tuple[list[float], list[float]]:
    """(minutes since the run started, values) of metric `key` in the project's MLflow run."""
    from mlflow.tracking import MlflowClient

    uri = harness.Project(project).uri
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pipeline")
    # The training run: the one with the longest history of `key` (pipeline-eval's run logs it once).
    runs = client.search_runs([experiment.experiment_id])
    run = max(runs, key=lambda r: len(harness.history(uri, r.info.run_id, key)))
    points = harness.history(uri, run.info.run_id, key)
    return [(m.timestamp - run.info.start_time) / 60000 for m in points], [m.value for m in points]


def ultralytics(project: Path, key: str) -> tuple[list[float], list[float]]:
    """(minutes, values) of Ultralytics' own validation metric for our `key` from its results.csv."""
    (table,) = project.rglob("results.csv")
    rows = list(csv.DictReader(table.open()))
    return [float(r["time"]) / 60 for r in rows], [float(r[YOLO_COLUMNS[key]]) for r in rows]


def smp_loop(project: Path) -> tuple[list[float], list[float]]:
    """(minutes, val mIoU) of the smp loop: its printed per-epoch history at its mean seconds per epoch."""
    line = next(x for x in (project / "peer.log").read_text().splitlines() if "val mIoU per epoch" in x)
    values = ast.literal_eval(line[line.index("[") :])
    result = json.loads((project / "smp_result.json").read_text())
    per_epoch = result["fit_wall_s"] / max(1, result["epochs"]) / 60
    return [per_epoch * (i + 1) for i in range(len(values))], values


def plot(workdir: Path, tag: str, out: Path) -> Path:
    """One figure for the runs `<tag>-ours` and `<tag>-peer` (e.g. bccd-20m): a panel per metric."""
    name = tag.split("-")[0]
    keys = OURS_METRICS[name]
    fig, axes = plt.subplots(1, len(keys) if name == "bccd" else 1, figsize=(4.2 * (2 if name == "bccd" else 1), 3))
    axes = list(axes) if name == "bccd" else [axes]
    for ax, key in zip(axes, keys, strict=False):
        ax.plot(*ours(workdir / f"{tag}-ours", key), label=f"ours ({key})", marker=".", markersize=3)
        if name == "bccd":
            ax.plot(*ultralytics(workdir / f"{tag}-peer", key), label=f"YOLO26n (its own {YOLO_COLUMNS[key]})", marker=".", markersize=3)
        else:
            ax.plot(*smp_loop(workdir / f"{tag}-peer"), label="smp U-Net (val mIoU)", marker=".", markersize=3)
        ax.set_xlabel("minutes of training")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}, {tag.split('-')[1]} budget, 2 CPU cores, from scratch", fontsize=9)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{tag}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="a bench/peers.py --workdir folder")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    tags = sorted(p.name[: -len("-ours")] for p in args.workdir.glob("*-ours") if (args.workdir / f"{p.name[:-5]}-peer").is_dir())
    for tag in tags:
        print(plot(args.workdir, tag, args.out))


if __name__ == "__main__":
    main()
