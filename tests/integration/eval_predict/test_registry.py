"""The model registry (issue 15.4): a run's best checkpoint as a registered MLflow model version, evaluated and
predicted from `models:/<name>/<version>` and `models:/<name>@<alias>` exactly as from its file."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.tracking.registry import checkpoint_from_model_uri, register_checkpoint
from tests.helpers import (
    FAMILIES,
    TINY,
    assert_checkpoints_uploaded,
    mlflow_server,
    run_dirs,
    run_main,
    tracking_uri,
    train_project,
)

pytestmark = pytest.mark.slow

NAME = "shapes-fcn"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Path:
    """One two-epoch FCN training with its own project dir and SQLite store, its best.ckpt registered as version 1
    of NAME by `register=` (shared by this module's tests)."""
    workdir = train_project(tmp_path_factory.mktemp("registry"), _migrated_store, *FAMILIES["fcn"],
                            "trainer.max_epochs=2", f"register={NAME}")  # fmt: skip
    (run_dir,) = run_dirs(workdir)
    assert (
        f"Registered {run_dir / 'checkpoints' / 'best.ckpt'} as models:/{NAME}/1" in (workdir / "train.out").read_text()
    )
    return workdir


@pytest.fixture(scope="module")
def registered(trained: Path) -> tuple[str, str, Path]:
    """last.ckpt registered too, as version 2 of NAME: (store URI, run id, run dir)."""
    uri = tracking_uri(trained)
    run = _training_run(MlflowClient(uri))
    (run_dir,) = run_dirs(trained)
    assert register_checkpoint(uri, run.info.run_id, run_dir / "checkpoints" / "last.ckpt", NAME) == 2
    return uri, run.info.run_id, run_dir


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The download cache of `models:/` checkpoints, in the test's own folder instead of ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pipeline" / "models"


def _training_run(client: MlflowClient):
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    (run,) = [r for r in runs if "pipeline.kind" not in r.data.tags]
    return run


def _eval(workdir: Path, *source: str) -> tuple[dict[str, float], Path]:
    """metrics.json of one pipeline-eval (in this process) and its run dir."""
    before = set(run_dirs(workdir, "eval")) if (workdir / "outputs" / "eval").exists() else set()
    run_main("eval", *source, "trainer.accelerator=cpu", cwd=workdir, check=True)
    (out,) = set(run_dirs(workdir, "eval")) - before
    return json.loads((out / "metrics.json").read_text())["metrics"], out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_registered_checkpoint_evaluates_by_version_and_alias_as_by_its_file(
    trained: Path, registered: tuple[str, str, Path], cache: Path
):
    uri, _, run_dir = registered
    client = MlflowClient(uri)
    run = _training_run(client)
    best = run_dir / "checkpoints" / "best.ckpt"

    # The logged model: linked to its run both ways, with the run's metrics of best.ckpt's validation.
    version = client.get_model_version(NAME, "1")
    assert version.run_id == run.info.run_id
    model_id = version.tags["pipeline.model_id"]
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run.info.run_id and model.status == LoggedModelStatus.READY
    assert model.params["model.net.variant"] == "8s"
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": NAME, "version": "1"}]
    assert model_id in {o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs}
    linked = {m.key: m.value for m in model.metrics}
    state = torch.load(best, map_location="cpu", weights_only=True)
    (checkpoint,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert linked["val/mIoU"] == pytest.approx(float(checkpoint["best_model_score"]), abs=1e-7)
    assert linked["val/mIoU"] == run.data.metrics["best/val/mIoU"]

    # models:/ resolves to a byte-equal copy of the file, downloaded once.
    local = checkpoint_from_model_uri(f"models:/{NAME}/1", uri)
    assert local.is_relative_to(cache) and _sha(local) == _sha(best)
    assert checkpoint_from_model_uri(f"models:/{model_id}", uri) == local
    assert _sha(checkpoint_from_model_uri(f"models:/{NAME}/2", uri)) == _sha(run_dir / "checkpoints" / "last.ckpt")

    reference, _ = _eval(trained, f"ckpt_path={best}")
    by_version, out = _eval(trained, f"model_uri=models:/{NAME}/1")
    assert by_version == reference  # exactly equal floats
    client.set_registered_model_alias(NAME, "champion", "1")
    by_alias, _ = _eval(trained, f"model_uri=models:/{NAME}@champion")
    assert by_alias == reference
    (eval_run,) = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`pipeline.model_uri` = 'models:/{NAME}/1'"
    )
    assert eval_run.data.tags["pipeline.train_run_id"] == run.info.run_id
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(local)


def test_predict_from_a_model_uri_in_batches_writes_the_masks_of_the_file_one_at_a_time(
    trained: Path, registered: tuple[str, str, Path], cache: Path
):
    best = registered[2] / "checkpoints" / "best.ckpt"
    images = trained / "data" / "shapes" / "images" / "val"
    run_main("predict", f"ckpt_path={best}", f"input={images}", "device=cpu", "batch_size=1", cwd=trained,
             check=True)  # fmt: skip
    run_main("predict", f"model_uri=models:/{NAME}/1", f"input={images}", "device=cpu", "batch_size=3",
             cwd=trained, check=True)  # fmt: skip
    one, batched = run_dirs(trained, "predict")[-2:]
    masks = sorted(p.name for p in (one / "masks").glob("*.png"))
    assert len(masks) == 8 and masks == sorted(p.name for p in (batched / "masks").glob("*.png"))
    for name in masks:
        assert np.array_equal(
            np.asarray(Image.open(one / "masks" / name)), np.asarray(Image.open(batched / "masks" / name))
        )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/nope/1", "no registered model 'nope' (registered models: shapes-fcn)"),
        (f"models:/{NAME}/7", f"registered model '{NAME}' has versions 1, 2; aliases: "),
        (f"models:/{NAME}@nope", f"registered model '{NAME}' has versions 1, 2; aliases: "),
        (f"models:/{NAME}", "give a version or an alias"),
        (f"models:/{NAME}/latest", "the version after '/' is a number"),
        ("models:/m-0123456789abcdef0123456789abcdef", "no logged model m-0123456789abcdef0123456789abcdef"),
        ("runs:/abc/best", "expected models:/<name>/<version>, models:/<name>@<alias> or models:/<model id>"),
    ],
)
def test_a_model_uri_the_registry_does_not_have_names_what_it_has(
    trained: Path, registered: tuple[str, str, Path], cache: Path, uri: str, message: str
):
    image = next((trained / "data" / "shapes" / "images" / "val").iterdir())
    for entry in ("eval", "predict"):
        extra = ["trainer.accelerator=cpu"] if entry == "eval" else [f"input={image}", "device=cpu"]
        proc = run_main(entry, f"model_uri={uri}", *extra, cwd=trained)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("given", [[], ["ckpt_path=x.ckpt", "model_uri=models:/a/1"]], ids=["neither", "both"])
