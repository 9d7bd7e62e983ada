"""Pipeline overhead per family: s/epoch of `pipeline-train` against a raw PyTorch loop doing the same work.

For each family (FCN `experiment=shapes_fcn`, detector `shapes_yolo`, instance `shapes_instance`) on a reduced
shapes set (128 train / 32 val images, batch 16, multi-scale 96/128/160 drawn per batch: `data.size_every=1`, so
that the warm epoch already meets every size), every repeat runs:
- `pipeline-train`: the real command in a fresh process (Hydra, Lightning task, DataModule, metrics, MLflow logging
  to a scratch SQLite store, both checkpoints and their uploads, rich progress bar, validation panels); a tiny
  callback (`EpochTimer`, added with `+callbacks.bench_timer`) stamps each epoch's start and the first step.
- each in a fresh process of its own (lean and profiled only in the first `--extra-repeats` repeats, 1 by default,
  so that the whole run stays near 10 minutes), the order of all the processes turning by one every repeat so
  that no variant always runs first:
  - raw loop: the same task object's `training_step` (its own loss) and net, the same DataModule's train and val
    loaders (same batches, sizes and augmentation), the same optimizer and epoch scheduler step, the same EMA of the
    weights for the detector and instance model (an `AveragedModel` swapped in for validation, as Lightning's
    `EMAWeightAveraging` does), and the same validation: the task's forward and loss, post-processing and metric
    update per batch, the metric's summary (FCN: both mIoU confusion matrices; detector: COCO bbox mAP; instance:
    segm then bbox) and reset; no logging, checkpoints, panels, progress bar or callbacks;
  - bare Lightning: the same task and DataModule in `pl.Trainer(logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False)` with only the EMA callback where the experiment has it;
  - lean pipeline: `pipeline.cli.train.train(cfg)` in-process with the optional pieces off by config overrides
    (`logger.log_model=false`, no checkpoint callbacks, no progress bar or model summary, no StepSeed /
    NonFiniteLoss / LearningRateMonitor): what is left is MLflow metric logging, panels and the run's bookkeeping;
  - profiled pipeline: `train(cfg)` in-process with everything on, under a SimpleProfiler subclass that keeps each
    hook's timestamps (so only the measured epochs count), with timers wrapped around the panel functions, the
    checkpoint write, the checkpoint upload copy, the wait for metrics before a checkpoint and the metric queueing.
    Its own s/epoch includes the profiler's cost; it serves the attribution, the headline is `pipeline-train`.
Each run trains 1 warm epoch, `--measured` epochs that are timed (epoch start to next epoch start, so an epoch's
validation, checkpoint writes and the background uploads they start all count) and 1 tail epoch that is not.
Start-up is process start to the first training step. Every family's numbers are medians over `--repeats`; the
headline (target <= 1.05x for the FCN, 1.10x for the detector and instance model) is the median of the per-repeat
ratios `pipeline-train` / raw loop, bare Lightning / raw loop beside it.

    python bench/overhead.py                    # 3 repeats, 3 measured epochs: ~10 min on 2 CPU cores
    python bench/overhead.py --repeats 1 --measured 1 --families fcn --num-train 32 --num-val 8   # smoke
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import harness
import pytorch_lightning as pl
from pytorch_lightning.profilers import SimpleProfiler

FAMILIES = {"fcn": "shapes_fcn", "detector": "shapes_yolo", "instance": "shapes_instance"}
TARGETS = {"fcn": 1.05, "detector": 1.10, "instance": 1.10}
# Everything optional the pipeline adds per epoch, switched off by config (the lean pipeline).
LEAN = ["logger.log_model=false", "~callbacks.best_checkpoint", "~callbacks.last_checkpoint",
        "+trainer.enable_checkpointing=false", "~callbacks.progress_bar", "~callbacks.model_summary",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "~callbacks.step_seed",
        "~callbacks.nonfinite_loss", "~callbacks.lr_monitor"]  # fmt: skip
ROWS = ("raw", "bare", "lean", "profiled", "pipeline")
LABELS = {
    "raw": "raw PyTorch loop",
    "bare": "bare Lightning (no logger/ckpt/bar)",
    "lean": "pipeline, optional pieces off",
    "profiled": "pipeline in-process, profiled",
    "pipeline": "pipeline-train (the real command)",
}


# ---- stamps: shared by the raw loop and the Lightning runs ------------------------------------------------------


class Stamps:
    """Wall-clock stamps (time.time()) of a training: the first training step, each epoch's start, the end."""

    def __init__(self) -> None:
        self.first_step: float | None = None
        self.epochs: list[float] = []
        self.end: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stamps as plain JSON values."""
        return {"first_step": self.first_step, "epochs": self.epochs, "end": self.end}


class EpochTimer(pl.Callback):
    """Stamps the first training step, each training epoch's start and the training's end; writes them as JSON.

    `path` None keeps them in `stamps` only (in-process runs read them there).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path, self.stamps = path, Stamps()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stamps.epochs.append(time.time())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self.stamps.first_step is None:
            self.stamps.first_step = time.time()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stamps.end = time.time()
        if self.path:
            Path(self.path).write_text(json.dumps(self.stamps.as_dict()))


