"""Params that the store cannot hold are shortened, never a crash; changed settings are detected; the logger's
queued writes reach the store by the end of the run, and an unreachable one is given up on in time."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from pipeline.tracking import runs, store
from pipeline.training.config import changed_keys
from tests.helpers import tracking_uri


def test_flatten_shortens_long_values_and_a_real_store_accepts_them(workdir: Path):
    config = {"a": {"b": 1, "long": "x" * (MAX_PARAM_VAL_LENGTH + 500)}, "names": ["bg", "circle"], "empty": {}}
    flat = runs.flatten(config)
    assert flat["a.b"] == "1" and flat["names"] == '["bg", "circle"]' and flat["empty"] == "{}"
    assert len(flat["a.long"]) == MAX_PARAM_VAL_LENGTH and flat["a.long"].endswith("...")
    client = MlflowClient(tracking_uri(workdir))
    run = client.create_run(runs.experiment_id(client, "t"))
    runs.log_params(client, run.info.run_id, flat)
    assert client.get_run(run.info.run_id).data.params["a.long"] == flat["a.long"]


def test_changed_keys_reports_changed_added_and_removed():
    old = {"lr": "0.1", "epochs": "3", "gone": "x"}
    new = {"lr": "0.1", "epochs": "5", "added": "y"}
    assert changed_keys(old, new) == {"added": (None, "y"), "epochs": ("3", "5"), "gone": ("x", None)}


def test_experiment_is_created_once_and_tagged_for_the_runs_table(workdir: Path):
    client = MlflowClient(tracking_uri(workdir))
    first = runs.experiment_id(client, "shapes")
    assert runs.experiment_id(client, "shapes") == first
    assert client.get_experiment(first).tags["mlflow.experimentKind"] == "custom_model_development"


def test_unreachable_server_fails_fast_with_a_clear_message():
    start = time.time()
    with pytest.raises(ConnectionError, match="not reachable"):
        store.check_reachable("http://127.0.0.1:9")
    assert time.time() - start < 10


def test_flatten_of_resolved_omegaconf_config():
    cfg = OmegaConf.create({"x": 2, "y": "${x}"})
    assert runs.flatten(OmegaConf.to_container(cfg, resolve=True)) == {"x": "2", "y": "2"}


@pytest.fixture
def logger_run(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """Our MLflowLogger on a new run in the workdir's SQLite store; MLflow's global tracking URI restored after."""
    import mlflow

    uri = tracking_uri(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow sets it (the logger calls set_tracking_uri)
    client = MlflowClient(uri)
    run_id = client.create_run(runs.experiment_id(client, "t")).info.run_id
    logger = runs.MLflowLogger(upload_dir=str(workdir / "up"), tracking_uri=uri, run_id=run_id, log_model="all")
    yield logger, client, run_id
    mlflow.set_tracking_uri(None)


def test_queued_metrics_images_and_checkpoints_are_in_the_store_when_the_run_ends(workdir: Path, logger_run):
    from pytorch_lightning.callbacks import ModelCheckpoint

    logger, client, run_id = logger_run
    for step in range(2500):  # more than one request's worth (MLflow takes 1000 per batch)
        logger.log_metrics({"train/loss": step / 10, "epoch": step // 100}, step=step)
    runs.log_image(logger, np.full((8, 8, 3), 200, np.uint8), "val_images/epoch_000.png")
    ckpt_dir = workdir / "checkpoints"
    ckpt_dir.mkdir()
    callback = ModelCheckpoint(dirpath=ckpt_dir, filename="last")
    callback.last_model_path = str(ckpt_dir / "last.ckpt")
    for epoch in range(3):  # saved three times: the store holds the last save, replaced in place
        (ckpt_dir / "last.ckpt").write_bytes(f"weights of epoch {epoch}".encode() * 1000)
        os.utime(ckpt_dir / "last.ckpt", (time.time() + epoch, time.time() + epoch))
        logger.after_save_checkpoint(callback)
    logger.finalize("success")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(2500)) and {m.value for m in history} == {
        s / 10 for s in range(2500)
    }
    assert {a.path for a in client.list_artifacts(run_id, "val_images")} == {"val_images/epoch_000.png"}
    assert {a.path for a in client.list_artifacts(run_id, "last")} == {
        "last/last.ckpt",
        "last/metadata.yaml",
        "last/aliases.txt",
    }
    stored = client.download_artifacts(run_id, "last/last.ckpt", str(workdir / "dl"))
    assert Path(stored).read_bytes() == (ckpt_dir / "last.ckpt").read_bytes()
    assert not (workdir / "up").exists()  # staged copies removed once uploaded


def test_queue_gives_up_after_its_timeout_on_an_unreachable_server_and_says_what_is_left(tmp_path: Path, capsys):
    from mlflow.entities import Metric

    from pipeline.tracking.uploads import UploadQueue

    queue = UploadQueue("http://127.0.0.1:9", tmp_path / "up")
    queue.put_metrics("some-run", [Metric("val/mIoU", 0.5, 0, 3)])
    folder = queue.staging_folder()
    (folder / "last.ckpt").write_bytes(b"w")
    queue.put_folder("some-run", folder, "last", replaceable=True)
    start = time.time()
    left = queue.drain(timeout=2)
    assert time.time() - start < 10
    assert [len(job.metrics) for job in left] == [1, 0]
    err = capsys.readouterr().err
    assert "is not answering" in err and "1 metric values, last/last.ckpt" in err
    assert (folder / "last.ckpt").exists()  # kept: the message points at it


def test_a_refused_write_is_not_retried_but_an_unreachable_store_is():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED

    from pipeline.tracking.uploads import refused

    assert refused(MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE))
    assert not refused(MlflowException("API request to http://x failed with exception ..."))  # connection: 500
    assert not refused(MlflowException("slow down", error_code=REQUEST_LIMIT_EXCEEDED))  # 429
    assert not refused(ConnectionError("refused"))


def test_files_a_killed_process_left_in_the_staging_dir_are_cleared_before_new_ones(tmp_path: Path, capsys):
    from pipeline.tracking.uploads import UploadQueue

    stale = tmp_path / "up" / "000000"
    stale.mkdir(parents=True)
    (stale / "last.ckpt").write_bytes(b"old")
    folder = UploadQueue("http://127.0.0.1:9", tmp_path / "up").staging_folder()
    assert folder.is_dir() and not any(folder.iterdir()) and not (stale / "last.ckpt").exists()
    assert "left unsent" in capsys.readouterr().err
