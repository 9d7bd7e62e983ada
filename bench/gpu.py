"""GPU training: images/s and peak memory per family, bf16 autocast, channels_last and torch.compile against fp32;
host synchronisations inside a training step.

For each family (FCN `experiment=shapes_fcn`, detector `shapes_yolo`, instance `shapes_instance`), in one process:
the task's training step exactly as Lightning runs it without the loop (`training_step`: forward and the task's
own loss; backward; `zero_grad`; the configured optimizer's `step`; the detector's k-means anchors set as
`DetectionTask.setup` does), on `--batches` batches (batch size as configured, 16) taken beforehand from the
experiment's DataModule at one training size (`--size`, 128 px: one shape, so that torch.compile compiles once)
and moved to the device before the clock starts. Per variant a fresh task (same seed) and optimizer, `--warmup`
untimed steps (the compile happens there; their seconds are shown), then `--repeats` windows of `--steps` steps,
each between `torch.cuda.synchronize()` calls; images/s is the median window's, relative to fp32 of the same family.
Variants (`--variants`):
- fp32: the reference (torch's defaults: TF32 in cuDNN convolutions on, in matmuls off; cudnn.benchmark off,
  as under Lightning's default `benchmark=None`);
- bf16: `torch.autocast(dtype=torch.bfloat16)` around `training_step` (what `precision=bf16-mixed` does);
- channels_last, bf16+channels_last: model and input images in `torch.channels_last`;
- fp32+compile, bf16+compile: `task.net = torch.compile(task.net)` (the loss stays eager); skipped where the same
  precision failed eagerly (the loss is not compiled, so it would fail the same way after the compile).
Eager variants of all families run first, then the compile variants, each one only if the time so far plus the
longest compile variant yet (60 s before the first) stays within `--time-limit` (default 200 s from the process
start, so the whole run fits in 4 minutes); a skipped one is printed as skipped. Peak memory is
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` per variant (weights, gradients, optimizer state,
the prepared batches and the activations). On CUDA, after the first variant's timed windows, one more step runs
under `torch.cuda.set_sync_debug_mode("warn")`: every synchronising CUDA call inside it (the target is none apart
from logging; here nothing is logged) is counted and its source line printed.

A variant whose step raises (e.g. a loss that does not run under autocast) is reported as FAILED with its error and
the others still run. On `--device cpu` it is a smoke test, not the measurement: the compile variants are skipped
(inductor's C++ build takes minutes on 2 cores), peak memory and the sync count are not measured, `--size`
defaults to 64 px and `--warmup` and `--repeats` to 1; the table then says that the GPU figures are still to be
measured.

    python bench/gpu.py                                   # on a CUDA machine: the full table, < 4 min on an H200
    python bench/gpu.py --device cpu --steps 2            # CPU smoke test: ~1 min on 2 cores
    python bench/gpu.py --variants fp32,bf16 --families fcn --steps 50
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import harness

T0 = time.monotonic()
FAMILIES = {"fcn": "shapes_fcn", "detector": "shapes_yolo", "instance": "shapes_instance"}
# name -> (bf16 autocast, channels_last, torch.compile of the net)
VARIANTS = {
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "channels_last": (False, True, False),
    "bf16+channels_last": (True, True, False),
    "bf16+compile": (True, False, True),
    "fp32+compile": (False, False, True),
}


def compose_cfg(family: str, args: argparse.Namespace, workdir: Path) -> Any:
    """The family's training config with a small shapes set at one size, rooted in `workdir`."""
    return harness.train_config(
        f"experiment={FAMILIES[family]}", f"data.spec.num_train={args.num_train}", "data.spec.num_val=8",
        f"data.train_sizes=[{args.size}]", "data.num_workers=0", f"paths.root_dir={workdir}",
        f"paths.output_dir={workdir / 'outputs' / family}")  # fmt: skip


def prepare(cfg: Any, count: int) -> tuple[list[dict], Any]:
    """`count` training batches (CPU) of the family's DataModule and the detector's anchors (None otherwise)."""
    from pipeline.tasks.detection import DetectionTask

    task, data = harness.task_and_data(cfg)
    anchors = task.slots.anchors.reshape(-1, 2).tolist() if isinstance(task, DetectionTask) else None
    batches = []
    for batch in data.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    if len(batches) < count:
        sys.exit(f"the train loader gave {len(batches)} batches, {count} asked for: raise --num-train")
    return batches, anchors


