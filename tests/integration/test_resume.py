"""Resume continues the same MLflow run, run dir and step axis; fork starts a tagged child run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import TINY, run_cli, run_dirs, tracking_uri

STEPS_PER_EPOCH = 4  # 16 images / batch 4


def _training_runs(workdir: Path):
    client = MlflowClient(tracking_uri(workdir))
    experiment = client.get_experiment_by_name("pipeline")
    return client, client.search_runs([experiment.experiment_id])


def _epoch_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val/mIoU"))


def test_resume_with_more_epochs_continues_the_same_run_and_step(workdir: Path):
    run_cli("train", *TINY, "trainer.max_epochs=1", cwd=workdir)
    (run_dir,) = run_dirs(workdir)
    run_cli("train", *TINY, "trainer.max_epochs=3", f"ckpt_path={run_dir}", cwd=workdir)

    assert run_dirs(workdir) == [run_dir]  # same run directory, no new one
    client, runs = _training_runs(workdir)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert _epoch_steps(client, run.info.run_id) == [STEPS_PER_EPOCH * e - 1 for e in (1, 2, 3)]
    # the changed setting is recorded instead of crashing on "Changing param values is not allowed"
    assert run.data.params["trainer.max_epochs"] == "1"
    assert '"trainer.max_epochs": ["1", "3"]' in run.data.tags["pipeline.resume.1.changed"]
    import torch

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 * STEPS_PER_EPOCH and last["epoch"] == 2
    assert last["pipeline"]["mlflow_run_id"] == run.info.run_id


def test_sigkill_after_first_checkpoint_then_resume_finishes_in_the_same_run(workdir: Path):
    epochs = 6
    args = [*TINY, f"trainer.max_epochs={epochs}", "data.spec.num_train=48", "data.num_workers=0"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    last = None
    while time.time() < deadline and proc.poll() is None:
        found = list((workdir / "outputs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            break
        time.sleep(0.05)
    assert last is not None, "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"

    client, runs = _training_runs(workdir)
    assert runs[0].info.status == "RUNNING"  # killed: nobody marked it finished
    run_cli("train", *args, f"ckpt_path={last}", cwd=workdir)

    client, runs = _training_runs(workdir)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps_per_epoch = 48 // 4
    assert _epoch_steps(client, runs[0].info.run_id) == [steps_per_epoch * e - 1 for e in range(1, epochs + 1)]
    loss_steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss_step")})
    assert loss_steps[-1] == epochs * steps_per_epoch - 1


def test_fork_starts_a_new_run_tagged_with_its_parent(workdir: Path):
    run_cli("train", *TINY, cwd=workdir)
    (first,) = run_dirs(workdir)
    run_cli("train", *TINY, "trainer.max_epochs=2", "model.optimizer.lr=0.01", f"ckpt_path={first}",
            "resume_mode=fork", cwd=workdir)  # fmt: skip
    client, runs = _training_runs(workdir)
    assert len(runs) == 2 and len(run_dirs(workdir)) == 2
    parent = next(r for r in runs if "pipeline.forked_from" not in r.data.tags)
    child = next(r for r in runs if "pipeline.forked_from" in r.data.tags)
    assert child.data.tags["pipeline.forked_from"] == parent.info.run_id
    changed = child.data.tags["pipeline.fork_changed_keys"]
    assert "model.optimizer.lr" in changed and "trainer.max_epochs" in changed
    # a fork starts from the weights with its own schedule: epochs from 0 and the new learning rate
    assert _epoch_steps(client, child.info.run_id) == [STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]
    assert client.get_metric_history(child.info.run_id, "lr-AdamW")[0].value == 0.01
