"""The Optuna sweeper's pieces in this process: the search-space grammar, the study's direction, which job results
complete a trial, and the pruning callback against a real Optuna study (the sweeps themselves:
tests/integration/sweeps/test_optuna_sweep.py)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.pipeline_optuna_sweeper.optuna_sweeper import parse_search_space, study_direction, trial_value
from pipeline.sweeps.jobs import OptunaPruning


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


def test_the_pruning_callback_stops_a_trial_below_the_median_of_earlier_ones(tmp_path: Path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="pipeline", storage=storage, direction="maximize")
    for value in (0.8, 0.9):  # two earlier trials, one epoch each
        trial = study.ask()
        trial.report(value, step=0)
        study.tell(trial, value)
    for _ in range(3):
        study.ask()  # trials 2, 3, 4: three jobs (Optuna keeps a trial's first report of a step)

    def epoch(pruning: OptunaPruning, value: float) -> SimpleNamespace:
        trainer = SimpleNamespace(callback_metrics={"val/mIoU": torch.tensor(value)}, sanity_checking=False,
                                  is_global_zero=True, current_epoch=0, should_stop=False)  # fmt: skip
        pruning.on_validation_end(trainer, None)
        return trainer

    above = OptunaPruning(storage, "pipeline", 2, "val/mIoU", startup_trials=2)
    assert not epoch(above, 0.95).should_stop and above.pruned_at_epoch is None
    below = OptunaPruning(storage, "pipeline", 3, "val/mIoU", startup_trials=2)
    assert epoch(below, 0.1).should_stop and below.pruned_at_epoch == 0
    trials = optuna.load_study(study_name="pipeline", storage=storage).trials
    assert trials[3].user_attrs == {"pruned_at_epoch": 0} and trials[2].user_attrs == {}
    patient = OptunaPruning(storage, "pipeline", 4, "val/mIoU", startup_trials=3)  # too few finished trials yet
    assert not epoch(patient, 0.1).should_stop
