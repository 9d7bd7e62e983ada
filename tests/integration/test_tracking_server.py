"""The tracking-server path: a real `mlflow server` on 127.0.0.1 receives the run, and its REST API lists it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, run_cli, run_dirs, tracking_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifact folder) that a test can kill and restart.

    `mlflow server` runs uvicorn as a child process: it gets its own process group, so a kill takes the whole
    server down (killing only the `mlflow` process leaves uvicorn serving). Job execution (seven huey consumers
    that the runs here never use) is off.
    """

    def __init__(self, workdir: Path) -> None:
        self.uri = f"http://127.0.0.1:{_free_port()}"
        self.store = workdir / "outputs" / "mlflow.db"  # the migrated copy from the workdir fixture
        self.artifacts = workdir / "server-artifacts"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        port = self.uri.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port,
             "--backend-store-uri", f"sqlite:///{self.store}", "--artifacts-destination", str(self.artifacts),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not start within 120 s")

    def kill(self) -> None:
        """SIGKILL the whole server, as a crash would."""
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture
def mlflow_server(workdir: Path):
    server = Server(workdir)
    server.start()
    yield server
    server.stop()


def _run_of(uri: str):
    """The one run of experiment `pipeline` in the store at `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    return client, run


def _assert_checkpoints_uploaded(client, run_id: str, run_dir: Path, dest: Path) -> None:
    """`last/last.ckpt` and `best/best.ckpt` in the run's artifacts are byte-equal to the run dir's checkpoints."""
    for name in ("last", "best"):
        local = client.download_artifacts(run_id, f"{name}/{name}.ckpt", str(dest))
        assert Path(local).read_bytes() == (run_dir / "checkpoints" / f"{name}.ckpt").read_bytes(), name
    assert not (run_dir / "mlflow-uploads").exists()  # every staged copy was uploaded and removed


def test_training_logs_to_a_tracking_server_that_lists_the_run(workdir: Path, mlflow_server: Server):
    run_cli("train", *TINY, cwd=workdir, tracking_uri=mlflow_server.uri)
    uri = mlflow_server.uri
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=pipeline")
    experiment_id = json.load(urllib.request.urlopen(request))["experiment"]["experiment_id"]
    body = json.dumps({"experiment_ids": [experiment_id]}).encode()
    search = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
    )
    (run,) = json.load(urllib.request.urlopen(search))["runs"]
    assert run["info"]["status"] == "FINISHED"
    assert any(m["key"] == "val/mIoU" for m in run["data"]["metrics"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(run["info"]["run_id"])}
    assert {"config.yaml", "last", "best"} <= artifacts
    assert not (workdir / "outputs" / "mlartifacts").exists()  # the server decides where artifacts go
    _assert_checkpoints_uploaded(client, run["info"]["run_id"], run_dirs(workdir)[0], workdir / "downloaded")


def test_unreachable_server_fails_in_seconds_before_training(workdir: Path):
    start = time.time()
    proc = run_cli("train", *TINY, cwd=workdir, check=False, tracking_uri=f"http://127.0.0.1:{_free_port()}")
    assert proc.returncode == 1
    assert "is not reachable" in proc.stderr
    assert time.time() - start < 60


def test_final_checkpoints_are_in_the_sqlite_store_when_the_run_ends(workdir: Path):
    run_cli("train", *TINY, "trainer.max_epochs=2", cwd=workdir)
    client, run = _run_of(tracking_uri(workdir))
    assert run.info.status == "FINISHED"
    _assert_checkpoints_uploaded(client, run.info.run_id, run_dirs(workdir)[0], workdir / "downloaded")


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
    server = Server(workdir)
    server.start()
    gate = workdir / "gate"
    gate.mkdir()
    overrides = [*TINY, f"trainer.max_epochs={epochs}", "+callbacks.gate._target_=tests.integration.gate.EpochGate",
                 f"+callbacks.gate.folder={gate}", "+callbacks.gate.epochs=[1,3]"]  # fmt: skip
    # MLflow's own HTTP retries (minutes by default) made short, so a request the kill cuts off fails over to ours.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": server.uri,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip
    log = workdir / "train.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *overrides], cwd=workdir, env=env,
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
        _assert_checkpoints_uploaded(client, run_id, run_dirs(workdir)[0], workdir / "downloaded")
    finally:
        server.stop()
