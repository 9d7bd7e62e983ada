"""Resume resolution and run metadata stored in every checkpoint.

Lightning's `ckpt_path="last"` only looks in the current run's folder; with Hydra's timestamped run dirs it
finds nothing and silently trains from scratch. We resolve the checkpoint ourselves and fail loudly instead.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but each file is written beside its target and renamed into place.

    Lightning's own atomic save stages the file with `tempfile.mkstemp()` in $TMPDIR: from another filesystem
    the final move is a copy, and a kill during it leaves a truncated last.ckpt. A temporary file in the target's
    own directory makes the rename atomic without touching the process-wide temporary directory (which
    multiprocessing also uses for its sockets, whose paths must stay short).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Write `checkpoint` to `<dir>/.<name>.<random>.tmp`, fsync it, then `os.replace` it onto `path`."""
        if storage_options is not None or "://" in str(path):  # remote or custom storage: Lightning's own path
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(staging, "xb") as f:  # created with the usual permissions (umask), unlike mkstemp's 0600
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise


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
    Lightning-spawned DDP children already get the parent's run dir (`hydra.run.dir=…` on their command line);
    every rank that torchrun/srun started resolves it here itself.
    """
    args = dict(a.lstrip("+").split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))
    ckpt = args.get("ckpt_path")
    if ckpt in (None, "", "null") or args.get("resume_mode", "continue") == "fork" or "hydra.run.dir" in args:
        return argv
    run_dir = read_metadata(resolve_checkpoint(ckpt))["run_dir"]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [*argv, f'hydra.run.dir="{run_dir}"', f"hydra.output_subdir=.hydra/resume-{stamp}"]
