"""Run identity for the MLflow UI: git state of a real checkout, single-run names, dataset names and digests."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.sweeps.jobs import run_name
from pipeline.tracking.summary import RunSummary, dataset_input, dataset_name, git_state, source_tags


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A real git checkout with one committed file and an ignored folder."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("lr = 0.1\n")
    (repo / ".gitignore").write_text("outputs/\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


def test_a_clean_checkout_is_not_dirty_and_names_its_commit_and_branch(repo: Path):
    (repo / "outputs").mkdir()
    (repo / "outputs" / "run.log").write_text("ignored files do not count\n")
    state = git_state(repo)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert state is not None and state.commit == head and state.branch == "main"
    assert not state.dirty and state.patch == ""
    tags = source_tags("pipeline-train", state)
    assert tags["pipeline.git.dirty"] == "false" and tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.source.name"] == "pipeline-train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and "mlflow.source.git.repoURL" not in tags  # no origin remote here


def test_uncommitted_changes_make_the_checkout_dirty_with_their_diff_and_untracked_files(repo: Path):
    (repo / "train.py").write_text("lr = 0.2\n")
    (repo / "new_model.py").write_text("x = 1\n")
    state = git_state(repo)
    assert state.dirty
    assert "-lr = 0.1" in state.patch and "+lr = 0.2" in state.patch
    assert "new_model.py" in state.patch  # untracked: named, not diffed
    assert source_tags("pipeline-train", state)["pipeline.git.dirty"] == "true"


def test_outside_a_checkout_there_is_no_git_state(tmp_path: Path):
    assert git_state(tmp_path) is None
    assert source_tags("pipeline-train", None)["pipeline.git.dirty"] == "unknown"


def test_single_run_names_lead_with_model_and_overrides_and_end_with_the_run_dirs_digest():
    overrides = ["experiment=shapes_fcn", "model.optimizer.lr=0.01", "data.batch_size=4", "paths.root=/x",
                 "logger.tracking_uri=sqlite:///y", "trainer.max_epochs=3", "ckpt_path=/z", "data.num_workers=0",
                 "callbacks.progress_bar.refresh_rate=5"]  # fmt: skip
    suffix = hashlib.sha1(b"/runs/2026-12-03_10-00-00-123").hexdigest()[:4]
    name = run_name("FCN-8s-vgg_tiny", overrides, "/runs/2026-12-03_10-00-00-123")
    assert name == f"FCN-8s-vgg_tiny-lr0.01-bs4-ep3-{suffix}"  # no data choice outside Hydra
    assert run_name("FCN-8s-vgg_tiny", [], "/runs/a") != run_name("FCN-8s-vgg_tiny", [], "/runs/b")
    long = run_name("FCN-8s-vgg_tiny", [f"model.k{i}=1" for i in range(40)], "/runs/a")
    assert len(long) == 80 + 5 and long.endswith("…-" + hashlib.sha1(b"/runs/a").hexdigest()[:4])


@pytest.mark.parametrize(
    ("folders", "name"),
    [(["data/shapes/train", "data/shapes/val"], "shapes"),
     (["shared/bccd/train/images", "shared/bccd/valid/images"], "bccd"),
     (["cells/images", "cells/images"], "cells")],
)  # fmt: skip
def test_a_dataset_is_named_by_the_folder_its_splits_share(tmp_path: Path, folders: list[str], name: str):
    assert dataset_name([tmp_path / f for f in folders]) == name


class _Report:
    def summary(self) -> dict:
        return {"images": 2}


class _Source:
    """The two things dataset_input reads of a data source: its files, folder and check report."""

    def __init__(self, folder: Path) -> None:
        self.images_dir, self.annotations, self.report = folder, None, _Report()

    def files(self) -> list[Path]:
        return sorted(self.images_dir.iterdir())


def test_the_dataset_digest_follows_the_files_not_where_they_lie(tmp_path: Path):
    (tmp_path / "a").mkdir()
    for i in range(2):
        (tmp_path / "a" / f"{i}.png").write_bytes(b"x" * (i + 1))
    first = dataset_input(_Source(tmp_path / "a"), "toy", "train")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2: same names, sizes and mtimes
    moved = dataset_input(_Source(tmp_path / "b"), "toy", "train")
    assert first.dataset.digest == moved.dataset.digest and len(first.dataset.digest) == 16
    assert [(t.key, t.value) for t in first.tags] == [("mlflow.data.context", "train")]
    (tmp_path / "b" / "1.png").write_bytes(b"yyy")  # rewritten: another size
    assert dataset_input(_Source(tmp_path / "b"), "toy", "train").dataset.digest != first.dataset.digest
    os.remove(tmp_path / "b" / "0.png")
    assert dataset_input(_Source(tmp_path / "b"), "toy", "train").dataset.digest != first.dataset.digest


def test_a_checkpoint_holds_the_wall_time_of_the_fit_so_far_on_top_of_the_resumed_runs():
    summary = RunSummary(None, "sqlite://", "val/mIoU")
    summary.load_state_dict({"wall_time_s": 5.0, "train_time_s": 2.0, "images": 10, "best": 0.5, "best_epoch": 1})
    summary.on_fit_start(SimpleNamespace(is_global_zero=True), None)
    time.sleep(0.2)
    state = summary.state_dict()  # what a checkpoint saved now holds
    assert 5.2 <= state["wall_time_s"] < 6.0 and state["train_time_s"] == 2.0 and state["images"] == 10
