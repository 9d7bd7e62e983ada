"""MLflow run identity: create, continue or fork a run; params, tags, config artifacts, images.

Every function here runs on global rank zero only (the caller checks), so one training is one MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.utilities.logger import _add_prefix
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.loggers.utilities import _scan_checkpoints
from pytorch_lightning.utilities import rank_zero_only

from pipeline.errors import ConfigError
from pipeline.metrics.monitor import monitor_mode
from pipeline.tracking import store
from pipeline.tracking.summary import GitState, dataset_input, dataset_name, git_state, source_tags
from pipeline.tracking.uploads import UploadQueue, describe
from pipeline.training.config import changed_keys, flat_keys

TAG_PREFIX = "pipeline."
ENTRY = "pipeline-train"  # mlflow.source.name of training runs
# The system-metrics monitor announces its start, stop and a missing GPU at INFO, which Hydra prints every run.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
CODE_ROOT = Path(__file__).resolve().parent  # the checkout whose git state the runs record


def experiment_id(client: MlflowClient, name: str, log_dir: str | Path | None = None) -> str:
    """The id of experiment `name`, created (and tagged as a model-training experiment) if missing.

    With a local database store its artifacts go to `<log_dir>/mlartifacts`, next to the database, instead of
    MLflow's default `./mlruns` under whatever directory the command happened to run in.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":  # its name stays taken until `mlflow gc`
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    local = client.tracking_uri.startswith("sqlite:") and log_dir is not None
    location = (Path(log_dir).resolve() / "mlartifacts").as_uri() if local else None
    new_id = client.create_experiment(name, artifact_location=location)
    # MLflow 3's UI otherwise opens the experiment on its GenAI overview instead of the runs table.
    client.set_experiment_tag(new_id, "mlflow.experimentKind", "custom_model_development")
    return new_id


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as {"a.b.c": "value"} strings, shortened to what the store accepts (full config: artifact)."""
    limit = MAX_PARAM_VAL_LENGTH
    return {k: v if len(v) <= limit else v[: limit - 3] + "..." for k, v in flat_keys(node, prefix).items()}


def joined(overrides: list[str]) -> str:
    """Overrides as one tag value, shortened to what the store accepts."""
    return " ".join(overrides)[:MAX_PARAM_VAL_LENGTH] or "(none)"


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log string params in batches of 100 (MLflow's limit)."""
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


def model_name(cfg: DictConfig) -> str:
    """A short name of the configured net, e.g. "FCN-8s-vgg_tiny", for run names and tags."""
    net = cfg.model.get("net", {})
    parts = (
        str(net.get("_target_", "model")).rsplit(".", 1)[-1],
        net.get("variant"),
        net.get("backbone", {}).get("name"),
    )
    return "-".join(str(p) for p in parts if p)


def config_choices() -> dict[str, str]:
    """The config-group options this run was composed of ({"data": "coco", "model": "yolo", …}), {} outside Hydra."""
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {g: str(choices[g]) for g in ("experiment", "data", "model", "trainer") if choices.get(g) is not None}


def run_tags(cfg: DictConfig, overrides: list[str], git: GitState | None = None) -> dict[str, str]:
    """Tags that make runs comparable: user, source and git state, task, model, data, Hydra overrides."""
    return {
        **source_tags(ENTRY, git),
        f"{TAG_PREFIX}task": str(cfg.model._target_).rsplit(".", 1)[-1],
        f"{TAG_PREFIX}model": model_name(cfg),
        **{f"{TAG_PREFIX}{group}": option for group, option in config_choices().items() if group != "model"},
        f"{TAG_PREFIX}overrides": joined(overrides),
        f"{TAG_PREFIX}run_dir": str(cfg.paths.output_dir),
        **{f"{TAG_PREFIX}tag.{t}": "1" for t in cfg.get("tags", [])},
    }


