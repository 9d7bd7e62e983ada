"""Bad or non-latest checkpoints are refused with one paragraph naming the file, before any MLflow run is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from pipeline.cli import CONF_DIR
from pipeline.training.checkpoint import CheckpointError, argv_for_resume, check_latest, check_model, load_checkpoint
from pipeline.training.loading import load_task
from tests.helpers import FAMILIES, TINY, run_dirs, run_main, tracking_uri, train_project

pytestmark = pytest.mark.slow

# Three epochs of 4 steps; best.ckpt is only considered every second epoch, so it stays at epoch 1 (step 8) while
# last.ckpt goes on to epoch 2 (step 12): the run dir a user has after a run whose best epoch was not its last.
EPOCHS = ["trainer.max_epochs=3", "+callbacks.best_checkpoint.every_n_epochs=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, _migrated_store: Path) -> Path:
    """One tiny FCN training shared by this module's tests (its own project dir and store)."""
    return train_project(tmp_path_factory.mktemp("bad-checkpoints"), _migrated_store, *FAMILIES["fcn"], *EPOCHS)


def _ckpt(workdir: Path, name: str = "last.ckpt") -> Path:
    """A checkpoint of the module's training (the first run dir; refused commands may add empty ones)."""
    return run_dirs(workdir)[0] / "checkpoints" / name


def _store(workdir: Path) -> list[tuple]:
    """Every run of the store with what a refused command must not change: status, times, tags, params."""
    client = MlflowClient(tracking_uri(workdir))
    experiments = [e.experiment_id for e in client.search_experiments()]
    return sorted((r.info.run_id, r.info.status, r.info.start_time, r.info.end_time, sorted(r.data.tags.items()),
                   len(r.data.params)) for r in client.search_runs(experiments))  # fmt: skip


def _refused(proc, *expected: str) -> None:
    """Exit 1, one `error:` message with every expected part, no traceback."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert "error:" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("error:") :]
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def _resave(source: Path, target: Path, edit) -> Path:
    """A copy of a real checkpoint with `edit(state)` applied: what an older version or another config wrote."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, target)
    return target


def _cfg(overrides: list[str]) -> DictConfig:
    """The training config a `pipeline-train <overrides>` command composes (as Hydra gives it to the job)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/run"  # set by Hydra when a job really runs
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _check_model(path: Path, overrides: list[str]) -> None:
    cfg = _cfg([*TINY, *overrides])
    check_model(path, load_checkpoint(path), instantiate(cfg.model), cfg)


# --- the file itself: each refused by load_checkpoint, which train, eval and predict all go through -------------


def _flip(data: bytes) -> bytes:
    """64 bytes inverted in the middle, inside a tensor's data: torch's own reader loads that without noticing."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


