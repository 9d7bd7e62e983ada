"""Benchmark: one 4-job sweep on the basic launcher (one job after another) vs hydra/launcher=joblib with 2 and 4
jobs at a time, side by side, in fresh project directories that share nothing (each its own new SQLite store).

Reports the wall time of each sweep and its ratio to the sequential one, the jobs that FINISHED, and every
"database is locked" / OperationalError line in the sweep's output (racing store writers). Small FCN jobs on
shapes at 96 px (`--epochs` each), loader workers `auto`.

    python bench/sweep_parallel.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.train", *JOB, f"trainer.max_epochs={epochs}", *extra],
                              cwd=root, env=env, capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"sweep {extra} failed ({proc.returncode}):\n{log[-4000:]}")
        errors = [line for line in log.splitlines() if "database is locked" in line or "OperationalError" in line]
        client = MlflowClient(f"sqlite:///{Path(root) / 'outputs' / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        finished = sum(r.info.status == "FINISHED" and "pipeline.sweep.job" in r.data.tags for r in runs)
        return seconds, finished, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    results = {name: run_sweep(extra, args.epochs) for name, extra in LAUNCHERS.items()}
    base = results["basic (sequential)"][0]
    print(f"4-job sweep, {args.epochs} epochs per job, {os.cpu_count()} cores")
    print(f"{'launcher':<22}{'wall s':>9}{'ratio':>8}{'finished':>10}{'store errors':>14}")
    for name, (seconds, finished, errors) in results.items():
        print(f"{name:<22}{seconds:>9.1f}{seconds / base:>8.2f}{finished:>8}/4{len(errors):>14}")
        for line in errors[:3]:
            print(f"    {line[:150]}")


if __name__ == "__main__":
    main()