def start_run(
    cfg: DictConfig, overrides: list[str], run_name: str, parent: dict | None = None, extra: dict | None = None
) -> str:
    """Create a run with the flattened config as params and config.yaml/overrides.yaml as artifacts.

    `parent` (fork): {"run_id": ..., "config": ...} of the checkpoint's run; the new run is tagged with it
    and with the config keys that differ. `extra` tags are added last (a sweep job's parent run wins).
    """
    client = store.client(cfg.logger.tracking_uri)
    exp_id = experiment_id(client, cfg.logger.experiment_name, cfg.paths.log_dir)
    git = git_state(CODE_ROOT)
    tags = run_tags(cfg, overrides, git) | {"mlflow.runName": run_name}
    config = OmegaConf.to_container(cfg, resolve=True)
    if parent is not None:
        changed = changed_keys(flatten(parent["config"]), flatten(config))
        tags |= {"mlflow.parentRunId": parent["run_id"] or "", f"{TAG_PREFIX}forked_from": parent["run_id"] or ""}
        tags[f"{TAG_PREFIX}fork_changed_keys"] = ", ".join(sorted(changed))[:MAX_PARAM_VAL_LENGTH] or "(none)"
    run = client.create_run(exp_id, tags=tags | (extra or {}), run_name=run_name)
    log_params(client, run.info.run_id, flatten(config))
    client.log_text(run.info.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    client.log_text(run.info.run_id, "\n".join(overrides) + "\n", "overrides.yaml")
    if git is not None and git.dirty:  # what the commit alone does not say about the code that trained
        client.log_text(run.info.run_id, git.patch, "git/uncommitted.patch")
    return run.info.run_id


def continue_run(cfg: DictConfig, overrides: list[str], run_id: str, original_uri: str | None = None) -> None:
    """Re-open `run_id` for a resumed training; record changed settings instead of re-logging params.

    MLflow refuses to change a logged param, so new keys are logged as params and changed ones are recorded
    in a `pipeline.resume.<n>.changed` tag (JSON {key: [old, new]}) next to that resume's config artifact.
    """
    client = store.client(cfg.logger.tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"The checkpoint's MLflow run {run_id} is not in {cfg.logger.tracking_uri} (it was logged to "
            f"{original_uri}). Run from the same directory, set MLFLOW_TRACKING_URI={original_uri}, or pass "
            "resume_mode=fork to start a new run from the checkpoint."
        ) from None
    config = OmegaConf.to_container(cfg, resolve=True)
    new = flatten(config)
    old = run.data.params
    n = int(run.data.tags.get(f"{TAG_PREFIX}resume_count", "0")) + 1
    log_params(client, run_id, {k: v for k, v in new.items() if k not in old})
    changed = {k: v for k, v in changed_keys(old, new).items() if k in old}
    tags = {
        f"{TAG_PREFIX}resume_count": str(n),
        f"{TAG_PREFIX}resume.{n}.overrides": joined(overrides),
        f"{TAG_PREFIX}resume.{n}.changed": json.dumps(changed)[:MAX_PARAM_VAL_LENGTH],
    }
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.update_run(run_id, status="RUNNING")
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), f"resume-{n}/config.yaml")


