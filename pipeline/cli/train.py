"""`pipeline-train`: compose the config, validate it, train with Lightning, track in MLflow, resume on request."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pipeline.cli import CONF_DIR
from pipeline.cli.common import exit_on_user_error, user_error
from pipeline.data.datamodule import usable_cores
from pipeline.errors import ConfigError
from pipeline.models.surgery import load_matching
from pipeline.sweeps import jobs as sweep
from pipeline.tracking import registry, runs, store
from pipeline.tracking.summary import RunSummary
from pipeline.training import launch
from pipeline.training.callbacks import PREEMPTED_EXIT, NonFiniteLossError
from pipeline.training.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    RunMetadata,
    argv_for_resume,
    check_resumable,
    load_checkpoint,
    resolve_checkpoint,
)
from pipeline.training.config import TRAIN_KEYS, validate_config

# Set by main(): the command line as the user typed it, which DDP child processes must re-run.
_USER_ARGV: list[str] = []


# Set in this process by Lightning (DDP launch, seeding, its MLflow logger): a later training in the same process
# (the next sweep job) would take LOCAL_RANK & co. to mean that a launcher started its ranks, and wait for peers
# that never come, or log to the previous job's store.
_LIGHTNING_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED",
                  "PL_SEED_WORKERS", "MLFLOW_TRACKING_URI")  # fmt: skip


def train(cfg: DictConfig) -> dict[str, float]:
    """Train; return the final callback metrics and `best/<monitor>` (the best epoch's value, best.ckpt's).

    The caller's process is left as it was: environment, CPU random generators (seeded here), warning filters.
    """
    saved = {key: os.environ.get(key) for key in _LIGHTNING_ENV}
    had_group = torch.distributed.is_initialized()  # torchrun/srun: created by main(), or by the caller
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        with warnings.catch_warnings():
            return _train(cfg)
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if torch.distributed.is_initialized() and not had_group:  # Lightning's own: the next job makes its own
            torch.distributed.destroy_process_group()


def _train(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg, TRAIN_KEYS)
    if cfg.resume_mode not in ("continue", "fork"):
        raise ConfigError(f"resume_mode={cfg.resume_mode!r}: choose 'continue' or 'fork'.")
    resume = resolve_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    checkpoint = load_checkpoint(resume) if resume else None  # readable and ours
    if checkpoint is not None and cfg.resume_mode == "fork":
        _fork_anchors(cfg, checkpoint)
    pl.seed_everything(cfg.seed, workers=True)

    job = sweep.current_job()
    jobs = sweep.parallel_jobs()
    task = instantiate(cfg.model)
    # Fitting this model, and (continuing) the run's latest state: before any MLflow run is touched.
    if checkpoint is not None:
        check_resumable(resume, checkpoint, task, cfg)
    meta = checkpoint["pipeline"] if checkpoint else None
    # The task says what a sample must carry; parallel sweep jobs share the cores among their loader workers.
    datamodule = instantiate(cfg.data, targets=task.TARGETS, parallel_jobs=jobs)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    run_dir = str(cfg.paths.output_dir)

    run_id = None
    if launch.is_global_zero():  # one MLflow run per training, however many ranks or nodes
        store.check_reachable(cfg.logger.tracking_uri)
        if job is None:  # a SLURM requeue of this job continues this run dir (sweep jobs have their own)
            launch.record_slurm_run(cfg.paths.log_dir, run_dir, _USER_ARGV)
        if meta is not None and cfg.resume_mode == "continue" and meta.get("mlflow_run_id"):
            run_id = meta["mlflow_run_id"]
            runs.continue_run(cfg, overrides, run_id, meta.get("tracking_uri"))
        else:
            parent = {"run_id": meta["mlflow_run_id"], "config": meta["config"]} if meta else None
            # A sweep job is named by what its sweep varies; a single run by its model, data and overrides.
            name = job["name"] if job else sweep.run_name(runs.model_name(cfg), overrides, run_dir)
            tags = sweep.child_tags(job) if job else {}
            run_id = runs.start_run(cfg, overrides, run_name=name, parent=parent, extra=tags)

    if torch.distributed.is_initialized():  # torchrun/srun ranks: the store exists (migrated) before they open it
        torch.distributed.barrier()
    logger = instantiate(cfg.logger, run_id=run_id)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    callbacks.append(RunMetadata(OmegaConf.to_container(cfg, resolve=True), run_id, run_dir, cfg.logger.tracking_uri))
    callbacks.append(runs.DatasetStats())
    callbacks.append(RunSummary(run_id, cfg.logger.tracking_uri, cfg.model.monitor))
    pruning = sweep.pruning_callback(cfg.model.monitor)  # an Optuna sweep with a pruner
    if pruning is not None:
        callbacks.append(pruning)
    plugins = list(instantiate(cfg.trainer.get("plugins")) or [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):  # a user's own checkpoint IO wins
        plugins.append(AtomicCheckpointIO())
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, plugins=plugins)

    if checkpoint is not None and cfg.resume_mode == "fork":
        # A fork starts from the weights only, so its own optimizer, schedule and epochs apply (restoring the
        # optimizer state would silently bring back the parent's learning rate); what does not fit stays fresh.
        loaded, fresh = load_matching(task, checkpoint["state_dict"])
        if trainer.is_global_zero:
            _report_fork(resume, loaded, fresh, run_id, cfg.logger.tracking_uri)
        resume = None
    elif checkpoint is not None:
        # Task state that fitting starts from before Lightning restores the rest (the detector's anchors).
        task.on_load_checkpoint(checkpoint)
    del checkpoint  # Lightning reads the file itself when it restores the rest
    try:
        with _ddp_children_rerun(job, cfg.ckpt_path), _torch_threads(jobs):
            trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:  # pre-empted: LastCheckpoint wrote last.ckpt at the batch boundary
        _stopped(cfg, trainer, run_id, "KILLED", f"SIGTERM at step {trainer.global_step}")
        if torch.distributed.is_initialized():  # every rank exits once the run is marked
            torch.distributed.barrier()
        if trainer.is_global_zero:
            print(f"Stopped by SIGTERM at step {trainer.global_step}; resume with ckpt_path={run_dir}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except NonFiniteLossError as err:
        _stopped(cfg, trainer, run_id, "FAILED", str(err))
        raise

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = next((c.best_model_score for c in trainer.checkpoint_callbacks if c.monitor == cfg.model.monitor), None)
    if best is not None and math.isfinite(best):  # what best.ckpt holds, and what a sweep optimises
        metrics[f"best/{cfg.model.monitor}"] = float(best)
        if trainer.is_global_zero and run_id is not None:
            store.client(cfg.logger.tracking_uri).log_metric(run_id, f"best/{cfg.model.monitor}", float(best))
    if trainer.is_global_zero and cfg.register and run_id is not None:
        _register(cfg, trainer, run_id)
    if trainer.is_global_zero:
        if pruning is not None and pruning.pruned_at_epoch is not None and run_id is not None:
            store.client(cfg.logger.tracking_uri).set_tag(run_id, "pipeline.sweep.pruned_at_epoch",
                                                          str(pruning.pruned_at_epoch))  # fmt: skip
        _report(cfg, trainer, metrics, run_id)
    return metrics


def _register(cfg: DictConfig, trainer: pl.Trainer, run_id: str) -> None:
    """`register=<name>`: the run's best checkpoint becomes the next version of registered model <name>."""
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor == cfg.model.monitor), "")
    if not best:
        print(f"register={cfg.register}: no best checkpoint was saved ({cfg.model.monitor} never logged), "
              "nothing registered", file=sys.stderr)  # fmt: skip
        return
    version = registry.register_checkpoint(cfg.logger.tracking_uri, run_id, Path(best), str(cfg.register))
    print(f"Registered {best} as models:/{cfg.register}/{version}")


