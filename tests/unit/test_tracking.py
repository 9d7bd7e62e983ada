"""Params that the store cannot hold are shortened, never a crash; changed settings are detected."""

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from omegaconf import OmegaConf

from pipeline import tracking
from tests.conftest import tracking_uri


def test_flatten_shortens_long_values_and_a_real_store_accepts_them(workdir: Path):
    config = {"a": {"b": 1, "long": "x" * (MAX_PARAM_VAL_LENGTH + 500)}, "names": ["bg", "circle"], "empty": {}}
    flat = tracking.flatten(config)
    assert flat["a.b"] == "1" and flat["names"] == '["bg", "circle"]' and flat["empty"] == "{}"
    assert len(flat["a.long"]) == MAX_PARAM_VAL_LENGTH and flat["a.long"].endswith("...")
    client = MlflowClient(tracking_uri(workdir))
    run = client.create_run(tracking.experiment_id(client, "t"))
    tracking.log_params(client, run.info.run_id, flat)
    assert client.get_run(run.info.run_id).data.params["a.long"] == flat["a.long"]


def test_changed_keys_reports_changed_added_and_removed():
    old = {"lr": "0.1", "epochs": "3", "gone": "x"}
    new = {"lr": "0.1", "epochs": "5", "added": "y"}
    assert tracking.changed_keys(old, new) == {"added": (None, "y"), "epochs": ("3", "5"), "gone": ("x", None)}


def test_experiment_is_created_once_and_tagged_for_the_runs_table(workdir: Path):
    client = MlflowClient(tracking_uri(workdir))
    first = tracking.experiment_id(client, "shapes")
    assert tracking.experiment_id(client, "shapes") == first
    assert client.get_experiment(first).tags["mlflow.experimentKind"] == "custom_model_development"


def test_unreachable_server_fails_fast_with_a_clear_message():
    start = time.time()
    with pytest.raises(ConnectionError, match="not reachable"):
        tracking.check_reachable("http://127.0.0.1:9")
    assert time.time() - start < 10


def test_flatten_of_resolved_omegaconf_config():
    cfg = OmegaConf.create({"x": 2, "y": "${x}"})
    assert tracking.flatten(OmegaConf.to_container(cfg, resolve=True)) == {"x": "2", "y": "2"}
