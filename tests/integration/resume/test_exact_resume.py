"""Resume is exact: interrupted and resumed trainings end with the weights, and log the losses, of an uninterrupted one.

On CPU with `trainer.deterministic=true`: at an epoch boundary, mid-epoch after SIGTERM (a pre-emption), with 0 or
2 loader workers, in one process and in 2-process DDP; a non-finite loss stops the run before it reaches the
weights or a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import TINY, run_cli, run_dirs, run_main, tracking_uri

pytestmark = pytest.mark.slow

# 32 training images, batch 4: 8 steps per epoch; every random draw seeded; no loader workers unless said.
EXACT = [*TINY, "data.spec.num_train=32", "deterministic=true", "trainer.max_epochs=2"]
STEPS_PER_EPOCH = 8


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key  # bit-equal, not close


def _only_run(workdir: Path):
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def _step_losses(workdir: Path) -> dict[int, set[float]]:
    """Every logged value of train/loss_step by step (a step trained twice, before and after a kill, logs twice)."""
    client, run = _only_run(workdir)
    values = defaultdict(set)
    for m in client.get_metric_history(run.info.run_id, "train/loss_step"):
        values[m.step].add(m.value)
    return dict(values)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> tuple[dict, dict]:
    """An uninterrupted 2-epoch training with 2 loader workers: its last checkpoint and per-step losses."""
    root = tmp_path_factory.mktemp("reference")
    (root / "outputs").mkdir()
    shutil.copy(_migrated_store, root / "outputs" / "mlflow.db")
    run_cli("train", *EXACT, "data.num_workers=2", cwd=root)
    (run_dir,) = run_dirs(root)
    losses = _step_losses(root)
    assert sorted(losses) == list(range(2 * STEPS_PER_EPOCH)) and all(len(v) == 1 for v in losses.values())
    return _last(run_dir), losses


def _signal_at(step: int, signum: int) -> list[str]:
    """Overrides that make the training send itself `signum` right after global step `step` (tests/helpers.py)."""
    return ["+callbacks.signal._target_=tests.helpers.SignalAt", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.signum={int(signum)}"]  # fmt: skip


def test_killed_mid_epoch_then_at_an_epoch_boundary_and_resumed_equals_uninterrupted_whatever_the_workers(
    workdir: Path, reference
):
    checkpoint, losses = reference
    args = [*EXACT, "callbacks.last_checkpoint.every_n_train_steps=3"]  # no loader workers here, 2 in the reference
    proc = run_cli("train", *args, *_signal_at(5, signal.SIGKILL), cwd=workdir, check=False)
    assert proc.returncode == -signal.SIGKILL
    (run_dir,) = run_dirs(workdir)
    assert _last(run_dir)["global_step"] == 3  # the step checkpoint: mid-epoch, written at a batch's end
    assert _only_run(workdir)[1].info.status == "RUNNING"  # killed: nobody marked it finished

    proc = run_cli("train", *args, *_signal_at(9, signal.SIGKILL), f"ckpt_path={run_dir}", cwd=workdir, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert _last(run_dir)["global_step"] == STEPS_PER_EPOCH  # now the end of epoch 0's checkpoint

    run_cli("train", *args, f"ckpt_path={run_dir}", cwd=workdir)

    _assert_same_weights(_last(run_dir), checkpoint)
    assert _step_losses(workdir) == losses  # each step with the uninterrupted run's value (some logged twice)
    client, run = _only_run(workdir)  # the same run, finished, each epoch's validation logged once
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [7, 15]


def test_sigterm_then_a_slurm_requeue_of_the_same_command_continues_the_run_and_equals_the_uninterrupted_one(
    workdir: Path, reference
):
    checkpoint, losses = reference
    # What SLURM sets in a job's processes (not SLURM_NTASKS: Lightning would then take the ranks from SLURM)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
    command = [*EXACT, *_signal_at(STEPS_PER_EPOCH, signal.SIGTERM)]
    # SIGTERM during the last batch of epoch 0: its validation and checkpoint still run, the stop comes one batch on
    proc = run_cli("train", *command, cwd=workdir, check=False, env=slurm)

    assert proc.returncode == 143, proc.stderr[-3000:]  # documented: stopped by SIGTERM, checkpoint written
    (run_dir,) = run_dirs(workdir)
    stopped = _last(run_dir)
    assert stopped["global_step"] == STEPS_PER_EPOCH + 1  # mid-epoch: the first batch of epoch 1
    assert stopped["ShapesDataModule"] == {"epoch": 1, "batches": 1}
    assert f"resume with ckpt_path={run_dir}" in proc.stderr
    client, run = _only_run(workdir)
    assert run.info.status == "KILLED"
    assert run.data.tags["pipeline.error"] == f"SIGTERM at step {STEPS_PER_EPOCH + 1}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [7]  # epoch 0's, whole

    (record,) = (workdir / "outputs" / "slurm").iterdir()  # 4242.0-<digest of the command>
    assert record.name.startswith("4242.0-") and record.read_text().strip() == str(run_dir.resolve())

    # The requeue: the same command again, under the same job id, SLURM_RESTART_COUNT raised; no ckpt_path given
    proc = run_cli("train", *command, cwd=workdir, env={**slurm, "SLURM_RESTART_COUNT": "1"})

    assert f"SLURM job 4242.0, restart 1: continuing {run_dir.resolve()}" in proc.stderr
    assert run_dirs(workdir) == [run_dir]  # no new run dir
    _assert_same_weights(_last(run_dir), checkpoint)
    assert _step_losses(workdir) == losses
    client, run = _only_run(workdir)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [7, 15]


def test_a_non_finite_loss_stops_the_run_before_it_reaches_the_weights(workdir: Path):
    # lr 1e10: step 1 leaves huge (finite) weights, the loss of step 2 is NaN; a checkpoint after every step
    proc = run_main("train", *TINY, "model.optimizer.lr=1e10", "callbacks.last_checkpoint.every_n_train_steps=1",
                    cwd=workdir)  # fmt: skip

    assert proc.returncode == 1
    assert "Non-finite training loss at step 1 (epoch 0, batch 1): train/loss=nan" in proc.stderr
    assert "Traceback" not in proc.stderr
    (run_dir,) = run_dirs(workdir)
    last = _last(run_dir)
    assert last["global_step"] == 1  # the last good step's checkpoint, not overwritten
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    _, run = _only_run(workdir)
    assert run.info.status == "FAILED"
    assert "Non-finite training loss at step 1" in run.data.tags["pipeline.error"]


@pytest.mark.distributed
def test_two_process_ddp_sigterm_mid_epoch_then_resume_equals_uninterrupted_and_its_miou_one_process_eval(
    workdir: Path, tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path
):
    # 2 ranks: 4 steps per epoch; 7 val images, so ranks score 4 + 3 and an unsynced metric would differ.
    ddp = [*EXACT, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.spec.num_val=7"]
    root = tmp_path_factory.mktemp("ddp-reference")
    (root / "outputs").mkdir()
    shutil.copy(_migrated_store, root / "outputs" / "mlflow.db")
    run_cli("train", *ddp, cwd=root, timeout=900)
    (reference_dir,) = run_dirs(root)
    client, run = _only_run(root)
    assert run.info.status == "FINISHED"
    assert sorted(p.name for p in (reference_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mIoU")] == [3, 7]
    run_main("eval", f"ckpt_path={reference_dir}", "trainer.accelerator=cpu", "trainer.devices=1", cwd=root, check=True)
    (eval_dir,) = run_dirs(root, "eval")
    single = json.loads((eval_dir / "metrics.json").read_text())["metrics"]["val/mIoU"]
    assert run.data.metrics["val/mIoU"] == pytest.approx(single, abs=1e-6)

    proc = run_cli("train", *ddp, *_signal_at(2, signal.SIGTERM), cwd=workdir, check=False, timeout=900)
    assert proc.returncode == 143, proc.stderr[-3000:]
    (run_dir,) = run_dirs(workdir)
    stopped = _last(run_dir)  # every rank stopped after the same batch, mid-epoch
    assert stopped["global_step"] == 2 and stopped["ShapesDataModule"] == {"epoch": 0, "batches": 2}
    assert _only_run(workdir)[1].info.status == "KILLED"

    run_cli("train", *ddp, f"ckpt_path={run_dir}", cwd=workdir, timeout=900)

    _assert_same_weights(_last(run_dir), _last(reference_dir))
    assert _only_run(workdir)[1].info.status == "FINISHED"