def _fork_anchors(cfg: DictConfig, checkpoint: dict) -> None:
    """A fork of an anchor-based model keeps the checkpoint's anchors unless the command gives its own
    (`model.anchors=[[w, h], …]`) or asks for new ones (`model.anchors=kmeans`: k-means on this run's data)."""
    hparams = checkpoint.get("hyper_parameters", {})
    theirs = hparams.get("anchors")
    if "anchors" in cfg.model and cfg.model.anchors is None and theirs is not None:
        scale = float(cfg.model.input_size) / float(hparams.get("input_size", cfg.model.input_size))
        with open_dict(cfg):  # pixels at the checkpoint's input size -> at this run's
            cfg.model.anchors = [[round(w * scale, 1), round(h * scale, 1)] for w, h in theirs]


def _report_fork(path: Path, loaded: list[str], fresh: dict[str, str], run_id: str | None, uri: str) -> None:
    """Print (and tag the run with) how much of the checkpoint a fork took and which tensors start fresh."""
    total = len(loaded) + len(fresh)
    text = f"{len(loaded)} of {total} tensors from {path}"
    if fresh:
        shown = "; ".join(f"{k} ({why})" for k, why in list(fresh.items())[:8])
        text += f"; left fresh: {shown}" + (f"; and {len(fresh) - 8} more" if len(fresh) > 8 else "")
    print(f"Fork: {text}")
    if run_id is not None:
        store.client(uri).set_tag(run_id, f"{runs.TAG_PREFIX}fork_loaded", text[:MAX_TAG_VAL_LENGTH])


