"""`hydra/sweeper=pipeline_optuna`: Optuna sweeps as real processes (study, results, resume, failed trials)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.pipeline_optuna_sweeper.optuna_sweeper import parse_search_space, study_direction, trial_value
from tests.conftest import ROOT, TINY, run_cli

FCN_SEARCH = OmegaConf.load(ROOT / "conf" / "hparams_search" / "fcn_optuna.yaml").hydra.sweeper.params


def _sweep_dir(workdir: Path) -> Path:
    (sweep_dir,) = (workdir / "outputs" / "train" / "multiruns").iterdir()
    return sweep_dir


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="pipeline", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def _job_dirs(sweep_dir: Path) -> set[str]:
    return {p.name for p in sweep_dir.iterdir() if p.is_dir()}


def _states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def test_fcn_optuna_sweep_fills_the_study_and_writes_the_best_trial(workdir: Path):
    proc = run_cli("train", "hparams_search=fcn_optuna", "hydra.sweeper.n_trials=4", *TINY, cwd=workdir)

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

    results = OmegaConf.load(sweep_dir / "optuna_results.yaml")
    assert results.best_value == max(values) == study.best_value
    assert results.best_params == study.best_params
    assert results.direction == "maximize" and results.n_trials == 4 and results.n_complete == 4
    assert f"Best trial {study.best_trial.number}" in proc.stdout
    # each trial's sampled values reached its job's config
    best_job = OmegaConf.load(sweep_dir / str(study.best_trial.number) / ".hydra" / "overrides.yaml")
    assert f"model={study.best_params['model']}" in best_job


def test_rerun_in_the_same_sweep_dir_resumes_the_study_and_retries_a_killed_trial(workdir: Path):
    args = ["hparams_search=fcn_optuna", *TINY]
    run_cli("train", *args, "hydra.sweeper.n_trials=2", cwd=workdir)
    sweep_dir = _sweep_dir(workdir)
    assert _job_dirs(sweep_dir) == {"0", "1"}

    # A sweep killed mid-trial leaves that trial RUNNING in the study (its job dir may not even exist yet).
    space, _ = parse_search_space([f"{k}={v}" for k, v in FCN_SEARCH.items()])
    killed = _study(sweep_dir).ask(space)
    assert killed.number == 2

    # n_trials=5: 3 finished (2 complete + the killed one, failed on resume), so 2 more: its retry and a new trial.
    run_cli("train", *args, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={sweep_dir}", cwd=workdir)

    study = _study(sweep_dir)
    assert _states(study) == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert study.trials[3].params == killed.params  # the killed trial's params, retried
    assert study.trials[4].params not in [t.params for t in study.trials[:4]]
    assert _job_dirs(sweep_dir) == {"0", "1", "3", "4"}  # only the 2 new jobs, numbered after the study's trials
    assert OmegaConf.load(sweep_dir / "optuna_results.yaml").n_trials == 5


def test_a_failing_trial_is_failed_in_the_study_and_the_sweep_goes_on(workdir: Path):
    # Command-line overrides win over the search space: `x=a,b` is searched as a choice, `model=fcn32s` fixes it.
    # AdamW rejects lr=-1 when the job builds its optimizer.
    run_cli(
        "train", "hparams_search=fcn_optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler=random",
        "model.optimizer.lr=0.01,-1", "model=fcn32s", *TINY, cwd=workdir,
    )  # fmt: skip

    study = _study(_sweep_dir(workdir))
    by_lr = {t.params["model.optimizer.lr"]: t.state for t in study.trials}
    assert set(by_lr) == {0.01, -1}, "the seeded sampler should try both values"
    for trial in study.trials:
        assert trial.state == (TrialState.FAIL if trial.params["model.optimizer.lr"] == -1 else TrialState.COMPLETE)
        assert trial.params.keys() == {"model.optimizer.lr", "model.optimizer.weight_decay"}
    results = OmegaConf.load(_sweep_dir(workdir) / "optuna_results.yaml")
    assert results.best_params["model.optimizer.lr"] == 0.01 and results.n_trials == 4


def test_search_space_grammar_and_direction():
    space, fixed = parse_search_space(
        [
            "model=choice(fcn8s, fcn16s)",
            "a=interval(0, 1)",
            "b=tag(log, interval(1e-4, 1e-2))",
            "c=range(1, 5)",
            "d=range(0, 10, 2)",
            "e=int(interval(1, 8))",
            "f=tag(log, int(interval(1, 64)))",
            "g=0.5,1.5",  # a command-line sweep
            "h=3",
            "+i='x y'",
            "a=0.25",  # a later plain value fixes a searched key
            "h=1,2",  # and a later sweep searches a fixed one
        ]
    )
    assert space == {
        "model": CategoricalDistribution(["fcn8s", "fcn16s"]),
        "b": FloatDistribution(1e-4, 1e-2, log=True),
        "c": IntDistribution(1, 5),  # as hydra-optuna-sweeper: the upper bound is included
        "d": IntDistribution(0, 10, step=2),
        "e": IntDistribution(1, 8),
        "f": IntDistribution(1, 64, log=True),
        "g": CategoricalDistribution([0.5, 1.5]),
        "h": CategoricalDistribution([1, 2]),
    }
    assert fixed == {"a": "a=0.25", "+i": "+i='x y'"}  # kept verbatim for the job
    assert parse_search_space(["x=interval(0, 1)"])[0] == {"x": FloatDistribution(0.0, 1.0)}

    assert study_direction("auto", "val/mIoU") == "maximize"
    assert study_direction("auto", "val/map") == "maximize"
    assert study_direction("auto", "val/loss") == "minimize"
    assert study_direction("minimize", "val/mIoU") == "minimize"
    with pytest.raises(ValueError, match="direction"):
        study_direction("down", "val/loss")


def _job_return(value: object, status: JobStatus = JobStatus.COMPLETED) -> JobReturn:
    ret = JobReturn()
    ret.return_value, ret.status = value, status
    return ret


def test_only_a_finite_return_value_completes_a_trial():
    assert trial_value(_job_return(0.5), 0) == 0.5
    for value in (None, math.nan, math.inf):
        assert trial_value(_job_return(value), 0) is None
    assert trial_value(_job_return(ValueError("boom"), JobStatus.FAILED), 0) is None