def build(cfg: Any, anchors: Any, device: Any, channels_last: bool, compiled: bool) -> tuple[Any, Any]:
    """A fresh task (seeded) on `device` in the variant's memory format, optionally its net compiled; its optimizer."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task = instantiate(cfg.model)
    if anchors is not None:
        task.slots.set_anchors(anchors)
    task.to(device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    if compiled:
        task.net = torch.compile(task.net)
    optimizers = task.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    task.train()
    return task, optimizer


def on_device(batches: list[dict], device: Any, channels_last: bool) -> list[dict]:
    """The batches moved to `device` (images in channels_last when asked)."""
    import torch
    from lightning_fabric.utilities.apply_func import move_data_to_device

    moved = [move_data_to_device(b, device) for b in batches]
    if channels_last:
        for batch in moved:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return moved


def count_syncs(step: Any) -> tuple[int, Counter]:
    """Synchronising CUDA calls in one `step()` under sync debug mode "warn": how many, and where (file:line)."""
    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter()
    for w in syncs:
        path = Path(w.filename)
        where[f"{path.relative_to(harness.ROOT) if path.is_relative_to(harness.ROOT) else path.name}:{w.lineno}"] += 1
    return len(syncs), where


def measure(cfg: Any, batches: list[dict], anchors: Any, variant: str, args: argparse.Namespace, syncs: bool) -> dict:
    """images/s of each timed window, warm-up seconds, peak MiB (CUDA) and, with `syncs`, the host syncs of a step."""
    import torch

    begun = time.perf_counter()
    bf16, channels_last, compiled = VARIANTS[variant]
    device = torch.device(args.device)
    task, optimizer = build(cfg, anchors, device, channels_last, compiled)
    synchronize = harness.synchronizer(args.device)
    ready = on_device(batches, device, channels_last)
    images = len(ready[0]["image"])
    counter = itertools.count()

    def step() -> None:
        index = next(counter)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = task.training_step(ready[index % len(ready)], index)  # self.log is a no-op without a trainer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize()
    result: dict[str, Any] = {"warm": time.perf_counter() - start, "rates": []}
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize()
        result["rates"].append(args.steps * images / (time.perf_counter() - start))
    result["peak"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if syncs:
        result["syncs"] = count_syncs(step)
    result["seconds"] = time.perf_counter() - begun
    return result


def release(device: str, compiled: bool) -> None:
    """Free what the last variant left: its objects, compiled graphs and cached CUDA blocks."""
    import torch

    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    """The accelerator's name (CUDA) or the CPU's with its thread count."""
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def report(results: dict, families: list[str], variants: list[str], args: argparse.Namespace, name: str) -> None:
    """Print the table and the host syncs."""
    import torch

    cuda = args.device.startswith("cuda")
    settings = (f"cudnn.benchmark {torch.backends.cudnn.benchmark}, TF32 conv {torch.backends.cudnn.allow_tf32} "
                f"matmul {torch.backends.cuda.matmul.allow_tf32}")  # fmt: skip
    print(f"\n=== {name}: torch {torch.__version__}" + (f", CUDA {torch.version.cuda}, {settings}" if cuda else "")
          + f"; batch {args.batch}, {args.size} px, median of {args.repeats} window(s) of {args.steps} steps after "
          f"{args.warmup} warm-up ===")  # fmt: skip
    if not cuda:
        print("CPU smoke test: the GPU figures are still to be measured (compile variants skipped).")
    print(f"{'family':<10}{'variant':<20}{'img/s':>10}{'x fp32':>8}{'ms/step':>9}{'peak MiB':>10}{'warm-up s':>11}")
    for family in families:
        base = results[family].get("fp32")
        for variant in variants:
            r = results[family].get(variant)
            if r is None or "rates" not in r:
                why = "not run" if r is None else f"skipped: {r['skipped']}" if "skipped" in r else "FAILED"
                print(f"{family:<10}{variant:<20}  {why}")
                continue
            rate = harness.median(r["rates"])
            ratio = f"{rate / harness.median(base['rates']):.3f}" if base and "rates" in base else "-"
            peak = f"{r['peak']:.0f}" if r["peak"] is not None else "-"
            print(f"{family:<10}{variant:<20}{rate:>10.1f}{ratio:>8}{1000 * args.batch / rate:>9.2f}{peak:>10}"
                  f"{r['warm']:>11.2f}")  # fmt: skip
    failures = {(f, v): r["failed"] for f in families for v, r in results[f].items() if "failed" in r}
    for (family, variant), error in failures.items():
        print(f"FAILED {family} {variant}: {error}")
    if cuda:
        print("\nhost synchronisations in one training step (torch.cuda.set_sync_debug_mode('warn')):")
        for family in families:
            found = next((r["syncs"] for r in results[family].values() if "syncs" in r), None)
            if found is None:
                continue
            count, where = found
            shown = ", ".join(f"{k} x{v}" for k, v in where.most_common(8)) + (" …" if len(where) > 8 else "")
            print(f"  {family:<10}{count:>4}   {shown}")


def summary_rows(results: dict, families: list[str], variants: list[str], args: argparse.Namespace, name: str) -> list:
    """fp32 images/s, each other variant's ratio to it and fp32/bf16 peak MiB, per family."""
    cuda = args.device.startswith("cuda")
    on = f"on {name}" if cuda else f"on {name}: CPU smoke, GPU still to be measured"
    rows = []
    for family in families:
        base = results[family].get("fp32")
        if not base or "rates" not in base:
            continue
        fp32 = harness.median(base["rates"])
        syncs = f", {base['syncs'][0]} host syncs in a step" if "syncs" in base else ""
        rows.append(harness.row("gpu", f"{FAMILIES[family]} training fp32 {on}{syncs}", fp32, "img/s"))
        for variant in variants:
            r = results[family].get(variant)
            if variant == "fp32" or r is None or "rates" not in r:
                continue
            ratio = harness.median(r["rates"]) / fp32
            rows.append(harness.row("gpu", f"{FAMILIES[family]} training {variant} {on}", ratio, "x", "fp32"))
        for variant in ("fp32", "bf16"):
            r = results[family].get(variant)
            if cuda and r is not None and r.get("peak") is not None:
                rows.append(harness.row("gpu", f"{FAMILIES[family]} peak memory {variant} {on}", r["peak"], "MiB"))
    return rows


