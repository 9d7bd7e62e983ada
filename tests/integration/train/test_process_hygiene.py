"""Training from a long project path with loader workers, and leaving the calling process as it was (issue 10).

multiprocessing shares a tensor with the main process through a Unix socket under $TMPDIR, whose path must stay
under ~107 bytes: a training that moved the process's temporary directory into its (long) run dir made every
loader worker fail and the run hang. A worker that cannot send a batch must end the run, not hang it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from pipeline.cli import CONF_DIR
from tests.helpers import ROOT, TINY, long_dir, long_project_root, run_cli, tracking_uri

pytestmark = pytest.mark.slow

WORKERS = [o for o in TINY if not o.startswith("data.num_workers=")] + ["data.num_workers=2"]


def _runs(root: Path):
    client = MlflowClient(tracking_uri(root))
    return client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])


def test_training_with_loader_workers_from_a_120_character_project_root(tmp_path: Path, _migrated_store: Path):
    root = long_project_root(tmp_path, _migrated_store)
    run_cli("train", *WORKERS, cwd=root, timeout=300)

    (last,) = root.glob("outputs/train/runs/*/checkpoints/last.ckpt")
    assert len(str(last)) > 160
    assert torch.load(last, weights_only=True)["global_step"] == 4  # 16 images / batch 4, one epoch
    assert [r.info.status for r in _runs(root)] == ["FINISHED"]


def test_a_loader_worker_that_cannot_send_its_batch_ends_the_run_with_its_error(tmp_path: Path, _migrated_store: Path):
    """A $TMPDIR too long for multiprocessing's socket: today's Python only prints the error and drops the batch."""
    root = long_project_root(tmp_path, _migrated_store)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.train", *WORKERS],
        cwd=root, env={**os.environ, "TMPDIR": str(long_dir(tmp_path / "tmp"))}, capture_output=True, text=True,
        timeout=300,  # a hang fails the test instead of the suite
    )  # fmt: skip
    assert proc.returncode == 1
    assert "AF_UNIX path too long" in proc.stderr
    assert "could not send a batch" in proc.stderr and "Set TMPDIR to a shorter directory" in proc.stderr
    assert "exited unexpectedly" in proc.stderr  # the loader's own report, raised in the training process
    assert [r.info.status for r in _runs(root)] == ["FAILED"]


def test_train_leaves_the_processs_temporary_directory_and_argv_as_they_were(workdir: Path):
    from pipeline.cli.train import train

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=TINY, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(workdir / "outputs" / "train" / "runs" / "in-process")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    before = (tempfile.tempdir, tempfile.gettempdir(), list(sys.argv))

    metrics = train(cfg)

    assert "val/mIoU" in metrics
    assert (tempfile.tempdir, tempfile.gettempdir(), sys.argv) == before
    assert (workdir / "outputs" / "train" / "runs" / "in-process" / "checkpoints" / "last.ckpt").is_file()


def test_importing_the_pipeline_keeps_a_users_own_resolvers():
    script = (
        "from omegaconf import OmegaConf\n"
        "OmegaConf.register_new_resolver('len', lambda x: 'mine')\n"
        "OmegaConf.register_new_resolver('cwd', lambda: 'my-cwd')\n"
        "import pipeline.cli\n"  # every entry point registers its resolvers through it
        "cfg = OmegaConf.create({'a': '${len:xyz}', 'b': '${cwd:}'})\n"
        "print(cfg.a, cfg.b)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["mine", "my-cwd"]
