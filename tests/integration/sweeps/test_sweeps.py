"""`-m` sweeps: one parent MLflow run, every job a named and tagged child, a summary; parallel, failing and DDP jobs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, long_project_root, run_cli, run_main, tracking_uri

pytestmark = pytest.mark.slow


def _sweep(workdir: Path) -> tuple[Path, MlflowClient, object, list]:
    """The single sweep dir, the client, the parent run and the children (by job number)."""
    (sweep_dir,) = (workdir / "outputs" / "train" / "multiruns").iterdir()
    client = MlflowClient(tracking_uri(workdir))
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.sweep.role") == "parent"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["pipeline.sweep.job"]))
    assert len({r.info.experiment_id for r in runs}) == 1  # parent and children in one experiment
    return sweep_dir, client, parent, children


@pytest.mark.distributed
def test_a_2x2_joblib_sweep_two_at_a_time_is_one_parent_with_four_named_children_and_a_summary(
    tmp_path: Path, _migrated_store: Path
):
    # Two jobs at a time, each with a loader worker, from a project root of 120+ characters (issue 10's hang).
    root = long_project_root(tmp_path, _migrated_store)
    workers = [o for o in TINY if not o.startswith("data.num_workers=")] + ["data.num_workers=1"]
    proc = run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.optimizer.lr=0.001,0.003",
                   "seed=1,2", *workers, "trainer.max_epochs=2", cwd=root)  # fmt: skip

    log = proc.stdout + proc.stderr
    assert "Joblib" in log or "joblib" in log  # it really ran on the joblib launcher
    assert "database is locked" not in log and "OperationalError" not in log
    sweep_dir, client, parent, children = _sweep(root)
    assert [r.info.status for r in children] == ["FINISHED"] * 4
    assert [r.info.run_name for r in children] == ["lr0.001-s1-j0", "lr0.001-s2-j1", "lr0.003-s1-j2", "lr0.003-s2-j3"]
    assert sorted(p.parent.parent.name for p in sweep_dir.glob("*/checkpoints/last.ckpt")) == ["0", "1", "2", "3"]
    for job, run in enumerate(children):
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == tags["pipeline.sweep.id"] == parent.info.run_id
        assert tags["pipeline.sweep.job"] == str(job)
        params = run.data.params
        assert json.loads(tags["pipeline.sweep.params"]) == {"model.optimizer.lr": params["model.optimizer.lr"],
                                                             "seed": params["seed"]}  # fmt: skip
        assert "model.optimizer.lr=" in tags["pipeline.sweep.overrides"]
        assert tags["pipeline.run_dir"] == str(sweep_dir / str(job))
        # a job's value is its best epoch's (what best.ckpt holds), not its last epoch's
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val/mIoU")]
        assert len(history) == 2
        assert run.data.metrics["best/val/mIoU"] == max(history)

    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert json.loads(tags["pipeline.sweep.space"]) == {"model.optimizer.lr": "0.001,0.003", "seed": "1,2"}
    assert tags["pipeline.sweep.dir"] == str(sweep_dir)
    best = max(children, key=lambda r: r.data.metrics["best/val/mIoU"])
    assert tags["pipeline.sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/val/mIoU"] == best.data.metrics["best/val/mIoU"]
    assert tags["pipeline.sweep.best.seed"] == best.data.params["seed"]
    assert tags["pipeline.sweep.failed"] == "0"
    rows = list(csv.DictReader(open(sweep_dir / "sweep.csv")))
    assert [(r["name"], r["status"]) for r in rows] == [(c.info.run_name, "FINISHED") for c in children]
    assert [float(r["value"]) for r in rows] == [c.data.metrics["best/val/mIoU"] for c in children]
    assert {"model.optimizer.lr", "seed", "duration_s"} <= set(rows[0])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.csv", "sweep.png"} <= artifacts


def test_a_failing_job_is_a_failed_child_with_its_reason_and_the_sweep_goes_on(workdir: Path):
    proc = run_main("train", "-m", "model.optimizer.lr=0.001,-1", *TINY, cwd=workdir, check=True)

    assert proc.returncode == 0  # the sweep ran to its end; failures are in the summary
    sweep_dir, _, parent, children = _sweep(workdir)
    ok, bad = children
    assert ok.info.status == "FINISHED" and bad.info.status == "FAILED"
    assert "Invalid learning rate: -1" in bad.data.tags["pipeline.error"]
    assert parent.data.tags["pipeline.sweep.failed"] == "1"
    assert parent.data.tags["pipeline.sweep.best_run_id"] == ok.info.run_id
    rows = list(csv.DictReader(open(sweep_dir / "sweep.csv")))
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED"]
    assert "Invalid learning rate" in rows[1]["error"]
    assert "sweep job 1 (lr-1-j1) failed" in proc.stderr


@pytest.mark.distributed
def test_ddp_jobs_inside_a_sweep_each_train_once_in_their_own_dir(workdir: Path):
    run_cli("train", "-m", "seed=1,2", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *TINY,
            cwd=workdir, timeout=600)  # fmt: skip

    sweep_dir, _, parent, children = _sweep(workdir)
    assert [r.info.status for r in children] == ["FINISHED"] * 2  # one run per job, not per rank or per sweep
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert sorted(p.name for p in (sweep_dir / job / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        assert (sweep_dir / job / "train_ddp_process_1.log").is_file()  # rank 1 ran inside this job's dir
    assert not (workdir / "outputs" / "train" / "runs").exists()  # no stray single-run dirs from the children
    assert len(list((workdir / "outputs" / "train" / "multiruns").iterdir())) == 1  # and no second sweep


def test_a_killed_sweep_run_again_in_its_dir_skips_finished_jobs_and_continues_the_rest(workdir: Path):
    args = ["-m", "seed=1,2", *TINY, "trainer.max_epochs=3"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli.train", *args], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((workdir / "outputs" / "train" / "multiruns").glob("*/1/checkpoints/last.ckpt")):
            break  # job 0 has finished, job 1 has its first epoch's checkpoint
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.kill()
    proc.wait()
    sweep_dir, client, parent, (first, second) = _sweep(workdir)
    assert (first.info.status, second.info.status) == ("FINISHED", "RUNNING")

    proc = run_main("train", *args, f"hydra.sweep.dir={sweep_dir}", cwd=workdir, check=True)

    assert "Sweep job 0 (s1-j0) finished before: skipped" in proc.stdout
    again, client, parent_again, children = _sweep(workdir)
    assert again == sweep_dir and parent_again.info.run_id == parent.info.run_id
    assert parent_again.info.status == "FINISHED"
    assert [r.info.run_id for r in children] == [first.info.run_id, second.info.run_id]  # no new runs
    assert [r.info.status for r in children] == ["FINISHED"] * 2
    for run in children:  # each epoch logged once: job 0 was not retrained, job 1 went on from its checkpoint
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")]
        assert steps == [4 * e - 1 for e in (1, 2, 3)]  # 16 images / batch 4 = 4 steps per epoch
    assert torch.load(sweep_dir / "1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert len(list(csv.DictReader(open(sweep_dir / "sweep.csv")))) == 2


def test_a_sweep_whose_job_config_does_not_compose_stops_at_once_and_its_parent_is_failed(workdir: Path):
    # Hydra composes every job of the grid before the first one starts: `model=nope` stops the sweep there
    proc = run_main("train", "-m", *TINY, "model=fcn8s,nope", cwd=workdir)

    assert proc.returncode == 1
    assert "nope" in proc.stderr
    sweep_dir, _, parent, children = _sweep(workdir)
    assert children == []  # nothing trained
    assert parent.info.status == "FAILED"
    assert parent.data.tags["pipeline.error"] == (
        f"The sweep stopped before its end (exit status 1; the sweep's output says why); resume it with "
        f"hydra.sweep.dir={sweep_dir}"
    )