def log_image(logger: Any, image: np.ndarray, artifact_file: str) -> None:
    """Log a uint8 [H, W, 3] picture as an image artifact when the logger is an MLflow one (rank zero only).

    Our `MLflowLogger` queues it (the upload runs in the background); Lightning's own uploads it at once.
    """
    if isinstance(logger, MLflowLogger):
        logger.log_image(image, artifact_file)
    elif isinstance(logger, MLFlowLogger) and logger.run_id is not None:
        logger.experiment.log_image(logger.run_id, image, artifact_file=artifact_file)


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger whose metrics, checkpoints and images reach MLflow from a background thread.

    Training never waits on the tracking store: `log_metrics`, each saved checkpoint (`log_model: all`) and
    `log_image` are queued (`pipeline.tracking.uploads.UploadQueue`) and sent in order, retried while the store is away.
    A checkpoint is copied into `upload_dir` before it is queued, since the next save of `last.ckpt` may replace
    the file while its upload runs; a newer copy of the same checkpoint replaces a waiting one, so an outage
    keeps at most two copies per checkpoint name there (the one being sent and the newest). In the store each
    checkpoint is the folder `<name>/` (`last/last.ckpt`, `best/best.ckpt`, with Lightning's `metadata.yaml`
    and `aliases.txt`), replaced in place. `finalize` uploads any checkpoint rewritten since its last upload,
    waits up to `drain_timeout` seconds for the queue, then marks the run finished. `system_metrics_s`: seconds
    between MLflow system-metric samples of the run (null: none).
    """

    def __init__(
        self, *, upload_dir: str, drain_timeout: float = 300.0, system_metrics_s: float | None = 10.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.drain_timeout = drain_timeout
        self.uploads = UploadQueue(self._tracking_uri, upload_dir)
        self._checkpoint_callbacks: dict[str, Any] = {}
        # MLflow's system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU with pynvml),
        # which Lightning's logger never starts (Lightning #20563); the rank that owns the run samples them.
        self.system_metrics: SystemMetricsMonitor | None = None
        if system_metrics_s and kwargs.get("run_id") is not None and rank_zero_only.rank == 0:
            self.system_metrics = SystemMetricsMonitor(
                kwargs["run_id"],
                sampling_interval=system_metrics_s,
                resume_logging=True,
                tracking_uri=self._tracking_uri,
            )
            self.system_metrics.start()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue metric values with their step and the time they were logged (names cleaned as Lightning does)."""
        now = int(time.time() * 1000)
        values = [
            Metric(re.sub(r"[^a-zA-Z0-9_/. -]+", "", k), float(v), now, step or 0)
            for k, v in _add_prefix(dict(metrics), self._prefix, self.LOGGER_JOIN_CHAR).items()
            if not isinstance(v, str)
        ]
        self.uploads.put_metrics(self.run_id, values)

    @rank_zero_only
    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Queue a uint8 [H, W, 3] picture as the artifact `artifact_file` (e.g. `val_images/epoch_003.png`)."""
        from PIL import Image

        path = PurePosixPath(artifact_file)
        folder = self.uploads.staging_folder()
        Image.fromarray(image).save(folder / path.name)
        self.uploads.put_folder(self.run_id, folder, None if str(path.parent) == "." else str(path.parent))

    @rank_zero_only
    def flush_metrics(self, timeout: float = 10.0) -> None:
        """Wait (bounded, not during an outage) until the metrics logged so far are in the store: called before a
        checkpoint is written, so a run killed after it does not lose metrics of steps it will not train again."""
        self.uploads.wait_for_metrics(timeout)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        """Remember the callback (for `finalize`) and queue its new checkpoints as Lightning would upload them."""
        self._checkpoint_callbacks[checkpoint_callback.state_key] = checkpoint_callback
        if self._log_model == "all" or (self._log_model is True and checkpoint_callback.save_top_k == -1):
            self._scan_and_log_checkpoints(checkpoint_callback)

    def _scan_and_log_checkpoints(self, checkpoint_callback: ModelCheckpoint) -> None:
        """Copy each checkpoint saved since its last upload into a staging folder and queue it as `<name>/`."""
        for mtime, path, score, _ in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            folder = self.uploads.staging_folder()
            shutil.copyfile(path, folder / Path(path).name)
            best = path == checkpoint_callback.best_model_path
            keys = ("monitor", "mode", "save_last", "save_top_k", "save_weights_only", "_every_n_train_steps",
                    "_every_n_val_epochs")  # fmt: skip
            metadata = {
                "score": score.item() if isinstance(score, torch.Tensor) else score,
                "original_filename": Path(path).name,
                "Checkpoint": {k: getattr(checkpoint_callback, k) for k in keys if hasattr(checkpoint_callback, k)},
            }
            (folder / "metadata.yaml").write_text(yaml.dump(metadata, default_flow_style=False))
            (folder / "aliases.txt").write_text(str(["latest", "best"] if best else ["latest"]))
            self.uploads.put_folder(self._run_id, folder, Path(path).stem, replaceable=True)
            self._logged_model_time[path] = mtime

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Queue checkpoints rewritten since their upload, wait for the queue, then end the run with `status`."""
        if self.system_metrics is not None:  # its last samples go out with the run's other writes
            self.system_metrics.finish()
            self.system_metrics = None
        if not self._initialized:
            return
        if self._log_model:
            for callback in self._checkpoint_callbacks.values():
                self._scan_and_log_checkpoints(callback)
        self._checkpoint_callback = None  # Lightning's finalize would scan it again
        left = self.uploads.drain(self.drain_timeout)
        if left:
            print(f"MLflow did not take every write within {self.drain_timeout:g} s (logger.drain_timeout); not in "
                  f"run {self._run_id}: {describe(left)} (checkpoints stay in their run directory, unsent files in "
                  f"{self.uploads.staging_dir})", file=sys.stderr, flush=True)  # fmt: skip
            reason = store.unreachable(self._tracking_uri)
            if reason is not None:
                print(f"MLflow store {self._tracking_uri} is not reachable ({reason}): run {self._run_id} stays "
                      f"RUNNING.", file=sys.stderr, flush=True)  # fmt: skip
                return
        super().finalize(status)