def _stopped(cfg: DictConfig, trainer: pl.Trainer, run_id: str | None, status: str, reason: str) -> None:
    """Give the run its end status (Lightning marked it FAILED) and the reason as the `pipeline.error` tag."""
    if trainer.is_global_zero and run_id is not None:
        try:  # best effort: a pre-empted run must still exit in time when the store is away
            client = store.client(cfg.logger.tracking_uri)
            client.set_tag(run_id, f"{runs.TAG_PREFIX}error", reason[:MAX_TAG_VAL_LENGTH])
            client.set_terminated(run_id, status)
        except Exception as err:
            print(f"Could not mark MLflow run {run_id} {status} ({reason}): {err}", file=sys.stderr)


def _report(cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float], run_id: str | None) -> None:
    """Print where the results are: metrics, checkpoints, the run directory, the MLflow UI link."""
    lines = ["", "Training finished."]
    lines += [f"  {k:<28} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/")]
    for ckpt in trainer.checkpoint_callbacks:
        lines.append(f"  checkpoint:      {ckpt.best_model_path or '(none)'}")
    lines.append(f"  run directory:   {cfg.paths.output_dir}")
    if run_id:
        lines.append(f"  MLflow run {run_id}: {runs.ui_hint(cfg.logger.tracking_uri, run_id, cfg.model.monitor)}")
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


@contextmanager
def _ddp_children_rerun(job: dict | None, ckpt_path: str | None) -> Iterator[None]:
    """Make Lightning-spawned DDP children re-run this one job, restored after.

    Lightning starts each child as `python -m <__main__'s module> <sys.argv[1:]> hydra.run.dir=<HydraConfig
    run.dir>`. For a single run that is the user's command (not main()'s resume rewrite). For a sweep job it would
    be the whole sweep again (`-m`) in a fresh timestamped dir, or submitit's job runner: the children get
    `python -m pipeline.cli.train` with this job's own overrides (and checkpoint, when it continues) in RUN mode, in
    its own output dir.
    """
    if job is None:
        with _argv(_USER_ARGV):
            yield
        return
    hydra, main = HydraConfig.get(), sys.modules["__main__"]
    saved_dir, saved_spec = hydra.run.dir, getattr(main, "__spec__", None)
    with read_write(hydra), open_dict(hydra):
        hydra.run.dir = hydra.runtime.output_dir
    main.__spec__ = importlib.util.find_spec("pipeline.cli.train")
    resume = [f"ckpt_path={ckpt_path}"] if ckpt_path else []
    try:
        with _argv([sys.argv[0], *job["overrides"], *resume, "hydra.mode=RUN"]):
            yield
    finally:
        main.__spec__ = saved_spec
        with read_write(hydra), open_dict(hydra):
            hydra.run.dir = saved_dir


@contextmanager
def _torch_threads(jobs: int) -> Iterator[None]:
    """With `jobs` parallel sweep jobs on this machine, each gets its share of intra-op threads, restored after."""
    saved = torch.get_num_threads()
    if jobs > 1:
        torch.set_num_threads(max(1, usable_cores() // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Train; return the best epoch's monitored value (what sweepers optimise), None for a failed sweep job."""
    job = sweep.current_job()
    if job is None:
        metrics = exit_on_user_error(train, cfg)
    else:  # a failing job must not end the sweep: its child run is marked FAILED with the reason
        try:
            previous = sweep.previous_run(job)  # the same sweep dir run again: skip or continue this job
            if previous is not None and previous.info.status == "FINISHED":
                print(f"Sweep job {job['job']} ({job['name']}) finished before: skipped")
                return previous.data.metrics.get(f"best/{cfg.model.monitor}")
            last = Path(HydraConfig.get().runtime.output_dir) / "checkpoints" / "last.ckpt"
            if previous is not None and last.is_file() and not cfg.ckpt_path:
                with open_dict(cfg):
                    cfg.ckpt_path = str(last)  # into its own run, from where it stopped
            metrics = train(cfg)
        except Exception as err:
            cause = user_error(err)
            if cause is None:
                traceback.print_exc()
            print(f"error: sweep job {job['job']} ({job['name']}) failed: {cause or err}", file=sys.stderr)
            sweep.record_failure(job, cause or err)
            return None
    return metrics.get(f"best/{cfg.model.monitor}", metrics.get(cfg.model.monitor))


def main() -> None:
    """Console entry point `pipeline-train`."""
    global _USER_ARGV
    _USER_ARGV = list(sys.argv)
    try:
        hydra_argv = argv_for_resume(launch.argv_for_requeue(sys.argv, CONF_DIR))
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    try:
        # Ranks started by torchrun/srun share one run dir; Hydra reads its overrides from sys.argv.
        with launch.shared_run_dir(), _argv(hydra_argv):
            _hydra_main()
    except BaseException as err:  # Hydra reports errors as SystemExit; a sweep's parent run must not stay RUNNING
        sweep.end_unfinished(err)
        raise
    finally:
        _USER_ARGV = []


if __name__ == "__main__":
    main()