def main() -> None:
    parser = harness.arguments(__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--variants", default="fp32,bf16,channels_last,bf16+channels_last,fp32+compile,bf16+compile")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window")
    parser.add_argument("--repeats", type=int, help="timed windows per variant (default 3; 1 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant (default 3; 1 on CPU)")
    parser.add_argument("--batches", type=int, default=4, help="distinct prepared batches, cycled")
    parser.add_argument("--num-train", type=int, default=64, help="training images to take the batches from")
    parser.add_argument("--size", type=int, help="the one training size in px (default 128; 64 on CPU)")
    parser.add_argument("--time-limit", type=float, default=200.0, help="no compile variant starts after this (s)")
    args = harness.parse(parser)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu for the smoke test (GPU figures still to be measured)")
    args.repeats = args.repeats or (3 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.size = args.size or (128 if cuda else 64)
    families, variants = args.families.split(","), args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(families) - set(FAMILIES))
    if unknown:
        sys.exit(f"unknown variant(s)/family(ies) {unknown}: choose from {list(VARIANTS)} / {list(FAMILIES)}")
    harness.quiet_lightning()
    name = device_name(args.device)
    print(f"device: {name}", flush=True)
    eager = [v for v in variants if not VARIANTS[v][2]]
    compiled = [v for v in variants if VARIANTS[v][2]]
    results: dict[str, dict[str, dict]] = {f: {} for f in families}
    with harness.project(prefix="bench-gpu-") as project:
        prepared = {}
        for family in families:
            cfg = compose_cfg(family, args, project.root)
            args.batch = cfg.data.batch_size
            prepared[family] = (cfg, *prepare(cfg, args.batches))
        longest: float | None = None  # seconds of the longest compile variant so far
        for variant in eager + compiled:
            for family in families:
                if VARIANTS[variant][2]:
                    if not cuda:
                        results[family][variant] = {"skipped": "CPU"}
                        continue
                    eager_twin = variant.removesuffix("+compile")
                    if "failed" in results[family].get(eager_twin, {}):
                        results[family][variant] = {"skipped": f"{eager_twin} failed eagerly"}
                        continue
                    if time.monotonic() - T0 + (longest or 60.0) > args.time_limit:
                        results[family][variant] = {"skipped": f"time limit {args.time_limit:g} s"}
                        continue
                cfg, batches, anchors = prepared[family]
                syncs = cuda and variant == (eager or compiled)[0]
                try:
                    results[family][variant] = r = measure(cfg, batches, anchors, variant, args, syncs)
                except RuntimeError as err:  # e.g. a loss that does not run under autocast: the others still run
                    results[family][variant] = {"failed": str(err).splitlines()[0]}
                    print(f"{family} {variant}: FAILED: {err}", flush=True)
                    continue
                finally:
                    release(args.device, VARIANTS[variant][2])
                if VARIANTS[variant][2]:
                    longest = max(longest or 0.0, r["seconds"])
                print(f"{family} {variant}: {harness.median(r['rates']):.1f} img/s, warm-up {r['warm']:.1f} s "
                      f"({time.monotonic() - T0:.0f} s so far)", flush=True)  # fmt: skip
    report(results, families, variants, args, name)
    print(f"\ntotal wall time {time.monotonic() - T0:.0f} s")
    harness.write_summary(args.summary, summary_rows(results, families, variants, args, name))


if __name__ == "__main__":
    main()
