"""The tracking-server path: a real `mlflow server` on 127.0.0.1 receives the run, and its REST API lists it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(workdir: Path):
    port = _free_port()
    store = workdir / "outputs" / "mlflow.db"  # the migrated copy from the workdir fixture
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(workdir / "server-artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start within 120 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_training_logs_to_a_tracking_server_that_lists_the_run(workdir: Path, mlflow_server: str):
    run_cli("train", *TINY, cwd=workdir, tracking_uri=mlflow_server)
    request = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=pipeline")
    experiment_id = json.load(urllib.request.urlopen(request))["experiment"]["experiment_id"]
    body = json.dumps({"experiment_ids": [experiment_id]}).encode()
    search = urllib.request.Request(
        f"{mlflow_server}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
    )
    (run,) = json.load(urllib.request.urlopen(search))["runs"]
    assert run["info"]["status"] == "FINISHED"
    assert any(m["key"] == "val/mIoU" for m in run["data"]["metrics"])
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run["info"]["run_id"])}
    assert {"config.yaml", "last", "best"} <= artifacts
    assert not (workdir / "outputs" / "mlartifacts").exists()  # the server decides where artifacts go


def test_unreachable_server_fails_in_seconds_before_training(workdir: Path):
    start = time.time()
    proc = run_cli("train", *TINY, cwd=workdir, check=False, tracking_uri=f"http://127.0.0.1:{_free_port()}")
    assert proc.returncode == 1
    assert "is not reachable" in proc.stderr
    assert time.time() - start < 60
