"""Hydra's submitit launchers as configured: `hydra/launcher=slurm` composed and turned into its sbatch script (there
is no SLURM on this machine, so nothing is submitted), `hydra/launcher=local` composed. (A real submitit_local
sweep: tests/integration/sweeps/test_submitit.py.)"""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationValidationError

from pipeline.cli import CONF_DIR

CLUSTER = ["trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _name(cls: type) -> str:
    # Hydra's plugin discovery loads hydra_plugins modules afresh, so its classes are not ours: compare names.
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_slurm_launcher_composes_with_one_task_and_one_gpu_per_device():
    cfg = _compose(["hydra/launcher=slurm", *CLUSTER])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

    assert launcher["_target_"] == _name(SlurmLauncher)
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == cfg.trainer.devices == 8
    assert launcher["nodes"] == cfg.trainer.num_nodes == 2
    assert launcher["partition"] == "gpu"
    assert launcher["additional_parameters"] == {"requeue": True}
    assert launcher["max_num_timeout"] == 3
    assert launcher["submitit_folder"].endswith("/.submitit/%j")


def test_the_slurm_launcher_writes_the_sbatch_script_we_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The plugin's own launch(), up to submission: its executor's sbatch script carries our settings."""
    srun = tmp_path / "bin" / "srun"  # submitit only looks for it; never run
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{srun.parent}:{Path('/usr/bin')}:{Path('/bin')}")
    submitted = {}

    def map_array(executor, fn, *args):
        submitted.update(executor=executor, args=args)
        return [SimpleNamespace(results=lambda: ["done"]) for _ in args[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    cfg = _compose(["hydra/launcher=slurm", *CLUSTER, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    assert launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0) == ["done", "done"]
    executor = submitted["executor"]._executor
    assert executor.max_num_timeout == 3  # requeues after a timeout
    script = executor._make_submission_file_text("python -m submitit.core._submit folder", "uid")
    lines = set(script.splitlines())
    expected = ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--mem=128GB",
                "--time=240", "--partition=gpu", "--requeue", "--signal=USR2@120"]  # fmt: skip
    assert {f"#SBATCH {flag}" for flag in expected} <= lines, script
    assert str(tmp_path / "sweep" / ".submitit") in script  # submitit's logs beside the jobs' run dirs
    assert submitted["args"][0] == (["seed=1"], ["seed=2"])  # one array task per job


def test_the_slurm_launcher_needs_a_number_of_devices_not_auto():
    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp"])  # ddp's devices: auto
    with pytest.raises(InterpolationValidationError, match=r"hydra\.launcher\.(tasks|gpus)_per_node"):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_the_local_launcher_gives_each_job_the_trainers_devices_and_a_long_timeout():
    cfg = _compose(["hydra/launcher=local", "trainer.devices=2"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

    assert launcher["_target_"] == _name(LocalLauncher)
    assert launcher["gpus_per_node"] == 2 and launcher["tasks_per_node"] == 1
    assert launcher["timeout_min"] >= 24 * 60
