"""What a run's MLflow page and its experiment's runs table show at a glance, beyond params and step metrics.

- `source_tags`: MLflow's standard user and source tags (the fluent `mlflow.start_run` sets them, `MlflowClient`
  does not), the git commit and branch of the code that trained, and whether its checkout had uncommitted changes.
- `git_state`: those changes as a patch (logged as the run's `git/uncommitted.patch`).
- `dataset_input`: a split as an MLflow dataset input (name, fingerprint of its files, source, profile).
- `RunSummary`: device and precision tags at the start; `best/epoch` and `summary/*` numbers at the end.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, RunTag
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_only

from pipeline.metrics.monitor import monitor_mode
from pipeline.tracking import store

# Folder names that say nothing about which dataset it is; the dataset is named by the folder above them.
_GENERIC = {"images", "imgs", "jpegimages", "train", "val", "valid", "test", "train2017", "val2017"}


@dataclass(frozen=True)
class GitState:
    """The checkout that holds the code: commit, branch, origin URL ("" if none), changes against HEAD."""

    commit: str
    branch: str
    remote: str
    dirty: bool
    patch: str  # `git diff HEAD` plus the untracked (not ignored) files' names


def _git(root: Path, *args: str) -> str:
    """The stripped output of one git command in `root` ("" when git fails)."""
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_state(root: str | Path) -> GitState | None:
    """The git state of the checkout containing `root`, None outside a checkout (an installed package)."""
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None
    changes = _git(root, "status", "--porcelain")
    untracked = _git(root, "ls-files", "--others", "--exclude-standard")
    patch = _git(root, "diff", "HEAD")
    if untracked:
        patch += "\n\n# untracked files (not in the diff):\n" + "\n".join(f"#   {f}" for f in untracked.splitlines())
    return GitState(
        commit=commit,
        branch=_git(root, "rev-parse", "--abbrev-ref", "HEAD"),
        remote=_git(root, "config", "--get", "remote.origin.url"),
        dirty=bool(changes),
        patch=patch.strip() + "\n" if changes else "",
    )


def _user() -> str:
    """The login name MLflow itself would record (getpass), "unknown" where there is none (some containers)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def source_tags(entry: str, state: GitState | None) -> dict[str, str]:
    """`mlflow.user`, `mlflow.source.*` and `pipeline.git.dirty` ("true", "false", "unknown" outside git)."""
    tags = {
        "mlflow.user": _user(),
        "mlflow.source.name": entry,
        "mlflow.source.type": "JOB" if "SLURM_JOB_ID" in os.environ else "LOCAL",
        "pipeline.git.dirty": "unknown" if state is None else str(state.dirty).lower(),
    }
    if state is not None:
        tags |= {"mlflow.source.git.commit": state.commit, "mlflow.source.git.branch": state.branch}
        if state.remote:
            tags["mlflow.source.git.repoURL"] = state.remote
    return tags


def dataset_name(images_dirs: list[Path]) -> str:
    """The dataset's folder: the common folder of the splits' image folders, above generic names like `images`."""
    folder = Path(os.path.commonpath([str(p.resolve()) for p in images_dirs]))
    while folder.name.lower() in _GENERIC and folder.parent != folder:
        folder = folder.parent
    return folder.name or str(folder)


