"""Hydra's submitit launcher: a real `hydra/launcher=submitit_local` sweep (the slurm and local launchers as
configured: tests/unit/conf/test_launchers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, run_cli, tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_a_submitit_local_sweep_is_one_parent_with_two_children_run_by_submitit(workdir: Path):
    proc = run_cli("train", "-m", "hydra/launcher=submitit_local", "seed=1,2", *TINY, cwd=workdir, timeout=420)

    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    (sweep_dir,) = (workdir / "outputs" / "train" / "multiruns").iterdir()
    assert sorted(p.parent.parent.name for p in sweep_dir.glob("*/checkpoints/last.ckpt")) == ["0", "1"]
    client = MlflowClient(tracking_uri(workdir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.sweep.role") == "parent"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["pipeline.sweep.job"]))
    assert [r.info.status for r in children] == ["FINISHED"] * 2
    assert [r.info.run_name for r in children] == ["s1-j0", "s2-j1"]
    for job, run in enumerate(children):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["pipeline.run_dir"] == str(sweep_dir / str(job))
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pipeline.sweep.failed"] == "0"
    # submitit's own records: one folder per job (its job id), the job's output and its pickled result
    jobs = [p for p in (sweep_dir / ".submitit").iterdir() if p.name != "%j"]  # `%j`: the executor's folder template
    assert len(jobs) == 2
    outputs = [(job / f"{job.name}_0_log.out").read_text() for job in jobs]
    assert all((job / f"{job.name}_0_result.pkl").is_file() for job in jobs)
    assert all("Training finished." in out for out in outputs)  # the training ran inside the submitit job
