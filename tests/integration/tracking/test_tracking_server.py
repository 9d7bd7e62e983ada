"""The tracking-server path: a real `mlflow server` on 127.0.0.1 receives the run, and its REST API lists it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    ROOT,
    TINY,
    MlflowServer,
    assert_checkpoints_uploaded,
    free_port,
    mlflow_server,
    run_dirs,
    run_main,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def server(workdir: Path) -> Iterator[MlflowServer]:
    with mlflow_server(workdir) as started:
        yield started


def _run_of(uri: str):
    """The one run of experiment `pipeline` in the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    return client, run


def _rest(uri: str, endpoint: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API (GET with query parameters in `endpoint`, POST with a JSON `body`)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    return json.load(urllib.request.urlopen(request))


def _git_out(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_a_sweep_on_a_server_gives_every_run_summary_and_system_metrics_a_dataset_input_and_source_tags(
    workdir: Path, server: MlflowServer
):
    """Issue 15.1, read back over REST: what the runs table can show without opening a run."""
    proc = run_main("train", "-m", "model.optimizer.lr=0.001,0.003", *TINY, "trainer.max_epochs=2",
                    "logger.system_metrics_s=1", cwd=workdir, tracking_uri=server.uri, check=True)  # fmt: skip
    # The parent's runs-table link sorts by the monitored metric, best first.
    assert "/runs?orderByKey=metrics.%60best%2Fval%2FmIoU%60&orderByAsc=false)" in proc.stdout
    uri = server.uri
    experiment = _rest(uri, "experiments/get-by-name?experiment_name=pipeline")["experiment"]["experiment_id"]
    runs = _rest(uri, "runs/search", {"experiment_ids": [experiment]})["runs"]
    tags_of = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    children = [(r, t) for r, t in zip(runs, tags_of, strict=True) if t.get("pipeline.sweep.role") != "parent"]
    assert len(children) == 2
    commit, dirty = _git_out("rev-parse", "HEAD"), bool(_git_out("status", "--porcelain"))
    digests = set()
    for run, tags in children:
        run_id = run["info"]["run_id"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        # Summary metrics, each against what the run's own history says.
        history = _rest(uri, f"metrics/get-history?run_id={run_id}&metric_key=val/mIoU")["metrics"]
        values = [m["value"] for m in sorted(history, key=lambda m: m["step"])]
        assert metrics["best/val/mIoU"] == max(values) and metrics["best/epoch"] == values.index(max(values))
        losses = _rest(uri, f"metrics/get-history?run_id={run_id}&metric_key=train/loss_epoch")["metrics"]
        assert metrics["summary/final_train_loss"] == max(losses, key=lambda m: m["step"])["value"]
        images = 16 * 2  # TINY: 16 training images, 2 epochs
        assert metrics["summary/images_per_s"] * metrics["summary/train_time_s"] == pytest.approx(images)
        assert 0 < metrics["summary/train_time_s"] < metrics["summary/wall_time_s"]
        assert metrics["summary/params"] > 1000
        # MLflow's system metrics, sampled every second while the run trained.
        assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
        # The dataset, once per split, with the same fingerprint in both runs (same files).
        inputs = run["inputs"]["dataset_inputs"]
        contexts = {i["tags"][0]["value"]: i["dataset"] for i in inputs}
        assert set(contexts) == {"train", "val"} and {d["name"] for d in contexts.values()} == {"shapes"}
        assert contexts["train"]["digest"] != contexts["val"]["digest"]
        assert json.loads(contexts["train"]["profile"])["images"] == 16
        digests.add((contexts["train"]["digest"], contexts["val"]["digest"]))
        # Source, git state, device and the config groups it was composed of.
        assert tags["mlflow.source.name"] == "pipeline-train" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] == commit
        assert tags["pipeline.git.dirty"] == str(dirty).lower()
        artifacts = {a["path"] for a in _rest(uri, f"artifacts/list?run_id={run_id}").get("files", [])}
        assert ("git" in artifacts) == dirty  # git/uncommitted.patch only when there is something uncommitted
        assert tags["pipeline.device"] == "cpu" and tags["pipeline.precision"] == "32-true"
        assert tags["pipeline.data"] == "shapes" and tags["pipeline.experiment"] == "shapes_fcn"
    assert len(digests) == 1


def test_unreachable_server_fails_in_seconds_before_training(workdir: Path):
    start = time.time()
    proc = run_main("train", *TINY, cwd=workdir, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    assert "is not reachable" in proc.stderr
    assert time.time() - start < 60


def _wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `ready()` until true; fail if the training process ends first or `timeout` s pass."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the training ended ({proc.returncode}) before {what}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.2)


def test_a_server_killed_and_restarted_mid_training_loses_no_metric_and_no_checkpoint(workdir: Path):
    """Epoch 0 reaches the server, which is then killed; epochs 1 and 2 train while it is down (held at epoch 3's
    start until it is back); nothing logged in between is lost, and the run ends FINISHED with its checkpoints."""
    epochs, steps_per_epoch = 4, 4  # TINY: 16 training images, batches of 4
    server = MlflowServer(workdir)
    server.start()
    gate = workdir / "gate"
    gate.mkdir()
    # Validation pictures every epoch: those of the epochs without a server must arrive too.
    overrides = [*TINY, f"trainer.max_epochs={epochs}", "+callbacks.gate._target_=tests.helpers.EpochGate",
                 f"+callbacks.gate.folder={gate}", "+callbacks.gate.epochs=[1,3]",
                 "callbacks.task_outbox.every_n_epochs=1"]  # fmt: skip
    # MLflow's own HTTP retries (minutes by default) made short, so a request the kill cuts off fails over to ours.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": server.uri,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip
    log = workdir / "train.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.train", *overrides], cwd=workdir, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            _wait_for("epoch 1", (gate / "at-1").exists, proc)
            client, run = _run_of(server.uri)
            first_val = lambda: client.get_metric_history(run.info.run_id, "val/mIoU")  # noqa: E731
            _wait_for("epoch 0's val/mIoU on the server", first_val, proc)
            server.kill()
            (gate / "go-1").touch()
            # Two epochs train while nobody answers: no upload sits on the training path.
            _wait_for("epoch 3 with the server down", (gate / "at-3").exists, proc, timeout=120)
            server.start()
            (gate / "go-3").touch()
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
        output = log.read_text()
        assert proc.returncode == 0, output[-6000:]
        assert "is not answering" in output and "is back after" in output
        client, run = _run_of(server.uri)
        assert run.info.status == "FINISHED"
        run_id = run.info.run_id
        val = client.get_metric_history(run_id, "val/mIoU")
        assert sorted({m.step for m in val}) == [steps_per_epoch * (e + 1) - 1 for e in range(epochs)]
        train_loss = client.get_metric_history(run_id, "train/loss_step")
        assert {m.step for m in train_loss} == set(range(epochs * steps_per_epoch))
        images = {a.path for a in client.list_artifacts(run_id, "val_images")}
        assert images == {f"val_images/epoch_{e:03d}.png" for e in range(epochs)}
        assert_checkpoints_uploaded(client, run_id, run_dirs(workdir)[0], workdir / "downloaded")
    finally:
        server.stop()