def dataset_input(source: Any, name: str, split: str) -> DatasetInput:
    """One split (a CocoSource or MaskFolderSource) as an MLflow dataset input, tagged with its split.

    The digest covers each file's name, size and mtime, the annotation file's size and mtime (or, for data
    converted in memory, the checked records' summary): adding, removing or rewriting a file changes it; moving
    the dataset does not. The profile is the data check's summary (images, instances per class, box sizes).
    """
    digest = hashlib.sha256()
    for path in source.files():
        stat = os.stat(path)
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    annotations = getattr(source, "annotations", None)
    summary = source.report.summary()
    if annotations is not None:
        stat = os.stat(annotations)
        digest.update(f"annotations\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps(summary, sort_keys=True, default=str).encode())
    where = {"images": str(source.images_dir.resolve())}
    if getattr(source, "masks_dir", None) is not None:
        where["masks"] = str(source.masks_dir.resolve())
    if annotations is not None:
        where["annotations"] = str(Path(annotations).resolve())
    elif "masks" not in where:  # VOC or YOLO labels converted to COCO records in memory
        where["annotations"] = "converted in memory"
    dataset = Dataset(name=name, digest=digest.hexdigest()[:16], source_type="local", source=json.dumps(where),
                      profile=json.dumps(summary, default=str))  # fmt: skip
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", split)])


class RunSummary(Callback):
    """Run-level numbers for the runs table, kept across resumes (the callback's state is in every checkpoint).

    At fit start: `summary/params` and the tags `pipeline.device`, `pipeline.accelerator`, `pipeline.precision`,
    `pipeline.world_size`. At fit end: `best/epoch` (the epoch of the best `monitor` value, best.ckpt's),
    `summary/final_train_loss` (the last epoch's mean), `summary/train_time_s` (training batches and their data
    loading, validation excluded), `summary/images_per_s` (training images of all ranks over that time) and
    `summary/wall_time_s` (every fit of the run, validation and start of the fit included).
    """

    def __init__(self, run_id: str | None, tracking_uri: str, monitor: str) -> None:
        self.run_id, self.tracking_uri, self.monitor = run_id, tracking_uri, monitor
        self.better = (lambda a, b: a < b) if monitor_mode(monitor) == "min" else (lambda a, b: a > b)
        self.state = {"train_time_s": 0.0, "wall_time_s": 0.0, "images": 0, "best": None, "best_epoch": None}
        self._tic = self._fit_tic = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The totals so far, this fit's wall time up to now included (a checkpoint is saved before fit end)."""
        running = time.perf_counter() - self._fit_tic if self._fit_tic else 0.0
        return {**self.state, "wall_time_s": self.state["wall_time_s"] + running}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the totals of the checkpoint's run."""
        self.state.update(state_dict)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_tic = time.perf_counter()
        if not trainer.is_global_zero or self.run_id is None:
            return
        device = trainer.strategy.root_device
        tags = {
            "pipeline.device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "pipeline.accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
            "pipeline.precision": str(trainer.precision),
            "pipeline.world_size": str(trainer.world_size),
        }
        params = sum(p.numel() for p in pl_module.parameters())
        store.client(self.tracking_uri).log_batch(
            self.run_id,
            metrics=[Metric("summary/params", float(params), int(time.time() * 1000), 0)],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tic = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        now = time.perf_counter()
        self.state["train_time_s"] += now - self._tic
        self.state["images"] += len(batch["image"]) * trainer.world_size  # every rank trains a batch this size
        self._tic = now

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._tic = time.perf_counter()  # validation inside an epoch is not training time
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or not math.isfinite(float(value)):
            return
        if self.state["best"] is None or self.better(float(value), self.state["best"]):
            self.state["best"], self.state["best_epoch"] = float(value), trainer.current_epoch

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state["wall_time_s"] += time.perf_counter() - self._fit_tic
        self._fit_tic = 0.0
        if self.run_id is None:
            return
        values = {"summary/train_time_s": self.state["train_time_s"], "summary/wall_time_s": self.state["wall_time_s"]}
        if self.state["train_time_s"] > 0:
            values["summary/images_per_s"] = self.state["images"] / self.state["train_time_s"]
        if self.state["best_epoch"] is not None:
            values["best/epoch"] = float(self.state["best_epoch"])
        loss = trainer.callback_metrics.get("train/loss_epoch")
        if loss is not None:
            values["summary/final_train_loss"] = float(loss)
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, trainer.global_step) for k, v in values.items()]
        store.client(self.tracking_uri).log_batch(self.run_id, metrics=metrics)
