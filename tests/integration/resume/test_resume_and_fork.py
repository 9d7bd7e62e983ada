"""Resume continues the same MLflow run, run dir and step axis; fork starts a tagged child run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, run_dirs, run_main, tracking_uri

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 4  # 16 images / batch 4


def _training_runs(workdir: Path):
    client = MlflowClient(tracking_uri(workdir))
    experiment = client.get_experiment_by_name("pipeline")
    return client, client.search_runs([experiment.experiment_id])


def _epoch_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val/mIoU"))


def test_resume_with_more_epochs_continues_the_same_run_and_step_and_a_fork_starts_a_tagged_child(workdir: Path):
    run_main("train", *TINY, "trainer.max_epochs=1", cwd=workdir, check=True)
    (run_dir,) = run_dirs(workdir)
    run_main("train", *TINY, "trainer.max_epochs=3", f"ckpt_path={run_dir}", cwd=workdir, check=True)

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
    # the cosine schedule (T_max = max_epochs) takes the new length and goes on from where it was: it had reached
    # its minimum after the first run's only epoch and stays there, instead of restarting at the base rate
    assert last["lr_schedulers"][0]["T_max"] == 3
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr-AdamW"), key=lambda m: m.step)]
    assert lrs == [pytest.approx(v) for v in (3e-3, 1e-5, 1e-5)]

    # A fork of that run (sharing its training with the resume above: the suite's time is short)
    run_main("train", *TINY, "trainer.max_epochs=2", "model.optimizer.lr=0.01", f"ckpt_path={run_dir}",
             "resume_mode=fork", cwd=workdir, check=True)  # fmt: skip
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
