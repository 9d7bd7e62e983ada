"""The same `pipeline-train` command at two commits, taking turns: wall time and the monitored metric per epoch.

Answers "did this change the numbers, and what does it cost" on one machine, where absolute times drift between
machines and sessions. The other commit runs from a temporary `git worktree` (its `pipeline` package first on
PYTHONPATH, this checkout's venv); each run gets its own scratch project dir (data generated there, own store).

    python bench/ab_commits.py 858e2bd --rounds 2 -- trainer.max_epochs=4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent


def run_once(code: Path, overrides: list[str], metric: str) -> tuple[float, list[float]]:
    """(wall seconds, the metric's value at each logged step) of one training of the code at `code`."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(code)}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli.train", *overrides], cwd=tmp, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wall = time.perf_counter() - start
        client = MlflowClient(f"sqlite:///{tmp}/outputs/mlflow.db")
        experiment = client.get_experiment_by_name("pipeline")
        (run,) = client.search_runs([experiment.experiment_id])
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        return wall, [m.value for m in history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="the commit to compare this checkout with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--metric", default="val/mIoU")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]  # pipeline-train overrides, after --
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), args.other], cwd=ROOT, check=True)
        # An editable install maps the package `pipeline.conf` to this checkout's conf/, whatever PYTHONPATH says:
        # without a `pipeline/conf` of its own the other commit would run with this checkout's configs.
        if (worktree / "conf" / "__init__.py").is_file() and not (worktree / "pipeline" / "conf").exists():
            (worktree / "pipeline" / "conf").symlink_to("../conf")
        try:
            sides = {"this checkout": ROOT, args.other: worktree}
            walls: dict[str, list[float]] = {name: [] for name in sides}
            for round_ in range(args.rounds):
                for name, code in sides.items():
                    wall, values = run_once(code, args.overrides, args.metric)
                    walls[name].append(wall)
                    print(f"round {round_ + 1} {name:>14}: {wall:7.1f} s  {args.metric} " +
                          " ".join(f"{v:.6f}" for v in values), flush=True)  # fmt: skip
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    mine, theirs = (statistics.median(w) for w in walls.values())
    print(f"median wall: this checkout {mine:.1f} s, {args.other} {theirs:.1f} s: {mine / theirs:.3f}x")


if __name__ == "__main__":
    main()
