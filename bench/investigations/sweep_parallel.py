"""Parallel sweeps: one 4-job sweep on hydra/launcher=joblib with 2 and 4 jobs at a time against the basic launcher
(one job after another), side by side, in fresh project directories that share nothing (each a new SQLite store,
created and migrated by the sweep itself, as for a new user).

Reports the wall time of each sweep and its ratio to the sequential one, the jobs that FINISHED, and every
"database is locked" / OperationalError line in the sweep's output (racing store writers). Small FCN jobs on
shapes at 96 px (`--epochs` each), loader workers `auto`.

    python bench/investigations/sweep_parallel.py [--epochs 3] [--repeats 3] [--no-4]

With `--repeats N` the launchers take turns N times, in an order turned each round, and the table shows medians
(the ratio is the median of each round's own ratio); `--no-4` leaves out 4 jobs at a time. A one-off
investigation (not in bench/run_all.py) of whether parallel jobs pay off on 2 cores; BENCHMARKS.md records it.
"""

from __future__ import annotations

import os
import subprocess
from functools import partial

import _path  # noqa: F401 (bench/ on sys.path, for the harness)
import harness
from mlflow.tracking import MlflowClient

JOB = [
    "-m", "seed=1,2,3,4", "data.spec.num_train=96", "data.spec.num_val=16", "data.spec.image_size=96",
    "data.batch_size=8", "data.train_sizes=[96]", "data.val_size=96", "model.net.backbone.width=16",
    "trainer.accelerator=cpu", "callbacks.model_summary.max_depth=0",
]  # fmt: skip
LAUNCHERS = {
    "basic (sequential)": [],
    "joblib n_jobs=2": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "joblib n_jobs=4": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"],
}


def run_sweep(extra: list[str], epochs: int) -> tuple[float, int, list[str]]:
    """Wall seconds, FINISHED children and store-error lines of one sweep in a fresh project directory."""
    with harness.project() as project:
        # The sweep's own default store (outputs/mlflow.db of the project), as a user's first sweep finds it.
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [*harness.TRAIN, *JOB, f"trainer.max_epochs={epochs}", *extra]
        proc, seconds = harness.timed(partial(subprocess.run, command, cwd=project.root, env=env, capture_output=True,
                                              text=True))  # fmt: skip
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"sweep {extra} failed ({proc.returncode}):\n{log[-4000:]}")
        errors = [line for line in log.splitlines() if "database is locked" in line or "OperationalError" in line]
        client = MlflowClient(project.uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        finished = sum(r.info.status == "FINISHED" and "pipeline.sweep.job" in r.data.tags for r in runs)
        return seconds, finished, errors


def main() -> None:
    parser = harness.arguments(__doc__, repeats=1, summary=False)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-4", dest="four", action="store_false", help="leave out joblib n_jobs=4")
    args = harness.parse(parser)
    launchers = {k: v for k, v in LAUNCHERS.items() if args.four or "n_jobs=4" not in k}
    sweeps = harness.alternate({name: partial(run_sweep, extra, args.epochs) for name, extra in launchers.items()},
                               args.repeats)  # fmt: skip
    basic = [seconds for seconds, _, _ in sweeps["basic (sequential)"]]
    print(f"4-job sweep, {args.epochs} epochs per job, {os.cpu_count()} cores, median of {args.repeats}")
    print(f"{'launcher':<22}{'wall s':>9}{'ratio':>8}{'finished':>10}{'store errors':>14}  each round's ratio")
    for name in launchers:
        seconds = [s for s, _, _ in sweeps[name]]
        ratios = harness.ratios(seconds, basic)
        finished = min(f for _, f, _ in sweeps[name])
        errors = [line for _, _, lines in sweeps[name] for line in lines]
        print(f"{name:<22}{harness.median(seconds):>9.1f}{harness.median(ratios):>8.2f}{finished:>8}/4"
              f"{len(errors):>14}  {' '.join(f'{x:.2f}' for x in ratios)}")  # fmt: skip
        for line in errors[:3]:
            print(f"    {line[:150]}")


if __name__ == "__main__":
    main()
