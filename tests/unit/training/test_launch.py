"""A requeued SLURM job finds the run dir of its first attempt (pipeline.launch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import CONF_DIR
from pipeline.training import launch


@pytest.fixture
def slurm_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A SLURM batch job 77 started in tmp_path (its first attempt: no restart count)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return tmp_path


def _first_attempt(root: Path, log_dir: Path, argv: list[str], name: str = "2026-01-01_00-00-00-000000") -> Path:
    run_dir = log_dir / "train" / "runs" / name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    launch.record_slurm_run(log_dir, run_dir, argv)
    return run_dir


def test_a_requeue_continues_the_first_attempts_run_dir_even_when_it_was_a_fork(slurm_job: Path, monkeypatch):
    argv = ["pipeline-train", "model=fcn32s", "ckpt_path=/old/best.ckpt", "resume_mode=fork"]
    run_dir = _first_attempt(slurm_job, slurm_job / "outputs", argv)
    assert launch.argv_for_requeue(argv, CONF_DIR) == argv  # the first attempt: unchanged

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert launch.argv_for_requeue(argv, CONF_DIR) == ["pipeline-train", "model=fcn32s", f"ckpt_path={run_dir}"]
    assert launch.argv_for_requeue([*argv, "-m"], CONF_DIR) == [*argv, "-m"]  # a sweep: its jobs resume themselves


def test_the_record_follows_paths_log_dir_and_the_srun_step(slurm_job: Path, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    argv = ["pipeline-train", f"paths.log_dir={slurm_job / 'elsewhere'}"]
    run_dir = _first_attempt(slurm_job, slurm_job / "elsewhere", argv)
    assert [p.name.split("-")[0] for p in (slurm_job / "elsewhere" / "slurm").iterdir()] == ["77.3"]

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert launch.argv_for_requeue(argv, CONF_DIR) == [*argv, f"ckpt_path={run_dir}"]
    monkeypatch.setenv("SLURM_STEP_ID", "4")  # another step of the job: not this training's record
    assert launch.argv_for_requeue(argv, CONF_DIR) == argv


def test_two_trainings_of_one_batch_script_each_continue_their_own_run(slurm_job: Path, monkeypatch):
    one, two = ["pipeline-train", "seed=1"], ["pipeline-train", "seed=2"]
    run_one = _first_attempt(slurm_job, slurm_job / "outputs", one, "first")
    run_two = _first_attempt(slurm_job, slurm_job / "outputs", two, "second")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert launch.argv_for_requeue(one, CONF_DIR) == [*one, f"ckpt_path={run_one}"]
    assert launch.argv_for_requeue(two, CONF_DIR) == [*two, f"ckpt_path={run_two}"]


def test_a_requeue_whose_first_attempt_wrote_no_checkpoint_starts_anew(slurm_job: Path, monkeypatch, capsys):
    run_dir = _first_attempt(slurm_job, slurm_job / "outputs", ["pipeline-train"])
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert launch.argv_for_requeue(["pipeline-train"], CONF_DIR) == ["pipeline-train"]
    assert "no checkpoint of an earlier attempt" in capsys.readouterr().err
