"""`hydra/sweeper=pipeline_optuna`: Optuna's ask-and-tell API over Hydra overrides, one launcher job per trial.

Ours because hydra-optuna-sweeper 1.3.0 needs optuna<3 (whose RDB storage fails with SQLAlchemy 2) and its Optuna 4
port needs the unreleased hydra-core 1.4. The study lives in the sweep dir, so a re-run with
`hydra.sweep.dir=<that dir>` resumes it: finished trials count toward `n_trials`, trials a killed sweep left
running are failed and retried.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside sys.modules, where a
# dataclass cannot resolve string annotations.
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from pipeline.metrics.monitor import monitor_mode

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class PipelineOptunaSweeperConf:
    """Settings of `hydra/sweeper=pipeline_optuna` (`hydra.sweeper.*`)."""

    _target_: str = "hydra_plugins.pipeline_optuna_sweeper.optuna_sweeper.PipelineOptunaSweeper"
    # key: choice(a,b) | interval(lo,hi) | tag(log, interval(lo,hi)) | range(a,b[,step]) | int(interval(a,b)) | value
    params: dict[str, Any] | None = None
    direction: str = "auto"  # auto: minimize when model.monitor is a loss, else maximize; or minimize / maximize
    n_trials: int = 8  # finished trials the study should hold (a resumed study counts its earlier ones)
    n_jobs: int = 1  # trials asked and launched together (hydra/launcher=joblib runs them in parallel)
    sampler: str = "tpe"  # tpe or random
    seed: int | None = "${seed}"  # type: ignore[assignment]  # resolved by OmegaConf
    study_name: str = "pipeline"
    storage: str | None = "sqlite:///${hydra.sweep.dir}/optuna.db"  # null: in memory, not resumable
    # median: a trial whose monitored metric after an epoch is worse than the median of earlier trials' at that epoch
    # stops there (reported from the job, pipeline.sweeps.jobs.OptunaPruning); needs a storage the jobs can open.
    pruner: str | None = None
    pruner_startup_trials: int = 2  # trials that always run to the end before any is pruned


ConfigStore.instance().store(
    group="hydra/sweeper", name="pipeline_optuna", node=PipelineOptunaSweeperConf, provider="pipeline_optuna_sweeper"
)


def distribution(override: Override) -> BaseDistribution | None:
    """The Optuna distribution of a sweep override; None for a plain value."""
    if not override.is_sweep_override():
        return None
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        choices = [x.text if isinstance(x, QuotedString) else x for x in override.sweep_iterator()]
        if not all(x is None or isinstance(x, (str, int, float, bool)) for x in choices):
            raise ValueError(f"'{override.input_line}': choices must be strings, numbers, booleans or null")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):  # as hydra-optuna-sweeper: Optuna's bounds, so `stop` is included
        if all(isinstance(x, int) for x in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, value.stop, step=value.step)
        return FloatDistribution(value.start, value.stop, step=value.step)
    if isinstance(value, IntervalSweep):  # interval() gives floats; int(interval()) gives ints
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"'{override.input_line}': not a sweep this sweeper understands")


def parse_search_space(overrides: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Split overrides into Optuna's search space and fixed overrides (kept verbatim); a later one of a key wins."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        dist = distribution(override)
        if dist is None:
            fixed[key] = str(override.input_line)
        else:
            space[key] = dist
    return space, fixed


def study_direction(direction: str, monitor: str | None) -> str:
    """The study's direction: minimize or maximize as given; auto follows the monitored metric (a loss is minimized)."""
    if direction in ("minimize", "maximize"):
        return direction
    if direction != "auto":
        raise ValueError(f"hydra.sweeper.direction={direction!r}: choose auto, minimize or maximize")
    if not monitor:
        raise ValueError("hydra.sweeper.direction=auto needs model.monitor; set minimize or maximize")
    return "minimize" if monitor_mode(monitor) == "min" else "maximize"


def trial_value(ret: JobReturn, number: int) -> float | None:
    """The job's return value as a finite float, or None (logged) when it failed or gave None, NaN or inf."""
    try:
        returned = ret.return_value  # re-raises the job's exception
    except Exception as err:
        log.warning(f"Trial {number} failed: {err!r}", exc_info=err)
        return None
    try:
        value = float(returned)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        log.warning(f"Trial {number} returned {returned!r}, not a finite value of the monitored metric: failed")
        return None
    return value


