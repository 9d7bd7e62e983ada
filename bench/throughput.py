"""Data throughput: each training DataModule's images/s against the model's training images/s; peak memory.

For each family (FCN `experiment=shapes_fcn`, detector `shapes_yolo`, instance `shapes_instance`) on a reduced
shapes set (128 train / 16 val images by default; batch size, multi-scale sizes 96/128/160, `size_every` and the
augmentation are the experiment's own), in one process:
- loader images/s: the DataModule's `train_dataloader()` exactly as built, so at its default `num_workers`
  ("auto": `auto_num_workers()` in pipeline/data/datamodule.py, the usable cores minus one per training process, at
  most 4: 1 worker on 2 cores), persistent workers, decode + albumentations + letterbox + the multi-scale collate.
  One warm epoch (worker start-up, first file reads), then `--epochs` timed epochs, `set_epoch` on the sampler each
  epoch as Lightning does; images/s = images / seconds of that epoch. The same again with `num_workers=0` (all of it
  in the main process) for reference.
- training images/s: the task's `training_step` (its own loss) + backward + optimizer step (`configure_optimizers()`,
  the detector's k-means anchors set as `DetectionTask.setup` does) on batches taken beforehand from the same
  DataModule's train loader (the `num_workers=0` pass: samples are seeded per (seed, epoch, index), so its batches
  equal the default loader's, which is checked on the first timed batch), so data loading is excluded. The first
  `--train-batches` batches (3) of the warm epoch warm it up, then the first `--train-batches` of each timed epoch are
  one repeat, at that epoch's size. The EMA update of the detector and instance runs is not included, so the training
  rate is, if anything, too high.
- ratio loader images/s (default workers) / training images/s per timed epoch (same sizes), median: target >= 1.0,
  the loader is not the bottleneck. The loader is measured alone: in a real run on this 2-core machine its worker
  shares the cores with the training process's two intra-op threads, so the ratio here is an upper bound of what a
  run sees.
- peak memory of a short real run: `python -m pipeline.cli.train experiment=<x> data.spec.num_train=…
  data.spec.num_val=… trainer.accelerator=cpu data.size_every=1 trainer.max_epochs=1` (a new size per batch, so the
  largest size 160 is met; the sizes drawn are printed) in a temporary working directory with MLFLOW_TRACKING_URI on
  a temporary SQLite file, run by a tiny launcher (`LAUNCHER`) that executes the module in its own process (runpy, as
  `-m` does) and writes the training process's own peak RSS, VmHWM of /proc/self/status, at its end (exact). The
  loader workers (forked from it) share most of its pages copy-on-write, so what they add is their private memory
  (Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup), summed over all descendants of the training process
  and sampled every `--sample` s from this process; the summary row is VmHWM + that peak (an upper bound as far as
  the two peaks need not coincide, a lower bound as far as sampling can miss a worker's peak). `getrusage` is printed
  too, only to show that it misleads here: RUSAGE_SELF's ru_maxrss starts from the spawning process's peak (Linux
  keeps the larger across a vfork + exec; this script's own peak is printed beside it), and RUSAGE_CHILDREN's is
  the largest worker's RSS, which counts the pages it shares with the training process.

    python bench/throughput.py    # 3 families, 1 warm + 3 timed epochs: 226 s at load ~5 on 2 cores; not timed idle
    python bench/throughput.py --epochs 5 --num-train 512 --num-val 64     # the experiments' full shapes set
    python bench/throughput.py --families fcn --epochs 1 --no-memory       # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

FAMILIES = {"fcn": "shapes_fcn", "detector": "shapes_yolo", "instance": "shapes_instance"}
# Runs `pipeline.cli.train` in this very process (as `python -m` would), then writes its peak RSS figures (KiB) as JSON.
LAUNCHER = """
import gc, json, resource, runpy, sys
out, sys.argv = sys.argv[1], ["pipeline.cli.train", *sys.argv[2:]]
code = 0
try:
    runpy.run_module("pipeline.cli.train", run_name="__main__", alter_sys=True)
except SystemExit as err:
    code = err.code or 0