# case: (write the bad file at `target` from the run's real last.ckpt, what the message must say)
BAD_FILES = {
    "truncated": (lambda last, target: target.write_bytes(last.read_bytes()[: last.stat().st_size // 2]),
                  "is truncated or corrupt"),
    "flipped bytes": (lambda last, target: target.write_bytes(_flip(last.read_bytes())), "is truncated or corrupt"),
    "empty": (lambda last, target: target.write_bytes(b""), "is empty (0 bytes)"),
    "random bytes": (lambda last, target: target.write_bytes(os.urandom(4096)), "is not a checkpoint"),
    "text": (lambda last, target: target.write_text("epoch: 3\n"), "is not a checkpoint"),
    "a tensor": (lambda last, target: torch.save(torch.zeros(3), target),
                 "not written by pipeline-train: it holds a Tensor"),
    "a state_dict": (lambda last, target: torch.save(torch.nn.Linear(2, 2).state_dict(), target),
                     "not written by pipeline-train: it holds a dict with keys ['bias', 'weight']"),
    "a module": (lambda last, target: torch.save(torch.nn.Linear(2, 2), target),
                 "holds Python objects that a weights-only load refuses (Unsupported global"),
    "no format": (lambda last, target: _resave(last, target, lambda s: s["pipeline"].pop("format")),
                  "written by an older, incompatible version of pipeline-train (checkpoint format none"),
    "a newer format": (lambda last, target: _resave(last, target, lambda s: s["pipeline"].update(format=99)),
                       "written by a newer, incompatible version of pipeline-train (checkpoint format 99"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_is_refused_with_its_name_and_reason_by_train_eval_and_predict(trained: Path, tmp_path: Path,
                                                                                 case: str):  # fmt: skip
    write, reason = BAD_FILES[case]
    bad = tmp_path / "model.ckpt"
    write(_ckpt(trained), bad)
    for load in (load_checkpoint, load_task):  # load_task: what pipeline-eval and pipeline-predict use
        with pytest.raises(CheckpointError) as err:
            load(bad)
        assert str(bad) in str(err.value) and reason in str(err.value)
    with pytest.raises(CheckpointError) as err:  # the check main() runs before Hydra picks a run dir
        argv_for_resume(["pipeline-train", f"ckpt_path={bad}"])
    assert reason in str(err.value)


def test_the_runs_own_checkpoints_and_their_mlflow_copies_pass(trained: Path):
    run_id = load_checkpoint(_ckpt(trained))["pipeline"]["mlflow_run_id"]
    artifact = trained / "outputs" / "mlartifacts" / run_id / "artifacts" / "last" / "last.ckpt"
    for path in (_ckpt(trained), _ckpt(trained, "best.ckpt"), artifact):
        state = load_checkpoint(path)
        assert state["pipeline"]["format"] == 1 and state["pipeline"]["mlflow_run_id"] == run_id
    check_latest(artifact, load_checkpoint(artifact))  # a copy of last.ckpt is the run's latest state too
    _check_model(_ckpt(trained), [])  # fits the command that trained it


# --- the model: weights that do not fit the model this command builds ------------------------------------------


def test_a_checkpoint_of_another_model_family_is_refused_with_both_families_named(trained: Path):
    with pytest.raises(CheckpointError) as err:
        _check_model(_ckpt(trained), ["model=yolo"])
    message = str(err.value)
    assert str(_ckpt(trained)) in message and "another model family" in message
    assert "SegmentationTask with FCN" in message and "DetectionTask with YOLO" in message


def test_another_number_of_classes_names_the_first_differing_shapes_and_the_class_counts(trained: Path):
    with pytest.raises(CheckpointError) as err:
        _check_model(_ckpt(trained), ["data.num_classes=3", "data.class_names=[background,circle,square]"])
    message = str(err.value)
    assert str(_ckpt(trained)) in message
    assert "net.score.c5.weight is [4, " in message and "in the checkpoint, [3, " in message
    assert "the checkpoint has 4 classes (data.num_classes), this run 3" in message


def test_another_fcn_variant_names_the_missing_keys_and_the_setting_that_differs(trained: Path):
    with pytest.raises(CheckpointError) as err:
        _check_model(_ckpt(trained), ["model=fcn32s"])
    message = str(err.value)
    assert "which this model lacks" in message and "model.net.variant is 8s in the checkpoint, 32s here" in message


def test_eval_refuses_weights_that_no_longer_fit_the_model_their_own_config_builds(trained: Path, tmp_path: Path):
    def rename(state: dict) -> None:  # what a checkpoint of a version whose layer had another name holds
        state["state_dict"]["net.old_score.weight"] = state["state_dict"].pop("net.score.c5.weight")

    old = _resave(_ckpt(trained), tmp_path / "old.ckpt", rename)
    with pytest.raises(CheckpointError) as err:
        load_task(old)
    assert str(old) in str(err.value) and "net.score.c5.weight, which the checkpoint lacks" in str(err.value)
    assert "written by an incompatible version" in str(err.value)


# --- the command line: exit 1, no traceback, the store exactly as it was ------------------------------------------


def test_continue_from_best_ckpt_is_refused_before_anything_is_touched(trained: Path):
    best, last = _ckpt(trained, "best.ckpt"), _ckpt(trained)
    before, last_bytes = _store(trained), last.read_bytes()
    proc = run_main("train", *TINY, *EPOCHS, f"ckpt_path={best}", cwd=trained)
    _refused(proc, f"{best} is not the latest state", "global step 8 (epoch 1)", f"global step 12 (epoch 2) in {last}",
             f"pipeline-train ckpt_path={best} resume_mode=fork")  # fmt: skip
    assert _store(trained) == before and last.read_bytes() == last_bytes
    assert not list(last.parent.parent.glob(".hydra/resume-*"))  # refused before Hydra wrote into the run dir


def test_a_foreign_or_corrupt_checkpoint_is_refused_by_the_cli_with_the_store_untouched(trained: Path,
                                                                                       tmp_path: Path):  # fmt: skip
    before = _store(trained)
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(os.urandom(4096))
    _refused(run_main("train", *TINY, f"ckpt_path={noise}", cwd=trained), f"{noise} is not a checkpoint")
    # continuing the FCN's run as a detector: refused before the run is re-opened
    proc = run_main("train", *TINY, *EPOCHS, "model=yolo", f"ckpt_path={_ckpt(trained)}", cwd=trained)  # fmt: skip
    _refused(proc, str(_ckpt(trained)), "another model family")
    # forking it into torchvision's Mask R-CNN, which shares no layer with it: refused before a new run is created
    tv = [o for o in TINY if not o.startswith("model.net.backbone")]  # its own backbone has no width
    proc = run_main("train", *tv, "model=torchvision_maskrcnn", f"ckpt_path={_ckpt(trained)}", "resume_mode=fork",
                    cwd=trained)  # fmt: skip
    _refused(proc, str(_ckpt(trained)), "shares no weights with the model built here: none of its 63 tensors",
             "(a SegmentationTask with FCN)")  # fmt: skip
    assert _store(trained) == before


def test_continue_with_another_number_of_classes_leaves_the_run_as_it_was(trained: Path):
    # Today's bug: the run was set RUNNING (and its resume tags logged) before the weights met the model.
    before = _store(trained)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    # In this process (pipeline-train's own main): it seeds the generators, then refuses the checkpoint
    proc = run_main("train", *TINY, *EPOCHS, "data.num_classes=3", "data.class_names=[background,circle,square]",
                    f"ckpt_path={_ckpt(trained)}", cwd=trained)  # fmt: skip
    _refused(proc, str(_ckpt(trained)), "the checkpoint has 4 classes (data.num_classes), this run 3")
    assert _store(trained) == before
    assert [status for _, status, *_ in before] == ["FINISHED"]
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream as it was, not re-seeded


def test_fork_from_best_ckpt_starts_a_new_run(trained: Path):  # last: the store then holds two runs
    best = _ckpt(trained, "best.ckpt")
    parent = load_checkpoint(best)["pipeline"]["mlflow_run_id"]
    run_main("train", *TINY, f"ckpt_path={best}", "resume_mode=fork", cwd=trained, check=True)
    client = MlflowClient(tracking_uri(trained))
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    (child,) = [r for r in runs if r.info.run_id != parent]
    assert child.data.tags["pipeline.forked_from"] == parent