class HookProfiler(SimpleProfiler):
    """Lightning's SimpleProfiler that keeps (action, end time.time(), seconds) of every call and writes them as JSON
    instead of printing a report, so the hooks of the measured epochs alone can be summed."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.events = path, []

    def stop(self, action_name: str) -> None:
        super().stop(action_name)
        self.events.append((action_name, time.time(), self.recorded_durations[action_name][-1]))

    def describe(self) -> None:
        Path(self.path).write_text(json.dumps(self.events))
        self.teardown(stage=self._stage)


def epoch_seconds(stamps: dict, measured: int) -> list[float]:
    """Seconds of epochs 1..measured (epoch 0 warms up; the tail epoch only closes the last measured one)."""
    starts = stamps["epochs"]
    if len(starts) < measured + 2:
        raise RuntimeError(f"expected {measured + 2} epochs, got stamps {stamps}")
    return [starts[k + 1] - starts[k] for k in range(1, measured + 1)]


# ---- timers wrapped around pipeline functions (measurement only, behaviour unchanged) ---------------------------


class Timers:
    """Seconds spent in wrapped functions, with each call's end time, so a window's share can be summed."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        """Replace `owner.attribute` by a wrapper that records its calls under `name`."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.events.append((name, time.time(), time.perf_counter() - start))

        setattr(owner, attribute, timed)

    def install(self) -> None:
        """Wrap the panel renderers, the image/metric queueing, the checkpoint write, copy and metric wait."""
        import pipeline.tasks.detection as detection
        import pipeline.tasks.segmentation as segmentation
        import pipeline.tracking.runs as tracking
        import pipeline.training.checkpoint as checkpoint

        self.wrap(segmentation, "comparison_panel", "panels: render")
        self.wrap(detection, "detection_panel", "panels: render")
        self.wrap(detection, "pr_curve_figure", "panels: render")
        self.wrap(tracking.MLflowLogger, "log_image", "panels: PNG + queue")
        self.wrap(checkpoint.AtomicCheckpointIO, "save_checkpoint", "checkpoints: torch.save + rename")
        self.wrap(tracking.MLflowLogger, "_scan_and_log_checkpoints", "checkpoints: copy for upload")
        self.wrap(tracking.MLflowLogger, "flush_metrics", "checkpoints: wait for metrics in store")
        self.wrap(tracking.MLflowLogger, "log_metrics", "logging: queue metrics")

    def window(self, start: float, end: float) -> dict[str, float]:
        """Seconds per name of the calls that ended in [start, end)."""
        totals: dict[str, float] = defaultdict(float)
        for name, at, seconds in self.events:
            if start <= at < end:
                totals[name] += seconds
        return dict(totals)