gc.collect()
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
json.dump({"code": code, "vmhwm_kib": hwm, "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, open(out, "w"))
"""
PRIVATE = ("Private_Clean:", "Private_Dirty:")  # a process's pages no other process maps, in smaps_rollup


def data_overrides(args: argparse.Namespace, size_every: int | None) -> list[str]:
    """The reduced shapes set every measurement and the memory run use; `size_every` None: the experiment's."""
    extra = [f"data.size_every={size_every}"] if size_every else []
    return [f"data.spec.num_train={args.num_train}", f"data.spec.num_val={args.num_val}", "trainer.accelerator=cpu",
            *extra]  # fmt: skip


def compose_cfg(family: str, overrides: list[str], workdir: Path) -> Any:
    """The training config of `family` as `pipeline-train` composes it, rooted in `workdir`."""
    paths = [f"paths.root_dir={workdir}", f"paths.output_dir={workdir / 'outputs' / family}"]
    return harness.train_config(f"experiment={FAMILIES[family]}", *overrides, *paths)


def time_loader(loader: Any, warm: int, epochs: int, keep: bool) -> dict[str, Any]:
    """Images/s of each timed epoch of `loader` after `warm` untimed ones; with `keep`, every epoch's batches."""
    rates, sizes, batches = [], [], []
    for epoch in range(warm + epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)
        kept, images, seen = [], 0, []
        start = time.perf_counter()
        for batch in loader:
            images += len(batch["image"])
            seen.append(int(batch["image"].shape[-1]))
            if keep or (epoch == warm and not kept):
                kept.append(batch)
        seconds = time.perf_counter() - start
        batches.append(kept)
        if epoch >= warm:
            rates.append(images / seconds)
            sizes.append(sorted(set(seen)))
    return {"rates": rates, "sizes": sizes, "batches": batches}


def time_training(task: Any, warm: list[list[dict]], timed: list[list[dict]]) -> list[float]:
    """Images/s of training_step + backward + optimizer step over each list of `timed` batches, after `warm`."""
    optimizers = task.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    task.train()

    def step(batch: dict, index: int) -> None:
        loss = task.training_step(batch, index)  # self.log is a no-op without a trainer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for epoch in warm:
        for index, batch in enumerate(epoch):
            step(batch, index)
    rates = []
    for epoch in timed:
        start, images = time.perf_counter(), 0
        for index, batch in enumerate(epoch):
            step(batch, index)
            images += len(batch["image"])
        rates.append(images / (time.perf_counter() - start))
    return rates


def memory_sizes(data: Any) -> list[int]:
    """The square size of each training batch of epoch 0 with `data.size_every=1` (the memory run's sizes)."""
    from pipeline.data.samplers import MultiScaleBatchSampler, ShardedSampler

    sampler = ShardedSampler(len(data.train_set), shuffle=True, seed=data.seed)
    batches = MultiScaleBatchSampler(sampler, data.batch_size, data.train_sizes, 1, len(sampler) >= data.batch_size)
    return [batches.size_at(b) for b in range(len(batches))]


def measure(family: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Loader images/s at the default and at 0 workers, and training images/s on the same batches, of `family`."""
    import torch

    from pipeline.data.datamodule import auto_num_workers, usable_cores

    task, data = harness.task_and_data(compose_cfg(family, data_overrides(args, args.size_every), workdir))
    loader = data.train_dataloader()
    result: dict[str, Any] = {"num_workers_cfg": data.num_workers, "workers": loader.num_workers,
                              "auto": auto_num_workers(), "cores": usable_cores(),
                              "batch_size": data.batch_size}  # fmt: skip
    default = time_loader(loader, args.warm, args.epochs, keep=False)
    first = default["batches"][args.warm][0]["image"] if default["batches"][args.warm] else None
    del loader, default["batches"]
    gc.collect()  # the persistent workers end here, before anything else is timed
    data.num_workers = 0
    main = time_loader(data.train_dataloader(), args.warm, args.epochs, keep=True)
    batches = main.pop("batches")
    result["same_batches"] = first is not None and torch.equal(first, batches[args.warm][0]["image"])
    result["loader"], result["loader0"] = default, main
    count = args.train_batches or None
    result["training"] = time_training(task, [e[:count] for e in batches[: args.warm]],
                                       [e[:count] for e in batches[args.warm :]])  # fmt: skip
    result["memory_sizes"] = memory_sizes(data)
    result["ratios"] = [lo / tr for lo, tr in zip(default["rates"], result["training"], strict=True)]
    return result


def status_kib(pid: int | str, field: str) -> int:
    """A KiB field of /proc/<pid>/status (VmRSS, VmHWM); 0 for a process that is gone."""
    try:
        return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith(field + ":"))  # fmt: skip
    except (OSError, StopIteration):
        return 0


def children(pid: int) -> list[int]:
    """The child processes of `pid` (of all its threads); none for a process that is gone."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except (OSError, ValueError):
        return []


def descendants_private_kib(pid: int) -> int:
    """Summed private memory (Private_Clean + Private_Dirty, KiB) of the descendants of `pid` now."""
    total, todo = 0, children(pid)
    while todo:
        current = todo.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in rollup if line.startswith(PRIVATE))
        todo += children(current)
    return total


def peak_memory(family: str, args: argparse.Namespace, workdir: Path, env: dict) -> dict[str, Any]:
    """Peak memory figures (KiB) of a 1-epoch `pipeline.cli.train` run of `family` (run by `LAUNCHER`; its loader
    workers' private memory sampled every `args.sample` s from here); its wall seconds."""
    out = workdir / "outputs" / f"rss-{family}.json"
    command = [sys.executable, "-c", LAUNCHER, str(out), f"experiment={FAMILIES[family]}", *data_overrides(args, 1),
               "trainer.max_epochs=1"]  # fmt: skip
    spawner = status_kib("self", "VmHWM")
    start, workers = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            workers = max(workers, descendants_private_kib(process.pid))
            time.sleep(args.sample)
        wall = time.perf_counter() - start
        log.seek(0)
        if process.returncode or not out.exists() or json.loads(out.read_text())["code"]:
            sys.exit(f"pipeline.cli.train {family} failed ({process.returncode}):\n{log.read()[-5000:]}")
    return {**json.loads(out.read_text()), "workers_kib": workers, "spawner_kib": spawner, "wall": wall}


def fmt(values: list[float], digits: int = 1) -> str:
    """Space-separated values."""
    return " ".join(f"{v:.{digits}f}" for v in values)


def report(family: str, m: dict[str, Any], rss: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Print one family's lines; return its summary rows."""
    median = harness.median
    loader, loader0, train, ratio = median(m["loader"]["rates"]), median(m["loader0"]["rates"]), median(
        m["training"]), median(m["ratios"])  # fmt: skip
    met = ratio >= 1.0
    print(f"\n=== {family} (experiment={FAMILIES[family]}), batch {m['batch_size']}: images/s, median (each epoch) ===")
    print(f"num_workers: config {m['num_workers_cfg']!r} -> {m['workers']} (auto_num_workers() = {m['auto']} on "
          f"{m['cores']} usable cores); sizes per timed epoch {m['loader']['sizes']}; "
          f"batches equal at both worker counts: {m['same_batches']}")  # fmt: skip
    print(f"{'loader, default workers (' + str(m['workers']) + ')':<44}{loader:>9.1f}   {fmt(m['loader']['rates'])}")
    print(f"{'loader, num_workers=0 (main process)':<44}{loader0:>9.1f}   {fmt(m['loader0']['rates'])}")
    print(f"{'training step + backward + optimizer step':<44}{train:>9.1f}   {fmt(m['training'])}")
    print(f"{'ratio loader (default) / training':<44}{ratio:>8.2f}x   {fmt(m['ratios'], 2)}  "
          f"target >= 1.0: {'met' if met else 'NOT MET'}")  # fmt: skip
    what = (f"{family}: train loader img/s at default num_workers={m['workers']} ({loader:.0f}, measured alone) / "
            f"training_step+backward+step img/s ({train:.0f})")  # fmt: skip
    rows = [harness.row("throughput", what, round(ratio, 3), "x", "training images/s", ">= 1.0", met)]
    if rss is not None:
        mib = {k: v / 1024 for k, v in rss.items() if k.endswith("_kib")}
        total = mib["vmhwm_kib"] + mib["workers_kib"]
        print(f"peak memory of a 1-epoch pipeline.cli.train run ({rss['wall']:.1f} s, "
              f"batch sizes {m['memory_sizes']}): "
              f"{total:.0f} MiB = training process VmHWM {mib['vmhwm_kib']:.0f} + loader workers' private peak "
              f"{mib['workers_kib']:.0f}; getrusage, misleading: RUSAGE_SELF {mib['self_kib']:.0f} (spawned from a "
              f"process at VmHWM {mib['spawner_kib']:.0f}), RUSAGE_CHILDREN {mib['children_kib']:.0f} (largest "
              "worker incl. pages shared with its parent)")  # fmt: skip
        what = (
            f"{family}: peak memory of a 1-epoch pipeline-train run: training process VmHWM "
            f"({mib['vmhwm_kib']:.0f}) + loader workers' private peak ({mib['workers_kib']:.0f})"
        )
        rows.append(harness.row("throughput", what, round(total, 1), "MiB"))
    return rows


def main() -> None:
    parser = harness.arguments(__doc__)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--warm", type=int, default=1, help="untimed epochs before the timed ones")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (= training repeats)")
    parser.add_argument("--size-every", type=int, help="data.size_every (default: the experiment's)")
    parser.add_argument("--train-batches", type=int, default=3, help="batches per epoch the training runs (0: all)")
    parser.add_argument("--sample", type=float, default=0.1, help="seconds between samples of the workers' memory")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs of pipeline.cli.train")
    args = harness.parse(parser)
    harness.quiet_lightning()
    begun, rows = time.time(), []
    here = Path.cwd()
    with harness.project(prefix="throughput-") as project:
        workdir, env = project.root, project.env
        os.chdir(workdir)  # `${pipeline.cwd:}` and anything relative land in the scratch dir
        try:
            for family in args.families.split(","):
                started = time.time()
                result = measure(family, args, workdir)
                gc.collect()
                rss = None if args.no_memory else peak_memory(family, args, workdir, env)
                rows += report(family, result, rss)
                print(f"({family}: {time.time() - started:.0f} s)", flush=True)
        finally:
            os.chdir(here)
    print(f"\ntotal wall time {time.time() - begun:.0f} s")
    harness.write_summary(args.summary, rows)


if __name__ == "__main__":
    main()