def test_eval_and_predict_need_exactly_one_of_ckpt_path_and_model_uri(tmp_path: Path, given: list[str]):
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    for entry, extra in (("eval", ["trainer.accelerator=cpu"]), ("predict", ["input=image.png", "device=cpu"])):
        proc = run_main(entry, *given, *extra, cwd=tmp_path)
        assert proc.returncode == 1 and "Give exactly one of ckpt_path=" in proc.stderr, proc.stderr
        assert ("both were given" if given else "neither was given") in proc.stderr


def test_train_with_register_on_a_tracking_server_then_eval_by_model_uri(workdir: Path, tmp_path: Path, cache: Path):
    """`pipeline-train … register=<name>` against a real `mlflow server` (artifacts proxied over HTTP): the server's
    REST API lists the run with its metrics, config and checkpoints (merged from test_tracking_server.py's
    test_training_logs_to_a_tracking_server_that_lists_the_run, which trained the same run without register=)."""
    with mlflow_server(workdir) as server:
        proc = run_main("train", *TINY, "register=served", cwd=workdir, tracking_uri=server.uri, check=True)
        (run_dir,) = run_dirs(workdir)
        uri = server.uri
        request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=pipeline")
        experiment_id = json.load(urllib.request.urlopen(request))["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [experiment_id]}).encode()
        search = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
        )
        (run,) = json.load(urllib.request.urlopen(search))["runs"]
        assert run["info"]["status"] == "FINISHED"
        assert any(m["key"] == "val/mIoU" for m in run["data"]["metrics"])
        client = MlflowClient(uri)
        artifacts = {a.path for a in client.list_artifacts(run["info"]["run_id"])}
        assert {"config.yaml", "last", "best"} <= artifacts
        assert not (workdir / "outputs" / "mlartifacts").exists()  # the server decides where artifacts go
        assert_checkpoints_uploaded(client, run["info"]["run_id"], run_dir, workdir / "downloaded")

        best = run_dir / "checkpoints" / "best.ckpt"
        assert f"Registered {best} as models:/served/1" in proc.stdout
        client = MlflowClient(server.uri)
        version = client.get_model_version("served", "1")
        assert version.source.startswith("mlflow-artifacts:/")  # stored by the server, not by a local path
        run_id = version.run_id
        # register_checkpoint itself over HTTP: the next version
        assert register_checkpoint(server.uri, run_id, run_dir / "checkpoints" / "last.ckpt", "served") == 2
        assert _sha(checkpoint_from_model_uri("models:/served/1", server.uri)) == _sha(best)

        evals = []
        for source in (f"ckpt_path={best}", "model_uri=models:/served/1"):
            run_main("eval", source, "trainer.accelerator=cpu", cwd=workdir, tracking_uri=server.uri, check=True)
            evals.append(json.loads((run_dirs(workdir, "eval")[-1] / "metrics.json").read_text())["metrics"])
        assert evals[0] == evals[1]
