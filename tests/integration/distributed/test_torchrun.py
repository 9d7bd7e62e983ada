"""Ranks started by torchrun (one node, or two simulated nodes): one run dir, one MLflow run, one set of checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, free_port, run_dirs, run_main, tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "data.spec.num_val=7"]  # 7 val images: ranks score 4 + 3


def _torchrun(workdir: Path, launcher: list[str], overrides: list[str]) -> subprocess.Popen:
    """`torchrun <launcher args> -m pipeline.train <overrides>` in workdir, as a user would start it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launcher,
        "-m",
        "pipeline.cli.train",
        *TINY,
        *DDP,
        *overrides,
    ]
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-6000:]


def _one_run(workdir: Path):
    (run_dir,) = run_dirs(workdir)  # every rank composed the same timestamped dir
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.run_dir"] == str(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    return run_dir, run


def test_torchrun_two_processes_give_one_run_whose_miou_equals_single_process_eval(workdir: Path):
    _finish(_torchrun(workdir, ["--standalone", "--nproc-per-node", "2"], ["trainer.devices=2"]))
    run_dir, run = _one_run(workdir)

    run_main("eval", f"ckpt_path={run_dir}", "trainer.accelerator=cpu", "trainer.devices=1", cwd=workdir, check=True)
    (eval_dir,) = run_dirs(workdir, "eval")
    single = json.loads((eval_dir / "metrics.json").read_text())["metrics"]["val/mIoU"]
    assert run.data.metrics["val/mIoU"] == pytest.approx(single, abs=1e-6)


def test_two_simulated_nodes_give_one_run_dir_one_run_and_one_set_of_checkpoints(workdir: Path):
    rdzv = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes"]  # fmt: skip
    nodes = [_torchrun(workdir, rdzv, ["trainer.devices=1", "trainer.num_nodes=2"]) for _ in range(2)]
    for node in nodes:
        _finish(node)
    _one_run(workdir)