def ui_hint(tracking_uri: str, run_id: str, monitor: str | None = None) -> str:
    """How to look at a run: the `mlflow ui` command for a local store and the direct link to the runs table.

    With `monitor`, the runs-table link sorts by `best/<monitor>`, best first: the table's columns are the
    browser's choice (MLflow keeps them in local storage), its sort order can come in the URL.
    """
    client = store.client(tracking_uri)
    exp = client.get_run(run_id).info.experiment_id
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        start = ""
    else:
        base = "http://127.0.0.1:5000"
        start = f"mlflow ui --backend-store-uri {tracking_uri}\n  then open "
    runs = f"{base}/#/experiments/{exp}/runs"
    if monitor is not None:
        ascending = str(monitor_mode(monitor) == "min").lower()
        runs += f"?orderByKey={quote(f'metrics.`best/{monitor}`', safe='.')}&orderByAsc={ascending}"
    return f"{start}{base}/#/experiments/{exp}/runs/{run_id}  (all runs: {runs})"


def write_json(path: str | Path, data: dict | list) -> None:
    """Write JSON atomically (temp file + rename), so a kill never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=2)
    os.replace(f.name, path)


class DatasetStats(Callback):
    """At fit start, log each split as a dataset input of the MLflow run (`run_summary.dataset_input`), the data
    check's summary (`data/summary.json`: images, instances per class, box sizes, repairs per split) and a box-size
    scatter plot (`data/box_sizes.png`)."""

    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from pipeline.viz import box_size_scatter

        logger, data = trainer.logger, trainer.datamodule
        if not isinstance(logger, MLFlowLogger) or logger.run_id is None or data is None:
            return
        sources = {split: getattr(data, f"{split}_set").source for split in ("train", "val")}
        reports = {split: source.report for split, source in sources.items()}
        logger.experiment.log_dict(logger.run_id, {k: r.summary() for k, r in reports.items()}, "data/summary.json")
        name = dataset_name([s.images_dir for s in sources.values()])
        inputs = [dataset_input(source, name, split) for split, source in sources.items()]
        logger.experiment.log_inputs(logger.run_id, datasets=inputs)
        sizes = {k: np.asarray(r.box_sizes, dtype=np.float32).reshape(-1, 2) for k, r in reports.items()}
        log_image(logger, box_size_scatter(sizes), "data/box_sizes.png")
