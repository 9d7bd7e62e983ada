"""Sweeps: one MLflow parent run per `-m` sweep, every job a child run, a summary on the parent when it ends.

The sweep process (Hydra's `on_multirun_start`, before any job) creates the store, its experiment and the parent
run once, so parallel jobs never race to migrate the SQLite file or create the experiment, and writes
`<sweep dir>/sweep.json`, which every job (in this process, a joblib worker or a submitit job) reads to find its
parent. `on_multirun_end` collects the children by their `pipeline.sweep.id` tag; a sweep that stops before it
(`end_unfinished`, called by `pipeline-train`) leaves its parent FAILED, not RUNNING.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pipeline.data.datamodule import usable_cores
from pipeline.errors import ConfigError
from pipeline.metrics.monitor import monitor_mode
from pipeline.tracking import runs, store, summary
from pipeline.training.callbacks import PREEMPTED_EXIT
from pipeline.viz import is_number, objective_plot

SWEEP_FILE = "sweep.json"
TAG = f"{runs.TAG_PREFIX}sweep."
# Short names for the keys users sweep most, in child run names ("fcn8s-lr0.003-s1-j2").
SHORT = {"weight_decay": "wd", "seed": "s", "batch_size": "bs", "max_epochs": "ep"}
# Overrides that do not describe the model or its training (or are already in the name): left out of run names.
NAME_SKIP = {"experiment", "model", "data", "ckpt_path", "resume_mode", "register", "tags"}
NAME_SKIP_PREFIXES = ("hydra.", "paths.", "logger.", "callbacks.progress_bar.", "callbacks.model_summary.")
NAME_SKIP_LEAVES = {"num_workers", "log_every_n_steps", "check_cache", "anchor_cache"}  # results do not depend on them
NAME_LENGTH = 80  # before the suffix: what a runs-table column shows, and well inside MLflow's 250


def varied_keys(config: DictConfig) -> dict[str, str]:
    """{key: values} the sweep varies: sweep overrides on the command line and `hydra.sweeper.params`."""
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = {o.get_key_element().lstrip("+~"): o.input_line.split("=", 1)[1] for o in overrides if o.is_sweep_override()}
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return {**{str(k): str(v) for k, v in params.items()}, **keys}


def job_values(overrides: list[str], keys: list[str]) -> dict[str, str]:
    """This job's value of each varied key, from its own overrides (`model=fcn8s`, `model.optimizer.lr=0.003`)."""
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {k: given[k] for k in keys if k in given}


def _name_parts(values: dict[str, str]) -> list[str]:
    """Config-group choices as they are (`fcn8s`), other keys abbreviated with their value (`lr0.003`, `s1`)."""
    parts = []
    for key, value in values.items():
        leaf = key.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
        is_choice = "." not in key and not is_number(value)  # `model=fcn8s`, `model/backbone=resnet18`
        if is_number(value) and not float(value).is_integer():
            value = f"{float(value):.3g}"  # a sampled 0.0005611516… reads 0.000561
        parts.append(value if is_choice else f"{SHORT.get(leaf, leaf)}{value}")
    return parts


def job_name(values: dict[str, str], job: int) -> str:
    """A sweep job's run name: what varies, then its job number (`fcn8s-lr0.003-s1-j2`)."""
    return "-".join([*_name_parts(values), f"j{job}"])


def run_name(model: str, overrides: list[str], run_dir: str) -> str:
    """A single run's name: model, data, the overrides that set it apart, then 4 hex digits of its run dir.

    `FCN-8s-vgg_tiny-shapes-lr0.01-3f2a`: what differs leads, so truncated names in the MLflow runs table stay
    apart; the suffix keeps two runs of one command apart (their run dirs differ).
    """
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    values = {
        k: v
        for k, v in given.items()
        if k not in NAME_SKIP
        and not k.startswith(NAME_SKIP_PREFIXES)
        and k.rsplit(".", 1)[-1] not in NAME_SKIP_LEAVES
        and "/" not in v
    }  # fmt: skip  (no file paths)
    data = runs.config_choices().get("data")
    name = "-".join([model, *([data] if data else []), *_name_parts(values)])
    if len(name) > NAME_LENGTH:  # the whole list stays in the pipeline.overrides tag
        name = name[: NAME_LENGTH - 1] + "…"
    return f"{name}-{hashlib.sha1(run_dir.encode()).hexdigest()[:4]}"


