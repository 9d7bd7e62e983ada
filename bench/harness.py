"""The harness the scripts in bench/ share: wall timing, repeats in a turning order, medians of per-repeat ratios
(ours / reference), a fresh project directory, the config and task as `pipeline-train` builds them, a common
argument parser, and the summary rows that `bench/run_all.py` collects into one table.

A script in bench/ imports it as `harness` (Python puts a script's own folder first on sys.path); the scripts in
bench/investigations/ put bench/ there first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, "-m", "pipeline.cli.train"]


# ---- timing and ratios ----------------------------------------------------------------------------------------------


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """`call()`'s result and its wall seconds (perf_counter)."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def run_timed(command: Sequence[str], cwd: Path, env: dict[str, str] | None = None, quiet: bool = True) -> float:
    """Wall seconds of one process, which must succeed; its output is dropped when `quiet`."""
    out = subprocess.DEVNULL if quiet else None
    start = time.perf_counter()
    subprocess.run(list(command), cwd=cwd, env=env, check=True, stdout=out, stderr=out)
    return time.perf_counter() - start


def seconds_after_warmup(call: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls of `call`, after one untimed call."""
    call()
    return [timed(call)[1] for _ in range(repeats)]


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading the clock: `torch.cuda.synchronize` on CUDA (kernels run asynchronously), nothing
    on CPU."""
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else lambda: None


def rounds(steps: dict[Any, Callable[[dict], Any]], repeats: int, device: str = "cpu") -> tuple[dict, dict]:
    """Seconds of each step in each of `repeats` rounds after one untimed round, and the last round's state.

    Every round runs all steps in order (each reads what the earlier ones left in `state` and stores its own
    result there under its name), so load that drifts during the run touches every step alike.
    """
    sync = synchronizer(device)
    seconds: dict[Any, list[float]] = {name: [] for name in steps}
    state: dict[Any, Any] = {}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            state[name] = step(state)
            sync()
            if round_:
                seconds[name].append(time.perf_counter() - start)
    return seconds, state


def turned(items: Sequence[T], repeat: int) -> list[T]:
    """`items` rotated by `repeat`, so that over the repeats no item always runs first (cold caches, allocator)."""
    shift = repeat % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def alternate(sides: dict[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Each side's results over `repeats` repeats; every repeat calls all sides, in an order turned by one each
    repeat, so that load drifting during the run touches every side alike and repeat k's results are paired."""
    results: dict[str, list[T]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name in turned(list(sides), repeat):
            results[name].append(sides[name]())
    return results


def median(values: Sequence[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def ratios(ours: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Each repeat's ours / reference (the two measured in the same repeat, so under the same machine state)."""
    return [o / r for o, r in zip(ours, reference, strict=True)]


def median_ratio(ours: Sequence[float], reference: Sequence[float]) -> float:
    """The median of the per-repeat ratios ours / reference (each ratio pairs runs under the same machine state, so
    load that drifts between repeats moves it less than a ratio of medians)."""
    return median(ratios(ours, reference))


# ---- a fresh project directory --------------------------------------------------------------------------------------


class Project:
    """A project directory with `outputs/`, where `pipeline-train` keeps its runs and the MLflow SQLite store.

    The store is created and migrated by the first command that opens it, as for a new user: timings of that
    command include it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "outputs").mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        """The MLflow store of the project's runs."""
        return f"sqlite:///{self.root / 'outputs' / 'mlflow.db'}"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with the project's store as MLFLOW_TRACKING_URI."""
        return {**os.environ, "MLFLOW_TRACKING_URI": self.uri}


@contextlib.contextmanager
def project(prefix: str = "bench-") -> Iterator[Project]:
    """A fresh project directory in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Project(Path(tmp))


def latest_run(uri: str) -> Any:
    """The run started last in the store's `pipeline` experiment (the one a bench just trained)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pipeline")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return run


def history(uri: str, run_id: str, key: str) -> list[Any]:
    """The logged values of metric `key` in the run, in step order (MLflow `Metric`s: value, step, timestamp)."""
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


# ---- the config and task as pipeline-train builds them ------------------------------------------------------------


def train_config(*overrides: str) -> Any:
    """The training config composed from the packaged conf/ as `pipeline-train` would (no Hydra run)."""
    from hydra import compose, initialize_config_dir

    import pipeline.training.resolvers  # noqa: F401 (registers the ${pipeline.*} resolvers the configs use)
    from pipeline.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def task_and_data(cfg: Any) -> tuple[Any, Any]:
    """The seeded task and its DataModule set up for fitting, without a Trainer; a detector gets the k-means anchors
    `DetectionTask.setup` would give it."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    from pipeline.data.anchor_cache import cached_kmeans_anchors
    from pipeline.tasks.detection import DetectionTask

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task = instantiate(cfg.model)
    data = instantiate(cfg.data, targets=task.TARGETS, parallel_jobs=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the data check's tables
        data.prepare_data()
        data.setup("fit")
    if isinstance(task, DetectionTask):  # k-means over the training boxes, cached on disk as the pipeline caches them
        sizes = torch.from_numpy(data.train_box_sizes(task.hparams.input_size))
        found = cached_kmeans_anchors(sizes, 3 * task.net.num_anchors, task.hparams.seed, task.hparams.anchor_cache)
        task.slots.set_anchors([[round(float(v), 1) for v in wh] for wh in found])
    return task, data


def quiet_lightning() -> None:
    """Silence Lightning's warnings that a bench triggers on purpose (no Trainer for self.log, few loader workers)."""
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


# ---- arguments and summary rows -----------------------------------------------------------------------------------


def arguments(doc: str, *, repeats: int | None = None, summary: bool = True, device: bool = False,
              threads: bool = False) -> argparse.ArgumentParser:  # fmt: skip
    """The parser every bench starts from: `doc` as its help; `--repeats` (when given a default), `--summary`,
    `--device` and `--threads` where the bench has them."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    if summary:
        parser.add_argument("--summary", help="write the headline rows as JSON to this file (bench/run_all.py)")
    if device:
        parser.add_argument("--device", default="cpu")
    if threads:
        parser.add_argument("--threads", type=int, help="pin torch.set_num_threads (default: torch's own choice)")
    return parser


def add_training(parser: argparse.ArgumentParser) -> None:
    """The options of a bench that runs a whole training: `--epochs` and extra Hydra overrides."""
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs (default: config)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of the training")


def training_overrides(args: argparse.Namespace, *base: str) -> tuple[list[str], int]:
    """The overrides `add_training`'s options ask for, and the epochs the training config composed with `base` and
    them runs."""
    overrides = list(args.overrides) + ([f"trainer.max_epochs={args.epochs}"] if args.epochs else [])
    return overrides, int(train_config(*base, *overrides).trainer.max_epochs)


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments; `--threads`, where given, pins torch's intra-op threads before anything is timed."""
    args = parser.parse_args()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args


def row(bench: str, what: str, value: float, unit: str, reference: str | None = None, target: str | None = None,
        met: bool | None = None) -> dict:  # fmt: skip
    """One summary row: `value` in `unit` ("x" for a ratio to `reference`), the `target` and whether it is met."""
    return {"bench": bench, "what": what, "value": float(value), "unit": unit, "reference": reference,
            "target": target, "met": met}  # fmt: skip


def write_summary(path: str | Path | None, rows: list[dict]) -> None:
    """Write the rows as JSON to `path` (nothing when no path was asked for)."""
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))


def max_time(seconds: float) -> str:
    """Lightning's max_time string DD:HH:MM:SS for a budget in seconds (at least one second)."""
    total = max(1, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"
