"""`pipeline-report`: the runs of an experiment or of one sweep, ranked by a metric, as a table, CSV and a plot.

Reads any MLflow store through `MlflowClient` only (the project's SQLite file, another one, a tracking server),
so the same code serves `sqlite:///…` and `http://…`. A plain argparse CLI: it composes no training config and
imports neither torch nor Lightning, so it answers in the time MLflow takes to import.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pipeline.cli import CONF_DIR
from pipeline.metrics.monitor import monitor_mode
from pipeline.tracking import store

TAG = "pipeline."
RUN_DIR = "<run dir>"


class ReportError(ValueError):
    """Something the user asked for that the store does not have; the message says what is there instead."""


@dataclass
class Row:
    """One listed run: its best and last value of the metric (None when it never logged it), duration in s."""

    run: Run
    best: float | None
    last: float | None
    duration_s: float
    rank: int | None = None


def default_store() -> tuple[str, str]:
    """The tracking URI and experiment `pipeline-train` uses when started here: conf/logger/mlflow.yaml, resolved.

    `paths.root_dir` is the directory the command runs in (`${pipeline.cwd:}` in a training), so the default
    store is `./outputs/mlflow.db` unless MLFLOW_TRACKING_URI is set (the config's own `oc.env` decides that).
    """
    cfg = OmegaConf.create({"paths": OmegaConf.load(Path(CONF_DIR) / "paths" / "default.yaml"),
                            "logger": OmegaConf.load(Path(CONF_DIR) / "logger" / "mlflow.yaml")})  # fmt: skip
    cfg.paths.root_dir = os.getcwd()
    return str(cfg.logger.tracking_uri), str(cfg.logger.experiment_name)


def connect(uri: str) -> MlflowClient:
    """A client of an existing store: an unreachable server or a missing SQLite file is an error, never a new store."""
    reason = store.unreachable(uri)
    if reason is not None:
        raise ConnectionError(f"MLflow tracking server {uri} is not reachable ({reason}).")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ReportError(f"No MLflow store at {uri.removeprefix('sqlite:///')}: run from the project root "
                          "(its outputs/mlflow.db), or pass --tracking-uri / set MLFLOW_TRACKING_URI.")  # fmt: skip
    return store.client(uri)


def _all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    """Every active run matching the filter, all pages, oldest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, order_by=["attributes.start_time ASC"],
                                  page_token=token)  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"No experiment '{name}' in {client.tracking_uri} (experiments: {', '.join(names)}).")
    return experiment.experiment_id


def _parent(client: MlflowClient, sweep: str, experiment: str | None) -> Run:
    """The sweep's parent run, by run id or by run name (`sweep-<time>`)."""
    try:
        return client.get_run(sweep)
    except MlflowException:
        pass  # not a run id: look it up as a name
    ids = [_experiment(client, experiment)] if experiment else [e.experiment_id for e in client.search_experiments()]
    found = _all_runs(client, ids, f"attributes.run_name = '{sweep}'")
    if len(found) == 1:
        return found[0]
    if found:
        raise ReportError(f"{len(found)} runs are named '{sweep}': pass one's run id "
                          f"({', '.join(r.info.run_id for r in found)}).")  # fmt: skip
    parents = _all_runs(client, ids, f"tags.`{TAG}sweep.role` = 'parent'")[-10:]
    known = ", ".join(f"{r.info.run_name} ({r.info.run_id})" for r in reversed(parents)) or "none"
    raise ReportError(f"No run with id or name '{sweep}' in {client.tracking_uri} (latest sweeps: {known}).")


