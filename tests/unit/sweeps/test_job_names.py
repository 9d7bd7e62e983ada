"""Sweep job names lead with what varies; checkpoint and sweep direction follow the monitored metric."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from pipeline.cli import CONF_DIR
from pipeline.metrics.monitor import monitor_mode
from pipeline.sweeps.jobs import job_name, job_values


@pytest.mark.parametrize(
    ("values", "job", "name"),
    [
        ({"model": "fcn8s", "model.optimizer.lr": "3e-3", "seed": "1"}, 2, "fcn8s-lr0.003-s1-j2"),
        ({"model/backbone": "resnet18", "model.optimizer.weight_decay": "0.0005611516415334506"}, 0,
         "resnet18-wd0.000561-j0"),
        ({"data.batch_size": "8", "model.loss.anchor_iou": "0.5"}, 7, "bs8-anchor_iou0.5-j7"),
        ({}, 3, "j3"),
    ],
)  # fmt: skip
def test_job_names_lead_with_the_varied_values(values: dict, job: int, name: str):
    assert job_name(values, job) == name


def test_job_values_come_from_the_jobs_own_overrides():
    overrides = ["model=fcn32s", "+extra=1", "model.optimizer.lr=0.001", "trainer.max_epochs=1"]
    assert job_values(overrides, ["model.optimizer.lr", "model", "extra"]) == {
        "model.optimizer.lr": "0.001", "model": "fcn32s", "extra": "1"}  # fmt: skip


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val/mIoU", "max"), ("val/map", "max"), ("val/segm_map", "max"), ("val/loss", "min"), ("train/loss_box", "min")],
)
def test_the_monitored_metric_decides_min_or_max(metric: str, mode: str):
    assert monitor_mode(metric) == mode
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model.monitor={metric}"])
    assert cfg.callbacks.best_checkpoint.mode == mode  # best.ckpt keeps the lowest loss, the highest mIoU


@pytest.mark.parametrize(("cores", "processes", "workers"), [(2, 1, 1), (2, 2, 0), (16, 2, 4), (16, 4, 3), (1, 1, 0)])
def test_loader_workers_share_the_cores_with_parallel_jobs(monkeypatch, cores: int, processes: int, workers: int):
    from pipeline.data import datamodule

    monkeypatch.setattr(datamodule.os, "sched_getaffinity", lambda _: set(range(cores)))
    assert datamodule.auto_num_workers(processes) == workers  # cores / processes - 1, at most 4, at least 0
