"""The same `pipeline-train` command at this checkout and at another commit, taking turns: the wall time (ratio this
checkout / the other commit, median of the per-round ratios) and the monitored metric at each epoch of both.

Answers "did this change the numbers, and what does it cost" on one machine, where absolute times drift between
machines and sessions. The other commit runs from a temporary `git worktree` (its `pipeline` package first on
PYTHONPATH, this checkout's venv); each run gets a fresh project directory (data generated there, own store).
Every round runs both sides, in an order turned each round. A tool for one-off checks, not in bench/run_all.py:
BENCHMARKS.md records what it found for the FCN, detector and instance model (identical curves across a set of
hot-path changes).

    python bench/investigations/ab_commits.py 858e2bd --rounds 2 -- trainer.max_epochs=4
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import _path  # noqa: F401 (bench/ on sys.path, for the harness)
import harness


def run_once(name: str, code: Path, overrides: list[str], metric: str) -> tuple[float, list[float]]:
    """(wall seconds, the metric's value at each logged step) of one training of the code at `code`; printed."""
    with harness.project() as project:
        # No MLFLOW_TRACKING_URI set here: each commit's config puts the store at its default, outputs/mlflow.db.
        env = {**os.environ, "PYTHONPATH": str(code)}
        wall = harness.run_timed([*harness.TRAIN, *overrides], project.root, env)
        values = [m.value for m in harness.history(project.uri, harness.latest_run(project.uri).info.run_id, metric)]
    print(f"{name:>14}: {wall:7.1f} s  {metric} " + " ".join(f"{v:.6f}" for v in values), flush=True)
    return wall, values


def main() -> None:
    parser = harness.arguments(__doc__, summary=False)
    parser.add_argument("other", help="the commit to compare this checkout with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--metric", default="val/mIoU")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]  # pipeline-train overrides, after --
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "other"
        root = harness.ROOT
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), args.other], cwd=root, check=True)
        # An editable install maps the package `pipeline.conf` to this checkout's conf/, whatever PYTHONPATH says:
        # without a `pipeline/conf` of its own the other commit would run with this checkout's configs.
        if (worktree / "conf" / "__init__.py").is_file() and not (worktree / "pipeline" / "conf").exists():
            (worktree / "pipeline" / "conf").symlink_to("../conf")
        try:
            sides = {"this checkout": root, args.other: worktree}
            runs = harness.alternate({name: partial(run_once, name, code, args.overrides, args.metric)
                                      for name, code in sides.items()}, args.rounds)  # fmt: skip
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root, check=False)
    mine, theirs = ([wall for wall, _ in runs[name]] for name in sides)
    each = " ".join(f"{r:.3f}" for r in harness.ratios(mine, theirs))
    print(
        f"median wall: this checkout {harness.median(mine):.1f} s, {args.other} {harness.median(theirs):.1f} s; "
        f"this checkout / {args.other} each round {each}, median {harness.median_ratio(mine, theirs):.3f}x"
    )


if __name__ == "__main__":
    main()