def read_sweep(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The sweep's parent-run record written by `on_multirun_start`, or None outside a tracked sweep."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def current_job() -> dict[str, Any] | None:
    """In a sweep job: {parent_run_id, job, values, name, overrides, …}; None for a single run."""
    if not _in_sweep():
        return None
    hc = HydraConfig.get()
    sweep = read_sweep(hc.sweep.dir)
    if sweep is None:
        return None
    overrides = list(hc.overrides.task)
    values = job_values(overrides, list(sweep["varied"]))
    job = int(hc.job.num)
    return {**sweep, "job": job, "overrides": overrides, "values": values, "name": job_name(values, job)}


def child_tags(job: dict[str, Any]) -> dict[str, str]:
    """Tags that make a job a child of its sweep's parent run."""
    return {
        "mlflow.parentRunId": job["parent_run_id"],
        f"{TAG}id": job["parent_run_id"],
        f"{TAG}job": str(job["job"]),
        f"{TAG}params": json.dumps(job["values"]),
        f"{TAG}overrides": runs.joined(job["overrides"]),
    }


def parallel_jobs() -> int:
    """Jobs that share this machine at once: the joblib launcher's `n_jobs` (-1: one per core), else 1."""
    if not _in_sweep():
        return 1
    n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs") or 1
    return usable_cores() if n_jobs < 0 else int(n_jobs)


def _latest_run(client: MlflowClient, job: dict[str, Any]) -> Any | None:
    """The latest child run of this job number under the job's parent, or None."""
    found = client.search_runs(
        [job["experiment_id"]],
        filter_string=f"tags.`{TAG}id` = '{job['parent_run_id']}' and tags.`{TAG}job` = '{job['job']}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def previous_run(job: dict[str, Any]) -> Any | None:
    """This job's run from an earlier attempt of the same sweep dir, or None; refused when its overrides differ."""
    previous = _latest_run(store.client(job["tracking_uri"]), job)
    if previous is None:
        return None
    before, now = previous.data.tags.get(f"{TAG}overrides"), runs.joined(job["overrides"])
    if before != now:
        raise ConfigError(
            f"Job {job['job']} of sweep {job['parent_run_id']} ran with overrides '{before}', not '{now}': re-run a "
            "sweep dir with the same command (or start a new sweep without hydra.sweep.dir)."
        )
    return previous


def record_failure(job: dict[str, Any], error: BaseException) -> None:
    """Mark the job's child run FAILED with the error as a tag (creating the run when the job failed before it)."""
    client = store.client(job["tracking_uri"])
    latest = _latest_run(client, job)
    if latest is not None and latest.info.status != "FINISHED":  # the run this attempt made (or continued)
        run_id = latest.info.run_id
    else:
        run_id = client.create_run(job["experiment_id"], run_name=job["name"], tags=child_tags(job)).info.run_id
    message = f"{type(error).__name__}: {error}"
    client.set_tag(run_id, f"{runs.TAG_PREFIX}error", message[:MAX_TAG_VAL_LENGTH])
    client.set_terminated(run_id, "FAILED")


class OptunaPruning(pl.Callback):
    """Reports the monitored metric to this job's Optuna trial after each validation epoch (rank 0) and stops the
    training when the study's median pruner says the trial is worse than the earlier ones at that epoch."""

    def __init__(self, storage: str, study_name: str, number: int, monitor: str, startup_trials: int) -> None:
        import optuna

        pruner = optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
        self.study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
        # Job N runs trial N (the sweeper numbers them so); Trial(study, id) is how Optuna reopens a trial.
        self.trial = optuna.trial.Trial(self.study, self.study.trials[number]._trial_id)
        self.monitor, self.pruned_at_epoch = monitor, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the module's on_validation_epoch_end has logged the epoch's metrics (callbacks' run before it).
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or not trainer.is_global_zero or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_at_epoch = trainer.current_epoch
            self.trial.set_user_attr("pruned_at_epoch", self.pruned_at_epoch)
            trainer.should_stop = True


def pruning_callback(monitor: str) -> OptunaPruning | None:
    """The pruning callback of a job of a `hydra/sweeper=pipeline_optuna` sweep with a pruner, else None."""
    if not _in_sweep():
        return None
    sweeper = HydraConfig.get().sweeper
    if not str(sweeper.get("_target_", "")).endswith("PipelineOptunaSweeper") or not sweeper.get("pruner"):
        return None
    return OptunaPruning(sweeper.storage, sweeper.study_name, int(HydraConfig.get().job.num), monitor,
                         sweeper.pruner_startup_trials)  # fmt: skip


def _enable_wal(tracking_uri: str, launcher: str) -> None:
    """A local SQLite store in write-ahead-log mode (persistent in the file), so readers never block a writer.

    Writers still take turns (MLflow's 20 s busy timeout makes them wait). Not for SLURM: WAL needs one machine's
    shared memory, and a store on a network filesystem should be a tracking server instead.
    """
    if tracking_uri.startswith("sqlite:///") and "slurm" not in launcher.lower():
        with sqlite3.connect(tracking_uri.removeprefix("sqlite:///"), timeout=30) as db:
            db.execute("PRAGMA journal_mode=WAL")


# The parent run of the sweep this process runs, from its start to its summary: (tracking URI, run id, sweep dir).
_OPEN: tuple[str, str, str] | None = None


def end_unfinished(error: BaseException) -> None:
    """A sweep that stopped before its summary (a job's config that does not compose, an error in the sweeper,
    Ctrl-C): its parent run ends FAILED (KILLED when interrupted) with the reason as `pipeline.error`."""
    global _OPEN
    if _OPEN is None:
        return
    (uri, parent, sweep_dir), _OPEN = _OPEN, None
    interrupted = isinstance(error, KeyboardInterrupt) or (
        isinstance(error, SystemExit) and error.code == PREEMPTED_EXIT
    )
    if isinstance(error, SystemExit):
        cause = f"exit status {error.code}; the sweep's output says why"
    else:
        cause = f"{type(error).__name__}: {error}"
    reason = f"The sweep stopped before its end ({cause}); resume it with hydra.sweep.dir={sweep_dir}"
    try:
        client = store.client(uri)
        client.set_tag(parent, f"{runs.TAG_PREFIX}error", reason[:MAX_TAG_VAL_LENGTH])
        client.set_terminated(parent, "KILLED" if interrupted else "FAILED")
        print(f"Sweep parent run {parent} marked {'KILLED' if interrupted else 'FAILED'}: {reason}", file=sys.stderr)
    except Exception as err:  # the store may be what failed
        print(f"Could not mark the sweep's parent run {parent} ({reason}): {err}", file=sys.stderr)


class SweepTracking(Callback):
    """Hydra callback: the parent MLflow run of a `-m` sweep (any sweeper, any launcher)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _OPEN
        if OmegaConf.select(config, "model.monitor") is None:  # a sweep of pipeline-eval/predict: nothing to track
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        existing = read_sweep(sweep_dir)
        uri = str(config.logger.tracking_uri)
        store.check_reachable(uri)
        client = store.client(uri)
        if existing is not None:  # the same sweep dir again (resume): same parent; a killed sweep's jobs are over
            parent = existing["parent_run_id"]
            running = f"tags.`{TAG}id` = '{parent}' and attributes.status = 'RUNNING'"
            stale = client.search_runs([existing["experiment_id"]], filter_string=running)
            for run in stale:
                client.set_terminated(run.info.run_id, "KILLED")
            client.update_run(parent, status="RUNNING")
            _OPEN = (uri, parent, str(sweep_dir))
            print(f"Resuming sweep {sweep_dir} (parent run {parent}): finished jobs are skipped")
            return
        exp_id = runs.experiment_id(client, config.logger.experiment_name, config.paths.log_dir)  # migrates
        _enable_wal(uri, str(OmegaConf.select(config, "hydra.launcher._target_")))
        varied = varied_keys(config)
        monitor = str(config.model.monitor)
        tags = {
            f"{TAG}role": "parent",
            f"{TAG}dir": str(sweep_dir),
            f"{TAG}overrides": runs.joined(list(config.hydra.overrides.task)),
            f"{TAG}space": json.dumps(varied)[:MAX_TAG_VAL_LENGTH],
            f"{TAG}monitor": monitor,
            **summary.source_tags(runs.ENTRY, summary.git_state(runs.CODE_ROOT)),
        }
        parent = client.create_run(exp_id, run_name=f"sweep-{sweep_dir.name}", tags=tags).info.run_id
        record = {"parent_run_id": parent, "experiment_id": exp_id, "tracking_uri": uri, "varied": list(varied),
                  "monitor": monitor, "mode": monitor_mode(monitor)}  # fmt: skip
        runs.write_json(sweep_dir / SWEEP_FILE, record)
        _OPEN = (uri, parent, str(sweep_dir))
        print(f"Sweep parent run {parent}: {runs.ui_hint(uri, parent, monitor)}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _OPEN
        sweep = read_sweep(config.hydra.sweep.dir)
        if sweep is not None:
            summarise(Path(config.hydra.sweep.dir), sweep)
        _OPEN = None


def summarise(sweep_dir: Path, sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Write `sweep.csv` and `sweep.png` (objective against each varied key), tag the parent with the best child."""
    client = store.client(sweep["tracking_uri"])
    parent, metric, keys = sweep["parent_run_id"], f"best/{sweep['monitor']}", list(sweep["varied"])
    children = client.search_runs([sweep["experiment_id"]], filter_string=f"tags.`{TAG}id` = '{parent}'")
    latest = {}  # a job re-run after a failure has several runs: its latest attempt counts
    for run in sorted(children, key=lambda r: r.info.start_time):
        latest[int(run.data.tags.get(f"{TAG}job", "0"))] = run
    rows = []
    for _, run in sorted(latest.items()):
        end = run.info.end_time or int(time.time() * 1000)
        values = json.loads(run.data.tags.get(f"{TAG}params", "{}"))
        rows.append({
            "job": int(run.data.tags.get(f"{TAG}job", "0")), "run_id": run.info.run_id, "name": run.info.run_name,
            "status": run.info.status, "value": run.data.metrics.get(metric),
            "duration_s": round((end - run.info.start_time) / 1000, 1),
            "error": run.data.tags.get(f"{runs.TAG_PREFIX}error", ""), **{k: values.get(k, "") for k in keys},
        })  # fmt: skip
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["job", "run_id", "name", "status", "value", "duration_s", "error", *keys]
        )
        writer.writeheader()
        writer.writerows(rows)
    client.log_artifact(parent, str(sweep_dir / "sweep.csv"))
    scored = [r for r in rows if r["status"] == "FINISHED" and r["value"] is not None and math.isfinite(r["value"])]
    failed = [r for r in rows if r["status"] != "FINISHED"]
    tags = {f"{TAG}jobs": str(len(rows)), f"{TAG}failed": str(len(failed)),
            f"{TAG}failed_jobs": ", ".join(f"{r['job']} ({r['name']})" for r in failed) or "(none)"}  # fmt: skip
    if scored:
        best = (max if sweep["mode"] == "max" else min)(scored, key=lambda r: r["value"])
        tags |= {f"{TAG}best_run_id": best["run_id"], f"{TAG}best_name": best["name"],
                 **{f"{TAG}best.{k}": str(best[k]) for k in keys}}  # fmt: skip
        step = len(client.get_metric_history(parent, metric))  # a resumed sweep logs its new best as the next step
        client.log_batch(parent, metrics=[Metric(metric, best["value"], int(time.time() * 1000), step)])
        figure = objective_plot(scored, keys, sweep["monitor"])
        client.log_image(parent, figure, "sweep.png")
        Image.fromarray(figure).save(sweep_dir / "sweep.png")
        print(f"Sweep best: {best['name']} {sweep['monitor']}={best['value']:.4f} (run {best['run_id']})")
    if failed:
        print(f"Sweep: {len(failed)} of {len(rows)} jobs did not finish: {tags[f'{TAG}failed_jobs']}")
    client.log_batch(parent, tags=[RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()])
    client.set_terminated(parent, "FINISHED")
    return rows