class PipelineOptunaSweeper(Sweeper):
    """Asks Optuna for trials, runs each as a job of `hydra/launcher`, tells the study the job's return value."""

    def __init__(
        self,
        params: dict[str, Any] | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: str,
        seed: int | None,
        study_name: str,
        storage: str | None,
        pruner: str | None,
        pruner_startup_trials: int,
    ) -> None:
        if sampler not in ("tpe", "random"):
            raise ValueError(f"hydra.sweeper.sampler={sampler!r}: choose tpe or random")
        if pruner not in (None, "median") or (pruner and storage is None):
            raise ValueError(f"hydra.sweeper.pruner={pruner!r}: choose null or median (with a storage)")
        if n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_jobs={n_jobs}: at least 1 trial per batch")
        self.params, self.direction, self.n_trials, self.n_jobs = dict(params or {}), direction, n_trials, n_jobs
        self.sampler, self.seed, self.study_name, self.storage = sampler, seed, study_name, storage
        # The jobs build the pruner (pipeline.sweeps.jobs.OptunaPruning) from their own copy of this config.
        self.pruner = pruner

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the config and build the launcher that runs the trials."""
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def sweep(self, arguments: list[str]) -> None:
        """Run trials until the study holds `n_trials` finished ones, then write optuna_results.yaml."""
        # Command-line overrides come last so they win: `x=3` fixes a searched key, `x=1,2` searches over it.
        space, fixed = parse_search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        direction = study_direction(self.direction, OmegaConf.select(self.config, "model.monitor"))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)  # SQLite creates the file but not its directory
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, direction=direction, load_if_exists=True
        )
        if study.direction.name.lower() != direction:  # a loaded study keeps the direction it was created with
            raise ValueError(f"study '{self.study_name}' in {self.storage} does not {direction}: use another one")
        # Trials that ended count toward n_trials; a killed sweep's RUNNING ones do not: they are failed, and their
        # params enqueued so they are retried as one of the remaining trials.
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning(f"Trial {trial.number} was left running by an earlier sweep: failed, retrying its params")
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params)
        # Seed offset by the trials so far: a resumed sweep must not replay the first sweep's random suggestions.
        seed = None if self.seed is None else self.seed + len(study.trials)
        sampler = optuna.samplers.TPESampler if self.sampler == "tpe" else optuna.samplers.RandomSampler
        study.sampler = sampler(seed=seed)
        remaining = self.n_trials - done
        log.info(f"Study '{self.study_name}' ({direction}) in {self.storage}: {max(remaining, 0)} trials to run")

        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            overrides = [[*fixed.values(), *(f"{k}={Transformer.str(v)}" for k, v in t.params.items())] for t in trials]
            try:
                # Job dir N runs trial N (one process numbers a batch consecutively): a resume never reuses a job dir.
                returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            except Exception:  # e.g. a job config that does not compose: no retry on resume, it would fail again
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            for trial, ret in zip(trials, returns, strict=True):
                value = trial_value(ret, trial.number)
                if self.pruner and study.trials[trial.number].user_attrs.get("pruned_at_epoch") is not None:
                    study.tell(trial, state=TrialState.PRUNED)  # stopped by the job's pruning callback
                    log.info(f"Trial {trial.number}: pruned")
                    continue
                if value is None:
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                study.tell(trial, value)
                log.info(f"Trial {trial.number}: {value:.6g} (best so far: {study.best_value:.6g})")
            remaining -= len(trials)
        self._report(study, direction)

    def _report(self, study: optuna.Study, direction: str) -> None:
        """Write <sweep dir>/optuna_results.yaml and print the best trial (failed trials are listed by the sweep)."""
        finished = study.get_trials(deepcopy=False, states=FINISHED)
        complete = [t for t in finished if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        results = {
            "name": "pipeline_optuna",
            "study_name": study.study_name,
            "storage": self.storage,
            "direction": direction,
            "n_trials": len(finished),
            "n_complete": len(complete),
            "best_trial": best.number if best else None,
            "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else None,
        }
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optuna_results.yaml")
        if best is None:
            log.error(f"No trial completed: see the job logs in {self.sweep_dir}")
            return
        print(f"Best trial {best.number} (job dir {self.sweep_dir / str(best.number)}): value {best.value:.6g}")
        print(f"  params: {best.params}\n  results: {self.sweep_dir / 'optuna_results.yaml'}")
