"""Tracking overhead: the training step time with MLflow logging synchronous and asynchronous against logging off.

One process, the FCN (`experiment=shapes_fcn`) task and DataModule on a reduced shapes set (384 train images, batch
16 as configured, so one epoch of 24 steps; one training size of 64 px instead of the experiment's 96/128/160, so
that a step is short and the logging's share large), trained for that one epoch under a plain `pl.Trainer` as
`bare_lightning` in bench/overhead.py does (CPU, no checkpoints, progress bar, model summary or validation), with
`log_every_n_steps=1` so that every step logs (the worst case; the configured default is 10). Variants:
- off: `logger=False` (the reference);
- sync: Lightning's stock `pytorch_lightning.loggers.MLFlowLogger`, which sends each step's `log_batch` from the
  training loop and waits for the store;
- async: the pipeline's `pipeline.tracking.runs.MLflowLogger`, built from the experiment's `logger` config as
  pipeline/cli/train.py does (`instantiate(cfg.logger, run_id=...)`, `upload_dir` in the run dir), which queues the
  values for its background thread (pipeline/tracking/uploads.py).
Both loggers log into a run made beforehand by `pipeline.tracking.runs.start_run` (as pipeline/cli/train.py makes
it: params, tags, config artifacts), in an experiment made before the first repeat, each kind in a fresh SQLite store
of its own
(`sqlite:///<tmp>/{sync,async}.db`). With `--server` (default on) the same two loggers also log to an `mlflow server`
started here on 127.0.0.1 (a free port, its own SQLite backend, 1 worker; killed at the end): sync-http, async-http.

Step time is read by a tiny callback: Lightning logs a step's metrics after `on_train_batch_end`, so a step is
timed from one `on_train_batch_start` to the next (the last one to `on_train_end`), which takes in the loader's
hand-over, the logging and the epoch's end; the mean over the steps after `--warmup` (4) is the run's figure.
`in-step` (batch start to batch end: forward, backward, optimizer) is shown beside it. `finalize` is the time
from `on_train_end` to `fit` returning: the logger's finalize (async: the wait for its queue to drain) and the
teardown; `run s` the whole run (run creation, set-up, the epoch, finalize, the look-up in the store).
Every repeat runs all variants, in an order turned by one each repeat; the ratio to off is taken per repeat
(paired) and its median reported (target: async <= 1.02x off), with the median step times (`x off*`: the same from
each run's median step, which a few steps disturbed by other load move less). After each run (its logger
finalized) the metric values the logger was handed are looked up in its store with MlflowClient; the count found
is printed.

    python bench/tracking.py                        # 5 repeats, SQLite and a local server: ~2 min on 2 idle cores
    python bench/tracking.py --no-server --repeats 1 --num-train 128   # smoke
    python bench/tracking.py --log-every 10         # the configured default interval instead
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import harness
import pytorch_lightning as pl

LABELS = {
    "off": "off (logger=False)",
    "sync": "sync: Lightning MLFlowLogger, SQLite",
    "async": "async: pipeline MLflowLogger, SQLite",
    "sync-http": "sync: Lightning MLFlowLogger, server",
    "async-http": "async: pipeline MLflowLogger, server",
}
TARGET_ASYNC = 1.02


class StepTimer(pl.Callback):
    """perf_counter stamps of every training batch's start and end and of the training's end."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.train_end: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = time.perf_counter()


def compose_cfg(args: argparse.Namespace, workdir: Path) -> Any:
    """The shapes_fcn training config, reduced, rooted in `workdir`."""
    overrides = ["experiment=shapes_fcn", f"data.spec.num_train={args.num_train}", "data.spec.num_val=8",
                 f"data.train_sizes=[{args.size}]", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                 f"paths.root_dir={workdir}", f"paths.output_dir={workdir / 'outputs' / 'run'}"]  # fmt: skip
    return harness.train_config(*overrides)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend in `workdir`, in its own process group; (process, uri)."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
               "--artifacts-destination", str(workdir / "server-artifacts")]  # fmt: skip
    with open(workdir / "server.log", "w") as log:  # the server keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_for_server(process: subprocess.Popen, uri: str, workdir: Path, timeout: float = 90.0) -> float:
    """Block until the server answers /health; the seconds waited (exits with its log if it died or timed out)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            sys.exit(f"mlflow server exited ({process.returncode}):\n{(workdir / 'server.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).close()
            return time.perf_counter() - start
        except OSError:
            time.sleep(0.25)
    stop_server(process)
    sys.exit(f"mlflow server did not answer within {timeout:g} s:\n{(workdir / 'server.log').read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL after 10 s)."""
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def make_store(uri: str, cfg: Any, log_dir: Path) -> str:
    """Create (migrate) the store at `uri` and the experiment in it; its id."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import experiment_id

    log_dir.mkdir(parents=True, exist_ok=True)
    return experiment_id(MlflowClient(uri), cfg.logger.experiment_name, log_dir)


def counting(logger: Any) -> list[tuple[str, int, float]]:
    """Wrap `logger.log_metrics` to keep (name as stored, step, value) of every value it is handed."""
    handed: list[tuple[str, int, float]] = []
    original = logger.log_metrics

    def log_metrics(metrics: dict, step: int | None = None) -> None:
        handed.extend((re.sub(r"[^a-zA-Z0-9_/. -]+", "", k), step or 0, float(v)) for k, v in metrics.items()
                      if not isinstance(v, str))  # fmt: skip
        original(metrics, step)

    logger.log_metrics = log_metrics
    return handed


def stored(uri: str, run_id: str) -> set[tuple[str, int, float]]:
    """(name, step, value) of every metric value of `run_id` in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {(key, m.step, m.value) for key in keys for m in client.get_metric_history(run_id, key)}


