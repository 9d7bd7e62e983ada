"""Resume resolution and run metadata stored in every checkpoint.

Lightning's `ckpt_path="last"` only looks in the current run's folder; with Hydra's timestamped run dirs it
finds nothing and silently trains from scratch. We resolve the checkpoint ourselves and fail loudly instead.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class CheckpointError(FileNotFoundError):
    """A checkpoint that cannot be resumed from; the message says which file and why."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's checkpoints/last.ckpt; never None, never a silent fresh start."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        last = p / "checkpoints" / "last.ckpt"
        if not last.is_file():
            found = sorted(q.name for q in (p / "checkpoints").glob("*.ckpt")) if (p / "checkpoints").is_dir() else []
            raise CheckpointError(f"Run directory {p} has no checkpoints/last.ckpt (found: {found or 'nothing'}).")
        return last
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {p} does not exist; refusing to start from scratch.")
    return p


def read_metadata(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The `pipeline` block (config, MLflow run id, run dir) of a checkpoint written by pipeline-train."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = state.get("pipeline")
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{ckpt} was not written by pipeline-train (no 'pipeline' metadata).")
    return meta


def temp_files_beside(run_dir: str | os.PathLike) -> None:
    """Make this process's temporary files live under `<run_dir>/.tmp`.

    Lightning writes a checkpoint to a temporary file and then moves it into place; from $TMPDIR on another
    filesystem that move is a copy, and a kill during it leaves a truncated last.ckpt. On the same
    filesystem it is an atomic rename.
    """
    path = Path(run_dir) / ".tmp"
    path.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(path)


class RunMetadata(pl.Callback):
    """Stores the resolved config, MLflow run id and run dir in every checkpoint (plain dicts and strings).

    Also the dataset's category ids (label i = category_ids[i - 1]), so predictions name the training file's ids.
    """

    def __init__(self, config: dict, run_id: str | None, run_dir: str, tracking_uri: str) -> None:
        self.meta = {"config": config, "mlflow_run_id": run_id, "run_dir": run_dir, "tracking_uri": tracking_uri}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        category_ids = getattr(trainer.datamodule, "category_ids", None)
        checkpoint["pipeline"] = {**self.meta, "category_ids": list(category_ids) if category_ids else None}


def argv_for_resume(argv: list[str]) -> list[str]:
    """Command-line args that make Hydra reuse the checkpoint's run directory when continuing a run.

    Hydra fixes the run dir before our code runs, so `ckpt_path=…` (without `resume_mode=fork` or an explicit
    `hydra.run.dir=…`) is resolved here first; this invocation's Hydra files go to `.hydra/resume-<time>`.
    DDP child processes (LOCAL_RANK set) already get the parent's run dir from Lightning.
    """
    args = dict(a.lstrip("+").split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))
    ckpt = args.get("ckpt_path")
    if (
        os.environ.get("LOCAL_RANK", "0") != "0"
        or ckpt in (None, "", "null")
        or args.get("resume_mode", "continue") == "fork"
        or "hydra.run.dir" in args
    ):
        return argv
    run_dir = read_metadata(resolve_checkpoint(ckpt))["run_dir"]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [*argv, f'hydra.run.dir="{run_dir}"', f"hydra.output_subdir=.hydra/resume-{stamp}"]