def hook_window(events: list, start: float, end: float) -> dict[str, float]:
    """Seconds per callback (all its hooks) and per LightningModule epoch-end hook, of calls ending in [start, end)."""
    totals: dict[str, float] = defaultdict(float)
    for action, at, seconds in events:
        if not start <= at < end:
            continue
        if action.startswith("[Callback]"):
            totals["callback " + action[len("[Callback]") :].split("{")[0].rsplit(".", 1)[0]] += seconds
        elif action.startswith("[LightningModule]") and action.endswith("_epoch_end"):
            totals[action.split("]", 1)[1]] += seconds
    return dict(totals)


# ---- the worker: raw loop, bare Lightning, lean and profiled pipeline in one process -----------------------------


def compose_cfg(family: str, common: list[str], extra: list[str], output_dir: Path) -> Any:
    """The training config of `family` as `pipeline-train` would compose it, its run dir given."""
    return harness.train_config(f"experiment={FAMILIES[family]}", *common, *extra, f"paths.output_dir={output_dir}")


def _swap(average: Any, current: Any) -> None:
    """Exchange parameter and buffer values of the EMA copy and the model (Lightning's `_swap_models`)."""
    import itertools

    pairs = zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                itertools.chain(current.parameters(), current.buffers()), strict=True)  # fmt: skip
    for avg, cur in pairs:
        tmp = avg.data.clone()
        avg.data.copy_(cur.data)
        cur.data.copy_(tmp)