def make_logger(variant: str, cfg: Any, uri: str, run_dir: Path) -> Any:
    """The variant's logger on a new run made by `start_run` (None for off)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from pytorch_lightning.loggers import MLFlowLogger

    from pipeline.tracking.runs import start_run

    if variant == "off":
        return None
    run_cfg = copy.deepcopy(cfg)
    OmegaConf.update(run_cfg, "logger.tracking_uri", uri)
    OmegaConf.update(run_cfg, "logger.upload_dir", str(run_dir / "mlflow-uploads"))
    OmegaConf.update(run_cfg, "paths.output_dir", str(run_dir))
    run_id = start_run(run_cfg, [], run_name=run_dir.name)
    if variant.startswith("sync"):
        return MLFlowLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=uri, run_id=run_id)
    return instantiate(run_cfg.logger, run_id=run_id)


def run_once(
    variant: str, cfg: Any, uri: str | None, args: argparse.Namespace, run_dir: Path, limit: int | None = None
) -> dict[str, Any]:
    """Train the variant for one epoch (`limit` batches at most); its step times (s), finalize seconds, the metric
    values handed to the logger and found in the store."""
    from hydra.utils import instantiate

    begun = time.perf_counter()
    run_dir.mkdir(parents=True)
    timer = StepTimer()
    # The data check's tables and MLflow's run links would drown the results; errors still reach stderr.
    with contextlib.redirect_stdout(io.StringIO()):
        logger = make_logger(variant, cfg, uri, run_dir)
        handed = counting(logger) if logger is not None else []
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        task = instantiate(cfg.model)
        data = instantiate(cfg.data, targets=task.TARGETS, parallel_jobs=1)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=limit, precision=cfg.trainer.precision,
            log_every_n_steps=args.log_every, deterministic=cfg.deterministic, use_distributed_sampler=False,
            logger=logger if logger is not None else False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
            default_root_dir=str(run_dir),
        )  # fmt: skip
        trainer.fit(task, datamodule=data)
        fit_end = time.perf_counter()
    warm = min(args.warmup, len(timer.starts) - 1)
    bounds = [*timer.starts, timer.train_end]
    steps = [bounds[k + 1] - bounds[k] for k in range(warm, len(timer.starts))]
    inner = [e - s for s, e in zip(timer.starts[warm:], timer.ends[warm:], strict=True)]
    result = {"steps": steps, "inner": inner, "finalize": fit_end - timer.train_end, "handed": len(handed)}
    if logger is not None:
        found = stored(uri, logger.run_id)
        result["missing"] = len(set(handed) - found)
        result["distinct"] = len(set(handed))
        result["in_store"] = len(found)
    result["wall"] = time.perf_counter() - begun
    del trainer, task, data, logger
    gc.collect()  # the loader's persistent worker ends before the next run
    return result


def report(variants: list[str], results: dict[str, list[dict]], args: argparse.Namespace, default_every: int) -> dict:
    """Print the table; the median ratio to off of each variant."""
    off = [statistics.fmean(r["steps"]) for r in results["off"]]
    n_steps = len(results["off"][0]["steps"])
    print(f"\n=== shapes_fcn, batch {args.batch}, {args.size} px, CPU: mean step time over {n_steps} steps after "
          f"{args.warmup} warm-up steps, log_every_n_steps={args.log_every} (configured default "
          f"{default_every}); median of {args.repeats} repeats; target async <= {TARGET_ASYNC:.2f}x off "
          "===")  # fmt: skip
    print(f"{'':<40}{'step ms':>9}{'x off':>8}{'x off*':>8}{'in-step ms':>12}{'finalize s':>12}{'run s':>8}"
          "   x off each repeat")  # fmt: skip
    ratios: dict[str, float] = {}
    off_typical = [harness.median(r["steps"]) for r in results["off"]]
    for variant in variants:
        means = [statistics.fmean(r["steps"]) for r in results[variant]]
        each = harness.ratios(means, off)
        ratios[variant] = harness.median(each)
        typical = harness.median_ratio([harness.median(r["steps"]) for r in results[variant]], off_typical)
        inner = harness.median([statistics.fmean(r["inner"]) for r in results[variant]])
        final = harness.median([r["finalize"] for r in results[variant]])
        wall = harness.median([r["wall"] for r in results[variant]])
        print(f"{LABELS[variant]:<40}{1000 * harness.median(means):>9.1f}{ratios[variant]:>8.3f}{typical:>8.3f}"
              f"{1000 * inner:>12.1f}{final:>12.2f}{wall:>8.1f}   {' '.join(f'{x:.3f}' for x in each)}")  # fmt: skip
    print("* the same ratio from each run's median step instead of its mean (less moved by a few disturbed steps)")
    print("\nmetric values in each run's store after its logger was finalized (found / handed to the logger):")
    for variant in variants[1:]:
        runs = results[variant]
        shown = ", ".join(f"{r['distinct'] - r['missing']}/{r['distinct']}" for r in runs)
        complete = all(r["missing"] == 0 for r in runs)
        print(f"  {LABELS[variant]:<40}{shown}   {'all arrived' if complete else 'MISSING VALUES'}")
    extra = {v: 1000 * (harness.median([statistics.fmean(r["steps"]) for r in results[v]]) - harness.median(off))
             for v in variants}  # fmt: skip
    print(f"\nat the configured log_every_n_steps={default_every} (estimate: the extra ms per logged step spread over "
          f"{default_every} steps, epoch-end logging left out):")  # fmt: skip
    for variant in variants[1:]:
        estimate = 1 + extra[variant] * args.log_every / default_every / (1000 * harness.median(off))
        print(f"  {LABELS[variant]:<40}{extra[variant]:>+8.1f} ms per step now -> about {estimate:.3f}x off")
    return ratios


def main() -> None:
    parser = harness.arguments(__doc__, repeats=5)
    parser.add_argument("--num-train", type=int, default=384, help="training images: one epoch per run")
    parser.add_argument("--warmup", type=int, default=4, help="untimed first steps of each run")
    parser.add_argument("--size", type=int, default=64, help="the one training size (px)")
    parser.add_argument("--log-every", type=int, default=1, help="trainer log_every_n_steps")
    parser.add_argument("--server", action=argparse.BooleanOptionalAction, default=True,
                        help="also log to a local `mlflow server` (sync-http, async-http)")  # fmt: skip
    args = harness.parse(parser)
    harness.quiet_lightning()
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    begun = time.perf_counter()
    with harness.project(prefix="bench-tracking-") as project:
        workdir = project.root
        server = start_server(workdir) if args.server else None  # it boots while the rest is set up
        try:
            cfg = compose_cfg(args, workdir)
            args.batch = cfg.data.batch_size
            uris = {"sync": f"sqlite:///{workdir / 'sync.db'}", "async": f"sqlite:///{workdir / 'async.db'}"}
            variants = ["off", "sync", "async"]
            for kind, uri in uris.items():
                make_store(uri, cfg, workdir / "stores" / kind)
            if server is not None:
                waited = wait_for_server(*server, workdir)
                print(f"mlflow server at {server[1]} answered after {waited:.1f} s", flush=True)
                uris["sync-http"] = uris["async-http"] = server[1]
                make_store(server[1], cfg, workdir / "stores" / "http")
                variants += ["sync-http", "async-http"]
            # Not timed: generates the shapes data and warms the imports and the first fit of this process.
            run_once("off", cfg, None, args, workdir / "runs" / "warm", limit=2)
            results: dict[str, list[dict]] = {v: [] for v in variants}
            for repeat in range(args.repeats):
                for variant in harness.turned(variants, repeat):
                    run_dir = workdir / "runs" / f"{variant}-{repeat}"
                    results[variant].append(run_once(variant, cfg, uris.get(variant), args, run_dir))
                print(f"repeat {repeat + 1}/{args.repeats}: {time.perf_counter() - begun:.0f} s", flush=True)
        finally:
            if server is not None:
                stop_server(server[0])
    ratios = report(variants, results, args, cfg.trainer.log_every_n_steps)
    if not args.server:
        print("\nSQLite stores only (--no-server): no mlflow server measured.")
    print(f"\ntotal wall time {time.perf_counter() - begun:.0f} s")
    rows = []
    for variant in variants[1:]:
        store = "a local mlflow server" if variant.endswith("http") else "SQLite"
        asynchronous = variant.startswith("async")
        logger = "pipeline MLflowLogger (async)" if asynchronous else "Lightning MLFlowLogger (sync)"
        what = f"shapes_fcn step time, {logger} to {store}, log_every_n_steps={args.log_every}"
        target = f"<= {TARGET_ASYNC}" if asynchronous else None
        met = ratios[variant] <= TARGET_ASYNC if asynchronous else None
        rows.append(harness.row("tracking", what, ratios[variant], "x", "logging off", target, met))
    harness.write_summary(args.summary, rows)


if __name__ == "__main__":
    main()
