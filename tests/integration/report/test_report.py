"""`pipeline-report` on a real 2-job sweep: the ranked table, markdown, CSV and plot, against values read with
MlflowClient, on the SQLite store and through a real `mlflow server`; its one-line errors."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.helpers import TINY, free_port, mlflow_server, project_dir, run_main, tracking_uri

pytestmark = pytest.mark.slow

LRS = ("0.001", "0.01")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> dict:
    """A finished sweep of two 2-epoch jobs that differ only in the learning rate, and what MLflow holds of it."""
    root = project_dir(tmp_path_factory.mktemp("report"), _migrated_store)
    run_main("train", "-m", f"model.optimizer.lr={','.join(LRS)}", *TINY, "trainer.max_epochs=2", cwd=root, check=True)
    client = MlflowClient(tracking_uri(root))
    (experiment,) = [e for e in client.search_experiments() if e.name == "pipeline"]
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.sweep.role` = 'parent'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # The reference: each child's best and last val/mIoU straight from its history, best (highest) first.
    expected = []
    for run in children:
        history = sorted(client.get_metric_history(run.info.run_id, "val/mIoU"), key=lambda m: m.step)
        assert len(history) == 2  # one value per epoch
        expected.append({"run": run, "best": max(m.value for m in history), "last": history[-1].value})
    expected.sort(key=lambda e: -e["best"])
    assert expected[0]["best"] != expected[1]["best"]  # otherwise the order would not test anything
    return {"root": root, "parent": parent, "expected": expected}


def _row_lines(text: str, expected: list[dict]) -> list[str]:
    """The output line of each expected run, in the order they appear."""
    names = [e["run"].info.run_name for e in expected]
    return [line for line in text.splitlines() if any(n in line for n in names)]


def test_the_table_ranks_the_sweep_by_its_monitor_and_shows_only_the_param_that_differs(sweep: dict):
    root, parent, expected = sweep["root"], sweep["parent"], sweep["expected"]

    # No --tracking-uri, no --metric: the project's store in ./outputs and the sweep's monitor (val/mIoU)
    proc = run_main("report", "--sweep", parent.info.run_name, cwd=root, check=True)

    lines = _row_lines(proc.stdout, expected)
    for rank, (line, e) in enumerate(zip(lines, expected, strict=True), start=1):
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        assert cells[:3] == [str(rank), e["run"].info.run_name, "FINISHED"]
        assert cells[4:6] == [f"{e['best']:.4g}", f"{e['last']:.4g}"]
        assert cells[6] == e["run"].data.params["model.optimizer.lr"]
    assert "best val/mIoU" in proc.stdout and "model.optimizer.lr" in proc.stdout
    # identical settings and the per-run directories (output dir, checkpoint folders) are not columns
    for same in ("data.batch_size", "model.monitor", "paths.output_dir", "logger.upload_dir", "seed"):
        assert same not in proc.stdout

    with open(root / "outputs" / "reports" / f"{parent.info.run_name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["rank", "run_id", "run", "status", "start_time", "duration_s", "best val/mIoU",
                             "last val/mIoU", "model.optimizer.lr"]  # fmt: skip
    for rank, (row, e) in enumerate(zip(rows, expected, strict=True), start=1):
        info = e["run"].info
        assert (row["rank"], row["run_id"], row["run"], row["status"]) == (str(rank), info.run_id, info.run_name,
                                                                           "FINISHED")  # fmt: skip
        assert float(row["best val/mIoU"]) == e["best"] and float(row["last val/mIoU"]) == e["last"]
        assert row["model.optimizer.lr"] == e["run"].data.params["model.optimizer.lr"]
        assert abs(float(row["duration_s"]) - (info.end_time - info.start_time) / 1000) <= 0.05
    assert sorted(r["model.optimizer.lr"] for r in rows) == sorted(LRS)

    with Image.open(root / "outputs" / "reports" / f"{parent.info.run_name}.png") as image:
        assert image.format == "PNG" and image.size == (700, 450)
        image.verify()


def test_markdown_is_a_github_table_in_the_same_order(sweep: dict, tmp_path: Path):
    root, parent, expected = sweep["root"], sweep["parent"], sweep["expected"]

    proc = run_main("report", "--sweep", parent.info.run_id, "--format", "markdown", "--csv", str(tmp_path / "r.csv"),
                    "--plot", str(tmp_path / "r.png"), cwd=root, check=True)  # fmt: skip

    lines = proc.stdout.splitlines()
    assert len(lines) == 2 + len(expected)
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["rank", "run", "status", "duration", "best val/mIoU", "last val/mIoU", "model.optimizer.lr"]
    assert re.fullmatch(r"\|( -{3,}:? \|){7}", lines[1])
    for line, e in zip(lines[2:], expected, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == e["run"].info.run_name and cells[4] == f"{e['best']:.4g}"
    assert (tmp_path / "r.csv").is_file() and (tmp_path / "r.png").is_file()


def test_a_tracking_server_gives_the_same_report(sweep: dict, tmp_path: Path):
    root, parent = sweep["root"], sweep["parent"]
    with mlflow_server(root) as server:
        files = ["--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")]
        proc = run_main("report", "--tracking-uri", server.uri, "--sweep", parent.info.run_name, "--format", "csv",
                        *files, cwd=root, check=True)  # fmt: skip

    assert proc.stdout == (root / "outputs" / "reports" / f"{parent.info.run_name}.csv").read_text()
    assert proc.stdout == (tmp_path / "r.csv").read_text()


def test_an_unknown_metric_is_one_line_listing_the_metrics_the_runs_logged(sweep: dict, tmp_path: Path):
    proc = run_main("report", "--sweep", sweep["parent"].info.run_id, "--metric", "val/nope", "--csv",
                    str(tmp_path / "r.csv"), cwd=sweep["root"])  # fmt: skip

    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: No run logged metric 'val/nope'; available metrics: ")
    available = line.split("available metrics: ", 1)[1].rstrip(".").split(", ")
    assert {"val/mIoU", "val/loss", "best/val/mIoU", "epoch", "train/loss_step"} <= set(available)
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "nope"], "error: No experiment 'nope' in sqlite:///"),
        (["--sweep", "sweep-nope"], "error: No run with id or name 'sweep-nope' in sqlite:///"),
        (["--tracking-uri", "sqlite:////nonexistent/mlflow.db"], "error: No MLflow store at /nonexistent/mlflow.db"),
        (["--tracking-uri", "http://127.0.0.1:{port}"], "error: MLflow tracking server http://127.0.0.1:"),
    ],
)
def test_what_is_not_there_is_one_line_and_exit_1(sweep: dict, args: list[str], message: str):
    args = [a.replace("{port}", str(free_port())) for a in args]

    proc = run_main("report", *args, cwd=sweep["root"])

    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith(message)
    if "--sweep" in args:  # the message names the sweeps there are
        assert sweep["parent"].info.run_name in line
    if "--experiment" in args:
        assert "(experiments: Default, pipeline)" in line
