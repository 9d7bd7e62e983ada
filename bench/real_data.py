"""Real annotated data (../shared/datasets): each model trained from scratch for a fixed wall time, its validation
metrics against the quality targets.

Each dataset's experiment runs as a user would run it, `pipeline-train experiment=<name>
+trainer.max_time=DD:HH:MM:SS` (Hydra, Lightning, MLflow, checkpoints), in a scratch project dir with its own
MLflow SQLite store; the scratch dir sits beside a link to the real `shared/`, so the experiments' own
`${paths.root_dir}/../shared/datasets/…` paths resolve. Lightning's Timer stops training when the budget is spent
(counted from the start of training: start-up, data checks and k-means come on top). coco128seg_instance's
max_epochs is about what the budget fits on 2 idle CPU cores, because its cosine anneals over max_epochs: such a
run should end by its epochs (fully annealed), the budget is a cap. bccd_yolo's and isbi_fcn's warm-up cosine
anneals by the budget itself (model/sched=warmup_cosine), their max_epochs only a bound. The report says
which of the two ended each run. Per-epoch validation metrics are read back from MLflow; the table shows the last
epoch, the best epoch and the target, the per-epoch curve of the first metric, and the learning rate at the start
of the first and the last epoch.

    python bench/real_data.py                                  # all three, full budgets (45 minutes of training)
    python bench/real_data.py --only isbi_membrane             # one
    python bench/real_data.py --minutes-scale 0.05             # a smoke run: 5% of each budget
    python bench/real_data.py --only bccd -- data.batch_size=4 # extra Hydra overrides after --
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness

SHARED = harness.ROOT.parent / "shared"


@dataclass(frozen=True)
class Bench:
    """One dataset: its experiment config, time budget, the metrics to report and their targets."""

    experiment: str
    minutes: float
    metrics: tuple[str, ...]
    targets: dict[str, float] = field(default_factory=dict)


BENCHES = {
    # Issue 26's targets; the platelets' AP (the smallest, rarest class) is reported.
    "bccd": Bench(
        "bccd_yolo", 20, ("val/map_50", "val/map", "val/AP/Platelets"), {"val/map_50": 0.90, "val/map": 0.60}
    ),
    "isbi_membrane": Bench(
        "isbi_fcn",
        10,
        ("val/mIoU", "val/pixel_acc", "val/IoU/membrane", "val/IoU/cell"),
        {"val/mIoU": 0.80, "val/pixel_acc": 0.92},
    ),
    "coco128-seg": Bench("coco128seg_instance", 15, ("val/segm_map", "val/segm_map_50")),  # a measured figure
}



def max_epochs(experiment: str, overrides: list[str]) -> int:
    """trainer.max_epochs of the experiment as composed with the overrides."""
    return int(harness.train_config(f"experiment={experiment}", *overrides).trainer.max_epochs)


def run(project: Path, bench: Bench, budget_s: float, overrides: list[str]) -> dict:
    """pipeline-train in `project` with the time budget; per-epoch metrics and learning rates from its MLflow run."""
    place = harness.Project(project)
    cmd = [*harness.TRAIN, f"experiment={bench.experiment}", f"+trainer.max_time={harness.max_time(budget_s)}", *overrides]
    log = project / "train.log"
    start = time.perf_counter()
    with log.open("w") as out:  # a failed run is reported with its log, and the other datasets still run
        proc = subprocess.run(cmd, cwd=project, env=place.env, stdout=out, stderr=subprocess.STDOUT, check=False)
    result = {"cmd": cmd, "rc": proc.returncode, "wall_s": time.perf_counter() - start, "log": log}
    if proc.returncode != 0:
        return result
    mlflow_run = harness.latest_run(place.uri)
    run_id = mlflow_run.info.run_id

    def history(key: str) -> list[float]:
        return [m.value for m in harness.history(place.uri, run_id, key)]

    result["history"] = {key: history(key) for key in bench.metrics}
    lr_keys = sorted(k for k in mlflow_run.data.metrics if k.startswith("lr-"))
    result["lr"] = history(lr_keys[0]) if lr_keys else []
    epochs = history("epoch")
    result["epochs_started"] = int(max(epochs)) + 1 if epochs else 0
    return result


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def table(rows: list[tuple[str, Bench, float, int, dict]]) -> str:
    """A markdown table: one line per dataset and metric (last epoch, best epoch, target)."""
    lines = ["| dataset | budget (min) | epochs validated | metric | last epoch | best (epoch) | target |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, bench, minutes, _, result in rows:
        if result["rc"] != 0:
            lines.append(f"| {name} | {minutes:g} | failed (exit {result['rc']}) | | | | |")
            continue
        for i, key in enumerate(bench.metrics):
            values = result["history"][key]
            best = max(range(len(values)), key=values.__getitem__) if values else None
            target = bench.targets.get(key)
            met = "" if target is None or not values else (" ✓" if values[-1] >= target else " ✗")
            lines.append(
                f"| {name if i == 0 else ''} | {f'{minutes:g}' if i == 0 else ''} | "
                f"{len(values) if i == 0 else ''} | {key} | {_fmt(values[-1] if values else None)} | "
                f"{'–' if best is None else f'{values[best]:.3f} ({best + 1})'} | "
                f"{('–' if bench.targets else 'measured') if target is None else f'≥ {target:.2f}{met}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = harness.arguments(__doc__, summary=False)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only this dataset (repeatable)")
    parser.add_argument("--minutes-scale", type=float, default=1.0, help="multiply every budget (smoke runs: 0.05)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the scratch projects (runs, MLflow stores, train.log) here instead of a temp dir",
    )
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table to this file")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = harness.parse(parser)
    if not (SHARED / "datasets").is_dir():
        sys.exit(f"{SHARED / 'datasets'} is absent: this benchmark needs the real datasets beside the repository.")
    names = args.only or list(BENCHES)

    rows = []
    with tempfile.TemporaryDirectory(prefix="real_data_") as tmp:
        base = args.workdir.resolve() if args.workdir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        if not (base / "shared").exists():
            (base / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)  # ${paths.root_dir}/../shared
        for name in names:
            if (base / name).exists():
                sys.exit(f"{base / name} exists: give --workdir a new or empty folder.")
            bench = BENCHES[name]
            minutes = bench.minutes * args.minutes_scale
            epochs = max_epochs(bench.experiment, args.overrides)
            print(f"[{name}] pipeline-train experiment={bench.experiment} +trainer.max_time={harness.max_time(minutes * 60)} "
                  f"(max_epochs {epochs}) {' '.join(args.overrides)}", flush=True)  # fmt: skip
            result = run(base / name, bench, minutes * 60, list(args.overrides))
            print(f"[{name}] exit {result['rc']} after {result['wall_s']:.0f} s, log: {result['log']}", flush=True)
            if result["rc"] != 0:
                print(result["log"].read_text()[-4000:], file=sys.stderr)
            rows.append((name, bench, minutes, epochs, result))

        print("\nReal data, trained from scratch, one time budget each (`+trainer.max_time`), 2 CPU cores\n")
        text = table(rows)
        print(text)
        for name, bench, _, epochs, result in rows:
            if result["rc"] != 0:
                continue
            first = bench.metrics[0]
            ended = ("ended by max_epochs, within the budget" if result["epochs_started"] >= epochs
                     else "stopped by the time budget")  # fmt: skip
            print(f"\n{name}: {result['wall_s']:.0f} s wall in all; {result['epochs_started']} epoch(s) started of "
                  f"max_epochs {epochs} — {ended}")  # fmt: skip
            print(f"  per-epoch {first}:", " ".join(f"{v:.3f}" for v in result["history"][first]))
            if result["lr"]:
                print(f"  learning rate at the start of the first epoch {result['lr'][0]:.2e}, of the last "
                      f"{result['lr'][-1]:.2e}")  # fmt: skip
        if args.table:
            args.table.write_text(text + "\n")
    if any(result["rc"] != 0 for *_, result in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
