"""`hydra/sweeper=pipeline_optuna`: Optuna sweeps as real processes (study, results, resume, failed trials)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from tests.helpers import TINY, run_main, tracking_uri

pytestmark = pytest.mark.slow


def _sweep_dir(workdir: Path) -> Path:
    (sweep_dir,) = (workdir / "outputs" / "train" / "multiruns").iterdir()
    return sweep_dir


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="pipeline", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def _job_dirs(sweep_dir: Path) -> set[str]:
    return {p.name for p in sweep_dir.iterdir() if p.is_dir()}


def _runs(workdir: Path) -> tuple[object, dict[int, object]]:
    """The sweep's parent MLflow run and its children by job number."""
    client = MlflowClient(tracking_uri(workdir))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.sweep.role") == "parent"]
    children = {int(r.data.tags["pipeline.sweep.job"]): r for r in runs if r is not parent}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    return parent, children


def _states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def test_fcn_optuna_sweep_fills_the_study_and_writes_the_best_trial(workdir: Path):
    # pruning on, but every trial is a start-up trial: each reports its epochs to the study and none is stopped
    proc = run_main("train", "hparams_search=fcn_optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.pruner=median",
                    "hydra.sweeper.pruner_startup_trials=4", *TINY, cwd=workdir, check=True)  # fmt: skip

    sweep_dir = _sweep_dir(workdir)
    study = _study(sweep_dir)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # auto: val/mIoU is not a loss
    assert _states(study) == [TrialState.COMPLETE] * 4
    assert _job_dirs(sweep_dir) == {"0", "1", "2", "3"}  # job dir N ran trial N
    values = [t.value for t in study.trials]
    assert all(0.0 <= v <= 1.0 for v in values)
    for trial in study.trials:
        assert set(trial.params) == {"model.optimizer.lr", "model.optimizer.weight_decay", "model"}
        assert 1e-4 <= trial.params["model.optimizer.lr"] <= 1e-2
        assert trial.params["model"] in ("fcn8s", "fcn16s", "fcn32s")

    assert [t.intermediate_values for t in study.trials] == [{0: t.value} for t in study.trials]  # 1 epoch each
    results = OmegaConf.load(sweep_dir / "optuna_results.yaml")
    assert results.best_value == max(values) == study.best_value
    assert results.best_params == study.best_params
    assert results.direction == "maximize" and results.n_trials == 4 and results.n_complete == 4
    assert f"Best trial {study.best_trial.number}" in proc.stdout
    # each trial's sampled values reached its job's config
    best_job = OmegaConf.load(sweep_dir / str(study.best_trial.number) / ".hydra" / "overrides.yaml")
    assert f"model={study.best_params['model']}" in best_job
    # the sweep's parent MLflow run holds the best value and params, its children one per trial
    parent, children = _runs(workdir)
    assert sorted(children) == [0, 1, 2, 3] and {r.info.status for r in children.values()} == {"FINISHED"}
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/val/mIoU"] == study.best_value
    assert parent.data.tags["pipeline.sweep.best_run_id"] == children[study.best_trial.number].info.run_id
    assert parent.data.tags["pipeline.sweep.best.model"] == study.best_params["model"]
    assert float(parent.data.tags["pipeline.sweep.best.model.optimizer.lr"]) == study.best_params["model.optimizer.lr"]
    assert set(json.loads(parent.data.tags["pipeline.sweep.space"])) == set(study.best_params)


def test_a_sweep_killed_after_two_trials_and_run_again_runs_only_the_missing_trials(workdir: Path):
    args = ["-m", "pipeline.cli.train", "hparams_search=fcn_optuna", "hydra.sweeper.n_trials=4", *TINY]
    proc = subprocess.Popen([sys.executable, *args], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((workdir / "outputs" / "train" / "multiruns").glob("*/2")):
            break  # trials 0 and 1 are done, trial 2 has started
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.kill()
    proc.wait()
    sweep_dir = _sweep_dir(workdir)
    first_parent, _ = _runs(workdir)
    killed = _study(sweep_dir).trials[2]
    assert killed.state == TrialState.RUNNING

    run_main(
        "train", *args[2:], f"hydra.sweep.dir={sweep_dir}", cwd=workdir, check=True
    )  # the same command, in its sweep dir

    study = _study(sweep_dir)
    assert _states(study) == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert study.trials[3].params == killed.params  # the killed trial's params, retried
    assert study.trials[4].params not in [t.params for t in study.trials[:4]]
    assert _job_dirs(sweep_dir) == {"0", "1", "2", "3", "4"}  # 2 new jobs only, numbered after the study's trials
    results = OmegaConf.load(sweep_dir / "optuna_results.yaml")
    assert results.n_complete == 4 and results.best_value == study.best_value
    parent, children = _runs(workdir)
    assert parent.info.run_id == first_parent.info.run_id and parent.info.status == "FINISHED"  # the same parent
    assert [children[j].info.status for j in (0, 1, 3, 4)] == ["FINISHED"] * 4
    assert 2 not in children or children[2].info.status == "KILLED"  # the killed trial's run, if it had one
    assert parent.data.metrics["best/val/mIoU"] == study.best_value


def test_a_failing_trial_is_failed_in_the_study_and_the_sweep_goes_on(workdir: Path):
    # Command-line overrides win over the search space: `x=a,b` is searched as a choice, `model=fcn32s` fixes it.
    # AdamW rejects lr=-1 when the job builds its optimizer.
    run_main(
        "train", "hparams_search=fcn_optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler=random",
        "model.optimizer.lr=0.01,-1", "model=fcn32s", *TINY, cwd=workdir, check=True,
    )  # fmt: skip

    study = _study(_sweep_dir(workdir))
    by_lr = {t.params["model.optimizer.lr"]: t.state for t in study.trials}
    assert set(by_lr) == {0.01, -1}, "the seeded sampler should try both values"
    for trial in study.trials:
        assert trial.state == (TrialState.FAIL if trial.params["model.optimizer.lr"] == -1 else TrialState.COMPLETE)
        assert trial.params.keys() == {"model.optimizer.lr", "model.optimizer.weight_decay"}
    results = OmegaConf.load(_sweep_dir(workdir) / "optuna_results.yaml")
    assert results.best_params["model.optimizer.lr"] == 0.01 and results.n_trials == 4
