"""The MLflow model registry: a run's checkpoint as a registered model version, and `models:/` URIs back to a file.

A registered version holds the pipeline-train `.ckpt` file itself, as the artifact of an MLflow 3 logged model
(MlflowClient's `create_logged_model`, `log_model_artifacts`, `finalize_logged_model`, `create_model_version`).
`mlflow.pytorch.log_model` would store a pickled or `pt2`-exported net instead (pt2 needs an input example and
cannot export every model here), which `pipeline-eval` and `pipeline-predict` could not load with the
checkpoint's config, anchors and category ids; `mlflow.pyfunc.log_model` would add a Python wrapper and infer pip
requirements on every registration. The client calls are the thinnest public route that gives the same records
as a flavour's `log_model`: the logged model names its source run (with the run's params), the run lists it
among its outputs, the run's metrics at the checkpoint's validation are linked to it, and it carries the
`mlflow.modelVersions` tag through which MLflow's UI lists its registered versions.

The version's source is the logged model's storage location, not `models:/<model id>`: MLflow 3.17's SQLite
registry resolves a `models:/` source through the process-wide tracking URI instead of the client's (a TODO in
its `create_model_version`), so the call fails, or writes `./mlflow.db` in the current directory, whenever that
differs from the store the model is registered in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow.artifacts
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import ConfigError
from pipeline.tracking import store
from pipeline.training.checkpoint import load_checkpoint

SCHEME = "models:/"


def register_checkpoint(tracking_uri: str, run_id: str, ckpt: Path, name: str) -> int:
    """Log `ckpt` as a logged model of run `run_id` and register it as a new version of `name` (created if
    missing); returns the version number. A file that is not a pipeline-train checkpoint is refused first."""
    ckpt = Path(ckpt)
    state = load_checkpoint(ckpt)
    client = store.client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"register={name}: run {run_id} of {ckpt} is not in the store {tracking_uri}.") from None
    step = _validation_step(client, run_id, state)
    model = client.create_logged_model(
        run.info.experiment_id,
        name=ckpt.stem,
        source_run_id=run_id,
        params=dict(run.data.params),
        tags={"pipeline.checkpoint": str(ckpt), "pipeline.global_step": str(state["global_step"])},
        model_type="pipeline-checkpoint",
    )
    try:
        with tempfile.TemporaryDirectory() as folder:  # log_model_artifacts uploads a whole folder
            shutil.copyfile(ckpt, Path(folder) / ckpt.name)
            client.log_model_artifacts(model.model_id, folder)
        client.log_batch(run_id, metrics=_metrics_at(client, run, step, model.model_id))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise ConfigError(f"register={name}: MLflow refuses this model name ({err.message})") from None
    version = client.create_model_version(
        name,
        source=model.artifact_location,
        run_id=run_id,
        tags={"pipeline.model_id": model.model_id, "pipeline.checkpoint": str(ckpt)},
        description=f"{ckpt.name} of run {run_id} (step {state['global_step']})",
        model_id=model.model_id,
    )
    client.set_logged_model_tags(
        model.model_id, {"mlflow.modelVersions": json.dumps([{"name": name, "version": str(version.version)}])}
    )
    return int(version.version)


def _validation_step(client: MlflowClient, run_id: str, state: dict) -> int:
    """The step at which the run logged the validation that `state` was saved after (Lightning logs an epoch's
    validation at the last training step, one before the checkpoint's `global_step`); `global_step` when none."""
    global_step = int(state["global_step"])
    monitor = state["pipeline"]["config"].get("model", {}).get("monitor")
    steps = [m.step for m in client.get_metric_history(run_id, monitor)] if monitor else []
    return max((s for s in steps if s < global_step), default=global_step)


def _metrics_at(client: MlflowClient, run, step: int, model_id: str) -> list[Metric]:
    """The run's metric values logged at `step`, again, now linked to the logged model (as `log_model` links)."""
    return [
        Metric(m.key, m.value, m.timestamp, m.step, run_id=run.info.run_id, model_id=model_id)
        for key in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, key)
        if m.step == step and m.model_id is None and not key.startswith(("system/", "summary/"))
    ]  # system metrics count samples in `step`, summary metrics describe the whole run


def checkpoint_from_model_uri(model_uri: str, tracking_uri: str) -> Path:
    """The local checkpoint file of `models:/<name>/<version>`, `models:/<name>@<alias>` or `models:/<model id>`.

    Downloaded once into `$XDG_CACHE_HOME/pipeline/models/` (default `~/.cache`), keyed by the artifact location:
    a logged model's files never change. A name, version, alias or model id the store does not have is a
    ConfigError naming what it does have.
    """
    client = store.client(tracking_uri)
    source = _artifact_location(client, model_uri, tracking_uri)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline" / "models"
    folder = cache / hashlib.sha256(source.encode()).hexdigest()[:32]
    if not folder.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        partial = tempfile.mkdtemp(dir=cache, prefix=".download-")
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=partial, tracking_uri=tracking_uri)
            os.rename(partial, folder)  # complete or absent: a killed download never looks cached
        except OSError:
            if not folder.is_dir():  # not a concurrent download that finished first
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    files = sorted(folder.rglob("*.ckpt"))
    if len(files) != 1:
        found = ", ".join(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) or "nothing"
        raise ConfigError(
            f"model_uri={model_uri} ({source}) holds no single pipeline-train checkpoint (.ckpt) but: {found}. "
            "Register checkpoints with pipeline-train register=<name>."
        )
    return files[0]


def _artifact_location(client: MlflowClient, model_uri: str, tracking_uri: str) -> str:
    """Where the files of the model version, alias or logged model that `model_uri` names are stored."""
    if not model_uri.startswith(SCHEME) or not model_uri[len(SCHEME) :]:
        raise ConfigError(
            f"model_uri={model_uri}: expected models:/<name>/<version>, models:/<name>@<alias> or models:/<model id>."
        )
    rest = model_uri[len(SCHEME) :]
    try:
        if "/" in rest:  # registered model names cannot contain '/'
            name, version = rest.split("/", 1)
            if not version.isdigit():
                raise ConfigError(f"model_uri={model_uri}: the version after '/' is a number ({_known(client, name)}).")
            return client.get_model_version_download_uri(name, version)
        if "@" in rest:
            name, alias = rest.rsplit("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
            return client.get_model_version_download_uri(name, str(version))
        if rest.startswith("m-"):
            return client.get_logged_model(rest).artifact_location
    except MlflowException:
        if "/" not in rest and "@" not in rest:
            raise ConfigError(f"model_uri={model_uri}: no logged model {rest} in {tracking_uri}.") from None
        raise ConfigError(f"model_uri={model_uri}: not in {tracking_uri}: {_known(client, name)}.") from None
    raise ConfigError(f"model_uri={model_uri}: give a version or an alias, {_known(client, rest)}.")


def _known(client: MlflowClient, name: str) -> str:
    """What the registry has under `name`: its versions and aliases, or the registered model names."""
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        return f"there is no registered model '{name}' (registered models: {', '.join(names) or 'none'})"
    quoted = name.replace("'", "\\'")
    versions: list[ModelVersion] = list(client.search_model_versions(f"name = '{quoted}'"))
    numbers = sorted(int(v.version) for v in versions)
    aliases = ", ".join(f"@{a} = {v}" for a, v in sorted(registered.aliases.items())) or "none"
    return f"registered model '{name}' has versions {', '.join(map(str, numbers)) or 'none'}; aliases: {aliases}"