def select_runs(client: MlflowClient, experiment: str | None, sweep: str | None) -> tuple[str, list[Run], Run | None]:
    """(what was selected, in words; its runs; the sweep's parent run or None).

    A sweep's runs are the parent's children (`mlflow.parentRunId`); an experiment's are its trainings, without
    sweep parents (their only metric repeats the best child's) and `pipeline-eval` runs.
    """
    if sweep is not None:
        parent = _parent(client, sweep, experiment)
        exp_id = parent.info.experiment_id
        runs = _all_runs(client, [exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        name = client.get_experiment(exp_id).name
        if not runs:
            raise ReportError(f"Run {parent.info.run_name} ({parent.info.run_id}) has no child runs: not a sweep's "
                              "parent run (pass the one named sweep-<time>).")  # fmt: skip
        return f"sweep {parent.info.run_name} (experiment {name})", runs, parent
    assert experiment is not None  # report() names one when no sweep is given
    runs = [
        r
        for r in _all_runs(client, [_experiment(client, experiment)])
        if r.data.tags.get(f"{TAG}sweep.role") != "parent" and f"{TAG}kind" not in r.data.tags
    ]
    if not runs:
        raise ReportError(f"Experiment '{experiment}' in {client.tracking_uri} has no training runs.")
    return f"experiment {experiment}", runs, None


def choose_metric(runs: list[Run], parent: Run | None, requested: str | None) -> str:
    """The metric to rank by: the one asked for, else the sweep's or the runs' `model.monitor`, else the first
    `best/<metric>` or `val/` metric; an unknown one is an error that lists what the runs logged."""
    available = sorted({k for r in runs for k in r.data.metrics})
    monitors = Counter(r.data.params["model.monitor"] for r in runs if "model.monitor" in r.data.params)
    if requested is None and parent is not None:
        requested = parent.data.tags.get(f"{TAG}sweep.monitor")
    if requested is None and monitors:
        requested = monitors.most_common(1)[0][0]
    if requested is None:
        best = [k.removeprefix("best/") for k in available if k.startswith("best/") and k[5:] in available]
        requested = next(iter(best + [k for k in available if k.startswith("val/")]), None)
    if requested is None or requested not in available:
        what = f"No run logged metric '{requested}'" if requested else "No metric to rank by"
        raise ReportError(f"{what}; available metrics: {', '.join(available) or 'none'}.")
    return requested


def rank_runs(client: MlflowClient, runs: list[Run], metric: str) -> tuple[list[Row], int]:
    """Rows best first by each run's best value over its history (highest, or lowest for a loss); runs without a
    value follow. Finished runs that never logged the metric are other kinds of runs: left out, and counted."""
    mode, now = monitor_mode(metric), time.time() * 1000
    rows, left_out = [], 0
    for run in runs:
        history = client.get_metric_history(run.info.run_id, metric) if metric in run.data.metrics else []
        values = [m.value for m in history if math.isfinite(m.value)]
        if not values and run.info.status == "FINISHED":
            left_out += 1
            continue
        best = (max if mode == "max" else min)(values) if values else None
        end = run.info.end_time or now  # a running run: its time so far
        rows.append(Row(run, best, run.data.metrics.get(metric), (end - run.info.start_time) / 1000))
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0, r.run.info.start_time))
    for i, row in enumerate(r for r in rows if r.best is not None):
        row.rank = i + 1
    return rows, left_out


def differing_params(runs: list[Run]) -> list[str]:
    """Param keys whose values differ between the runs, each run's own directory aside (`paths.output_dir`, its
    checkpoint folder, … differ in every run without being a setting)."""

    def settings(run: Run) -> dict[str, str]:
        run_dir = run.data.tags.get(f"{TAG}run_dir")
        return {k: v.replace(run_dir, RUN_DIR) if run_dir else v for k, v in run.data.params.items()}

    values = [settings(r) for r in runs]
    keys = sorted({k for v in values for k in v})
    return [k for k in keys if len({v.get(k) for v in values}) > 1]


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m {sec:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _cells(row: Row, params: list[str]) -> list[str]:
    info = row.run.info
    return [str(row.rank or "—"), info.run_name, info.status, _duration(row.duration_s), _number(row.best),
            _number(row.last), *(row.run.data.params.get(k, "—") for k in params)]  # fmt: skip


def _headers(metric: str, params: list[str]) -> list[str]:
    return ["rank", "run", "status", "duration", f"best {metric}", f"last {metric}", *params]


def print_table(rows: list[Row], params: list[str], metric: str, caption: str) -> None:
    """A rich table on stdout, as wide as it needs when stdout is not a terminal (no cut cells in a file)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Runs by best {metric}", caption=caption)
    for i, header in enumerate(_headers(metric, params)):
        table.add_column(header, justify="right" if i in (0, 3, 4, 5) else "left", overflow="fold")
    for row in rows:
        table.add_row(*_cells(row, params))
    console = Console()
    if not console.is_terminal:
        wide = console.options.update_width(10_000)  # measured against 80 columns, the table would be squeezed
        console = Console(width=max(80, console.measure(table, options=wide).maximum))
    console.print(table)


def markdown(rows: list[Row], params: list[str], metric: str) -> str:
    """A GitHub table (for a pull request)."""
    align = ["---:", "---", "---", "---:", "---:", "---:", *["---"] * len(params)]
    lines = [_headers(metric, params), align, *(_cells(r, params) for r in rows)]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines) + "\n"


def csv_text(rows: list[Row], params: list[str], metric: str) -> str:
    """Every listed run with its run id, start time, duration in seconds, full-precision values and params."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "run_id", "run", "status", "start_time", "duration_s", f"best {metric}",
                     f"last {metric}", *params])  # fmt: skip
    for row in rows:
        info = row.run.info
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(info.start_time / 1000))
        writer.writerow([row.rank or "", info.run_id, info.run_name, info.status, start, round(row.duration_s, 1),
                         "" if row.best is None else repr(row.best), "" if row.last is None else repr(row.last),
                         *(row.run.data.params.get(k, "") for k in params)])  # fmt: skip
    return out.getvalue()