def raw_loop(cfg: Any, stamps: Stamps) -> None:
    """The experiment's training and validation in plain PyTorch, through the same task, DataModule and optimizer."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    from pipeline.tasks.detection import DetectionTask

    task, data = harness.task_and_data(cfg)
    detector = isinstance(task, DetectionTask)
    optimizers = task.configure_optimizers()  # the experiments' epoch-interval schedule, or none
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    scheduler = optimizers["lr_scheduler"]["scheduler"] if isinstance(optimizers, dict) else None
    ema = None
    if "ema" in cfg.callbacks:
        ema = AveragedModel(task, use_buffers=True, avg_fn=get_ema_avg_fn(decay=cfg.callbacks.ema.decay))
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    for epoch in range(cfg.trainer.max_epochs):
        stamps.epochs.append(time.time())
        train_loader.batch_sampler.sampler.set_epoch(epoch)
        task.train()
        for index, batch in enumerate(train_loader):
            if stamps.first_step is None:
                stamps.first_step = time.time()
            loss = task.training_step(batch, index)  # its own loss; self.log is a no-op without a trainer
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(task)
        if ema is not None:
            _swap(ema, task)
        task.eval()
        with torch.inference_mode():
            if detector:
                task.evaluator.reset()
                for batch in val_loader:
                    _, detections = task(batch["image"], task._targets(batch))
                    preds = [task._to_original(det, scale, h, w) for det, scale, (h, w)
                             in zip(detections, batch["scale"], batch["orig_size"], strict=True)]  # fmt: skip
                    targets = [{k: v.to(task.device) for k, v in gt.items()} for gt in batch["gt"]]
                    task.evaluator.update(preds, targets, list(batch["image_id"]))
                task.evaluator.compute(1, lambda counts: counts)
            else:
                for index, batch in enumerate(val_loader):
                    task.validation_step(batch, index)
                task.val_iou.summary()
                task.val_iou_letterbox.summary()
                task.val_iou.reset()
                task.val_iou_letterbox.reset()
                task._vis = None
        if ema is not None:
            _swap(ema, task)
        if scheduler is not None:
            scheduler.step()
    stamps.end = time.time()


def bare_lightning(cfg: Any, workdir: Path) -> Stamps:
    """The same task and DataModule under a plain Trainer: no logger, checkpoints, progress bar or summary."""
    from hydra.utils import instantiate

    pl.seed_everything(cfg.seed, workers=True)
    task = instantiate(cfg.model)
    data = instantiate(cfg.data, targets=task.TARGETS, parallel_jobs=1)
    timer = EpochTimer()
    callbacks = [timer] + ([instantiate(cfg.callbacks.ema)] if "ema" in cfg.callbacks else [])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=cfg.trainer.max_epochs, precision=cfg.trainer.precision,
        log_every_n_steps=cfg.trainer.log_every_n_steps, deterministic=cfg.deterministic,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=str(workdir),
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    return timer.stamps


def in_process_pipeline(cfg: Any) -> None:
    """`pipeline.cli.train.train(cfg)`: what `pipeline-train` runs after Hydra composed the config (stamps by the
    config's `bench_timer` callback)."""
    from pipeline.cli.train import train

    train(cfg)


def worker(args: argparse.Namespace) -> None:
    """Run the in-process variants of one family; write their stamps (and attributions) as JSON to `args.out`."""
    harness.quiet_lightning()
    workdir = Path.cwd()
    common = common_overrides(args)
    scratch = Path(tempfile.mkdtemp(prefix=f"worker-{args.worker}-", dir=workdir / "outputs"))
    timers = Timers()
    timers.install()
    result: dict[str, Any] = {"t0": args.t0}
    for number, variant in enumerate(args.variants.split(",")):
        stamps_path = scratch / f"{variant}-{number}-stamps.json"
        timer_cfg = timer_overrides(stamps_path)
        if variant == "raw":
            stamps = Stamps()
            raw_loop(compose_cfg(args.worker, common, [], scratch / variant), stamps)
            result[variant] = stamps.as_dict()
        elif variant == "bare":
            result[variant] = bare_lightning(compose_cfg(args.worker, common, [], scratch / variant), scratch).as_dict()
        elif variant == "lean":
            in_process_pipeline(compose_cfg(args.worker, common, [*LEAN, *timer_cfg], scratch / variant))
            result[variant] = json.loads(stamps_path.read_text())
        elif variant == "profiled":
            hooks_path = scratch / "hooks.json"
            profiler = ["+trainer.profiler._target_=overhead.HookProfiler", f"+trainer.profiler.path={hooks_path}"]
            in_process_pipeline(compose_cfg(args.worker, common, [*timer_cfg, *profiler], scratch / variant))
            stamps = json.loads(stamps_path.read_text())
            result[variant] = stamps
            start, end = stamps["epochs"][1], stamps["epochs"][args.measured + 1]
            result["hooks"] = hook_window(json.loads(hooks_path.read_text()), start, end)
            result["timers"] = timers.window(start, end)
        else:
            raise ValueError(f"unknown variant {variant}")
        if variant in ("raw", "bare", "lean"):
            stamps = result[variant]
            result[f"timers_{variant}"] = timers.window(stamps["epochs"][1], stamps["epochs"][args.measured + 1])
        gc.collect()  # the previous variant's loader workers end before the next variant starts
    Path(args.out).write_text(json.dumps(result))


# ---- the driver ---------------------------------------------------------------------------------------------------


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The reduced config every variant of every family runs with."""
    return [f"data.spec.num_train={args.num_train}", f"data.spec.num_val={args.num_val}", "data.size_every=1",
            f"trainer.max_epochs={args.measured + 2}", "trainer.accelerator=cpu"]  # fmt: skip


def timer_overrides(path: Path) -> list[str]:
    """Config overrides that add the `EpochTimer` callback writing its stamps to `path`."""
    return ["+callbacks.bench_timer._target_=overhead.EpochTimer", f"+callbacks.bench_timer.path={path}"]


def run_pipeline_train(family: str, args: argparse.Namespace, workdir: Path, env: dict, tag: str) -> dict:
    """`pipeline-train experiment=<family>` in a fresh process; its stamps with the process start time."""
    path = workdir / "outputs" / f"stamps-{tag}.json"
    command = [sys.executable, "-m", "pipeline.cli.train", f"experiment={FAMILIES[family]}", *common_overrides(args),
               *timer_overrides(path)]  # fmt: skip
    t0 = time.time()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"pipeline-train failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"t0": t0, "wall": time.time() - t0, **json.loads(path.read_text())}


def run_worker(family: str, args: argparse.Namespace, variant: str, workdir: Path, env: dict, tag: str) -> dict:
    """This script's worker running one `variant` of `family` in a fresh process; its results with the process start
    time."""
    out = workdir / "outputs" / f"worker-{tag}.json"
    t0 = time.time()
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", family, "--out", str(out),
               "--t0", str(t0), "--variants", variant, "--measured", str(args.measured),
               "--num-train", str(args.num_train), "--num-val", str(args.num_val)]  # fmt: skip
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"worker {family} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def _per_epoch(windows: list[dict[str, float]], measured: int) -> dict[str, float]:
    """Per key, the median over the repeats that have it of seconds per measured epoch."""
    keys = sorted({k for w in windows for k in w})
    return {k: harness.median([w.get(k, 0.0) / measured for w in windows if w]) for k in keys}


def report(family: str, repeats: list[dict], measured: int) -> list[dict]:
    """Print one family's table: s/epoch per variant (each repeat and the median), ratios, start-up, attribution;
    return its summary rows (pipeline-train and bare Lightning over the raw loop)."""
    per_epoch: dict[str, list[float]] = defaultdict(list)
    for rep in repeats:
        for row in ROWS:
            if row in rep:
                per_epoch[row].append(statistics.fmean(epoch_seconds(rep[row], measured)))
    raw, pipe = harness.median(per_epoch["raw"]), harness.median(per_epoch["pipeline"])
    print(f"\n=== {family} (experiment={FAMILIES[family]}): s/epoch (training + validation) over {measured} measured "
          f"epochs; median of repeats; target pipeline-train <= {TARGETS[family]:.2f}x raw ===")  # fmt: skip
    print(f"{'':<40}{'s/epoch':>9}{'x raw':>8}   each repeat (s/epoch)")
    for row in ROWS:
        if per_epoch[row]:
            value = harness.median(per_epoch[row])
            shown = " ".join(f"{v:.3f}" for v in per_epoch[row])
            print(f"{LABELS[row]:<40}{value:>9.3f}{value / raw:>8.3f}   {shown}")
    # The verdict pairs each repeat's two runs (same machine state) and takes the median of those ratios.
    ratios = harness.ratios(per_epoch["pipeline"], per_epoch["raw"])
    ratio = harness.median(ratios)
    verdict = "meets" if ratio <= TARGETS[family] else "MISSES"
    print(f"pipeline-train / raw, each repeat: {' '.join(f'{r:.3f}' for r in ratios)} -> median {ratio:.3f}x, "
          f"{verdict} the {TARGETS[family]:.2f}x target")  # fmt: skip
    startup = {
        "raw loop": [rep["raw"]["first_step"] - rep["raw_t0"] for rep in repeats],
        "pipeline-train": [rep["pipeline"]["first_step"] - rep["pipeline"]["t0"] for rep in repeats],
    }
    shown = "; ".join(f"{k} {harness.median(v):.2f} ({' '.join(f'{x:.2f}' for x in v)})" for k, v in startup.items())
    print(f"start-up, process start to first training step (s), median (each repeat): {shown}")

    def diff(upper: str, lower: str) -> float:
        """Median over repeats having both of the per-repeat difference in s/epoch."""
        pairs = [(statistics.fmean(epoch_seconds(r[upper], measured)), statistics.fmean(epoch_seconds(r[lower],
                 measured))) for r in repeats if upper in r and lower in r]  # fmt: skip
        return harness.median([u - lo for u, lo in pairs])

    def line(label: str, value: float, note: str = "") -> None:
        print(f"  {label:<68}{value:>+8.3f}   {note}".rstrip())

    print(f"where pipeline-train's extra {pipe - raw:+.3f} s/epoch over the raw loop goes (s/epoch):")
    bare_timers = _per_epoch([rep.get("timers_bare", {}) for rep in repeats], measured)
    render = bare_timers.get("panels: render", 0.0)
    line("Lightning's own loop and hooks (bare - raw)", diff("bare", "raw"), f"of which panel rendering {render:.3f}")
    line("what the pipeline adds (pipeline-train - bare)", diff("pipeline", "bare"))
    lean = sum("lean" in r for r in repeats)
    if lean:
        line("  checkpoints, progress bar, per-step callbacks (pipeline-train - lean)", diff("pipeline", "lean"),
             f"[{lean} repeat(s)]")  # fmt: skip
        line("  MLflow logging, panel uploads, run bookkeeping (lean - bare)", diff("lean", "bare"))
    hooks = _per_epoch([rep.get("hooks", {}) for rep in repeats], measured)
    timers = _per_epoch([rep.get("timers", {}) for rep in repeats], measured)
    if hooks:
        count = sum("hooks" in r for r in repeats)
        print(f"  main-thread s/epoch in the profiled full pipeline [{count} repeat(s)]: SimpleProfiler hooks, timers:")
        for name, value in sorted(hooks.items(), key=lambda kv: -kv[1]):
            if value >= 0.0005:
                print(f"    {name:<66}{value:>8.3f}")
        for name, value in sorted(timers.items()):
            print(f"    timer: {name:<59}{value:>8.3f}")
    bare = harness.median_ratio(per_epoch["bare"], per_epoch["raw"])
    return [
        harness.row("overhead", f"{family}: pipeline-train s/epoch, median of per-repeat ratios", ratio, "x",
                    "raw PyTorch loop", f"<= {TARGETS[family]:.2f}", ratio <= TARGETS[family]),
        harness.row("overhead", f"{family}: bare Lightning s/epoch, median of per-repeat ratios", bare, "x",
                    "raw PyTorch loop"),
    ]  # fmt: skip


def main() -> None:
    parser = harness.arguments(__doc__, repeats=3)
    parser.add_argument("--measured", type=int, default=3, help="timed epochs per run (plus a warm and a tail epoch)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--variants", default="raw,bare", help="variants run every repeat (own process each)")
    parser.add_argument("--extra", default="lean,profiled", help="variants of the first --extra-repeats only")
    parser.add_argument("--extra-repeats", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--json", help="also write every stamp to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = harness.parse(parser)
    if args.worker:
        worker(args)
        return
    families = args.families.split(",")
    begun = time.time()
    with harness.project() as project:
        workdir = project.root
        # bench/ on the path: the config's `overhead.EpochTimer` and `overhead.HookProfiler` are imported from there.
        env = {**project.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                                          os.environ.get("PYTHONPATH")]))}  # fmt: skip
        # Warm-up (not timed): generates the shapes data, migrates the store, caches the detector's anchors.
        warm = FAMILIES["fcn" if families == ["fcn"] else "detector"]  # the same data for every family
        subprocess.run([sys.executable, "-m", "pipeline.cli.train", f"experiment={warm}", *common_overrides(args),
                        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"],
                       cwd=workdir, env=env, check=True, capture_output=True)  # fmt: skip
        results: dict[str, list[dict]] = {family: [] for family in families}
        for repeat in range(args.repeats):
            variants = args.variants.split(",") + (args.extra.split(",") if args.extra and repeat < args.extra_repeats
                                                   else [])  # fmt: skip
            # Every variant in a fresh process of its own, in an order that turns every repeat: no variant always
            # runs first (a cold allocator and page cache) or after another in the same process.
            sides = harness.turned(["pipeline", *variants], repeat)
            for family in harness.turned(families, repeat):
                tag, started = f"{family}-{repeat}", time.time()
                rep: dict[str, Any] = {}
                for side in sides:
                    if side == "pipeline":
                        rep["pipeline"] = run_pipeline_train(family, args, workdir, env, tag)
                    else:
                        work = run_worker(family, args, side, workdir, env, f"{tag}-{side}")
                        rep.update({k: v for k, v in work.items() if k != "t0"})
                        rep[f"{side}_t0"] = work["t0"]
                results[family].append(rep)
                print(f"repeat {repeat + 1}/{args.repeats} {family} ({','.join(sides)}): {time.time() - started:.0f} s",
                      flush=True)  # fmt: skip
    rows = [r for family in families for r in report(family, results[family], args.measured)]
    harness.write_summary(args.summary, rows)
    print(f"\ntotal wall time {time.time() - begun:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
