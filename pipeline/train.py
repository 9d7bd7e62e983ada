"""`pipeline-train`: compose the config, validate it, train with Lightning, track in MLflow, resume on request."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from pipeline import tracking
from pipeline.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    RunMetadata,
    argv_for_resume,
    read_metadata,
    resolve_checkpoint,
)
from pipeline.cli import CONF_DIR, exit_on_user_error
from pipeline.config import TRAIN_KEYS, ConfigError, validate_config

# Set by main(): the command line as the user typed it, which DDP child processes must re-run.
_USER_ARGV: list[str] = []


def train(cfg: DictConfig) -> dict[str, float]:
    """Train `cfg.model` on `cfg.data`; returns the final callback metrics (val/mIoU or val/map, …)."""
    validate_config(cfg, TRAIN_KEYS)
    if cfg.resume_mode not in ("continue", "fork"):
        raise ConfigError(f"resume_mode={cfg.resume_mode!r}: choose 'continue' or 'fork'.")
    resume = resolve_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    meta = read_metadata(resume) if resume else None
    pl.seed_everything(cfg.seed, workers=True)

    task = instantiate(cfg.model)
    datamodule = instantiate(cfg.data, targets=task.TARGETS)  # the task says what a sample must carry
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    run_dir = str(cfg.paths.output_dir)

    run_id = None
    if rank_zero_only.rank == 0:
        tracking.check_reachable(cfg.logger.tracking_uri)
        if meta is not None and cfg.resume_mode == "continue" and meta.get("mlflow_run_id"):
            run_id = meta["mlflow_run_id"]
            tracking.continue_run(cfg, overrides, run_id, meta.get("tracking_uri"))
        else:
            parent = {"run_id": meta["mlflow_run_id"], "config": meta["config"]} if meta else None
            # runs/<time> -> "<model>-<time>"; multiruns/<time>/<job> -> "<model>-<time>-<job>"
            stamp = "-".join(p for p in Path(run_dir).parts[-2:] if p != "runs")
            run_id = tracking.start_run(cfg, overrides, run_name=f"{tracking.model_name(cfg)}-{stamp}", parent=parent)

    logger = instantiate(cfg.logger, run_id=run_id)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    callbacks.append(RunMetadata(OmegaConf.to_container(cfg, resolve=True), run_id, run_dir, cfg.logger.tracking_uri))
    callbacks.append(tracking.DatasetStats())
    plugins = list(instantiate(cfg.trainer.get("plugins")) or [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):  # a user's own checkpoint IO wins
        plugins.append(AtomicCheckpointIO())
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, plugins=plugins)

    if resume is not None:
        checkpoint = torch.load(resume, map_location="cpu", weights_only=True)
        # Task state that fitting starts from before Lightning restores the rest (the detector's anchors).
        task.on_load_checkpoint(checkpoint)
        if cfg.resume_mode == "fork":
            # A fork starts from the weights only, so its own optimizer, schedule and epochs apply (restoring the
            # optimizer state would silently bring back the parent's learning rate).
            task.load_state_dict(checkpoint["state_dict"])
            resume = None
    with _argv(_USER_ARGV):  # DDP children re-run the user's command; Lightning adds the run dir itself
        trainer.fit(task, datamodule=datamodule, ckpt_path=resume)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        _report(cfg, trainer, metrics, run_id)
    return metrics


def _report(cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float], run_id: str | None) -> None:
    """Print where the results are: metrics, checkpoints, the run directory, the MLflow UI link."""
    lines = ["", "Training finished."]
    lines += [f"  {k:<28} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/")]
    for ckpt in trainer.checkpoint_callbacks:
        lines.append(f"  checkpoint:      {ckpt.best_model_path or '(none)'}")
    lines.append(f"  run directory:   {cfg.paths.output_dir}")
    if run_id:
        lines.append(f"  MLflow run {run_id}: {tracking.ui_hint(cfg.logger.tracking_uri, run_id)}")
    print("\n".join(lines))


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    """`sys.argv = argv` while the block runs (unchanged when argv is empty), restored after."""
    saved = sys.argv
    sys.argv = list(argv) if argv else saved
    try:
        yield
    finally:
        sys.argv = saved


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = exit_on_user_error(train, cfg)
    return metrics.get(cfg.model.monitor)  # the value Hydra sweepers optimise


def main() -> None:
    """Console entry point `pipeline-train`."""
    global _USER_ARGV
    _USER_ARGV = list(sys.argv)
    try:
        hydra_argv = argv_for_resume(sys.argv)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    try:
        with _argv(hydra_argv):  # Hydra reads its overrides from sys.argv
            _hydra_main()
    finally:
        _USER_ARGV = []


if __name__ == "__main__":
    main()