def _latest_per_step(history: list[Metric]) -> dict[int, float]:
    """{step: value}, the last logged value at each step (a resumed run logs the steps it trains again twice)."""
    return {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}


def plot(client: MlflowClient, rows: list[Row], metric: str, path: Path) -> None:
    """The metric's history of each run in `rows` as a PNG: against the epoch when each logged value belongs to its
    own epoch (Lightning's `epoch` metric at the same step), else against the logged step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves, by_epoch = [], True
    for row in rows:
        values = _latest_per_step(client.get_metric_history(row.run.info.run_id, metric))
        epochs = _latest_per_step(client.get_metric_history(row.run.info.run_id, "epoch"))
        mapped = [epochs.get(step) for step in values]
        by_epoch &= None not in mapped and len(set(mapped)) == len(mapped)
        curves.append((row, list(values), list(values.values()), mapped))
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for row, steps, values, epochs in curves:
        # Lightning counts epochs from 0; the value logged in epoch 0 is the first epoch's
        xs = [e + 1 for e in epochs] if by_epoch else steps
        axes.plot(xs, values, marker="o", markersize=3, label=f"{row.rank}. {row.run.info.run_name} ({row.best:.4g})")
    axes.set_xlabel("epoch (first = 1)" if by_epoch else "step (as logged: optimizer steps)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per {'epoch' if by_epoch else 'step'}, top {len(rows)} runs (legend: best value)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline-report", description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./outputs/mlflow.db)")
    parser.add_argument("--experiment", help="experiment name (default: the training's, conf/logger/mlflow.yaml)")
    parser.add_argument("--sweep", help="a sweep's parent run: its id or name (sweep-<time>); lists its children")
    parser.add_argument("--metric", help="rank by this metric (default: the runs' model.monitor)")
    parser.add_argument("--top", type=int, default=5, help="runs in the plot (default 5)")
    parser.add_argument("--format", choices=["table", "markdown", "csv"], default="table", help="stdout format")
    parser.add_argument("--csv", type=Path, help="CSV file to write (default: outputs/reports/<selection>.csv)")
    parser.add_argument("--plot", type=Path, help="PNG file to write (default: outputs/reports/<selection>.png)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be at least 1 (got {args.top})")
    return args


def report(args: argparse.Namespace) -> None:
    """Select, rank and print the runs; write the CSV and the plot of the top runs."""
    default_uri, default_experiment = default_store()
    uri = args.tracking_uri or default_uri
    client = connect(uri)
    # A sweep is found in any experiment unless one is named; a listing defaults to the training's experiment.
    experiment = args.experiment or (None if args.sweep else default_experiment)
    label, runs, parent = select_runs(client, experiment, args.sweep)
    metric = choose_metric(runs, parent, args.metric)
    rows, left_out = rank_runs(client, runs, metric)
    if not rows:
        raise ReportError(f"No run of {label} has a finite {metric} ({left_out} finished runs without one).")
    params = differing_params([r.run for r in rows])
    order = "highest" if monitor_mode(metric) == "max" else "lowest"
    caption = f"{len(rows)} runs of {label} in {uri}; best {metric} over each run's history, {order} first"
    if args.format == "table":
        print_table(rows, params, metric, caption)
    else:
        print(markdown(rows, params, metric) if args.format == "markdown" else csv_text(rows, params, metric), end="")
    if left_out:
        print(f"Left out {left_out} finished runs that never logged {metric}.", file=sys.stderr)
    name = parent.info.run_name if parent else f"experiment-{experiment}"
    stem = re.sub(r"[^\w.-]+", "_", name)  # an experiment may be named "/a/b"
    csv_path = args.csv or Path("outputs", "reports", f"{stem}.csv")
    plot_path = args.plot or Path("outputs", "reports", f"{stem}.png")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text(csv_text(rows, params, metric))
    ranked = [r for r in rows if r.rank is not None][: args.top]
    plot(client, ranked, metric, plot_path)
    print(f"Wrote {csv_path} ({len(rows)} runs) and {plot_path} (top {len(ranked)}).", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console entry point `pipeline-report`: errors a user can cause end in one line and exit status 1."""
    args = parse_args(argv)
    try:
        report(args)
    except (ReportError, ConnectionError, MlflowException) as err:
        message = err.message if isinstance(err, MlflowException) else str(err)
        print(f"error: {message.splitlines()[0] if message else type(err).__name__}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
