"""Shared fixtures: a migrated MLflow SQLite store per test and a runner for the real console entry points."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Real annotated datasets beside the repository (CI has them; a user's clone may not).
requires_shared = pytest.mark.skipif(
    not (SHARED / "datasets").is_dir(), reason=f"{SHARED / 'datasets'} is absent: real-data tests need ../shared"
)

# The smallest useful shapes run: 16 + 8 images of 64 px, one epoch of a few batches, no loader workers.
TINY = [
    "data.spec.num_train=16",
    "data.spec.num_val=8",
    "data.spec.image_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.train_sizes=[64]",
    "data.val_size=64",
    "model.net.backbone.width=8",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "callbacks.model_summary.max_depth=0",
]


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Create and migrate one SQLite store per session (migrations take seconds); tests copy it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def project_dir(path: Path, store: Path) -> Path:
    """`path` made a project directory with its own MLflow store: a copy of the migrated `store` in outputs/."""
    (path / "outputs").mkdir(parents=True, exist_ok=True)
    shutil.copy(store, path / "outputs" / "mlflow.db")
    return path


@pytest.fixture
def workdir(tmp_path: Path, _migrated_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project directory (outputs/, data/) with its own MLflow store, as the current directory."""
    project_dir(tmp_path, _migrated_store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def long_dir(base: Path, length: int = 120) -> Path:
    """A new directory under `base` whose path is at least `length` characters (a deep clone, a long $HOME)."""
    path = base / "a-project-cloned-somewhere-deep"
    while len(str(path)) < length:
        path = path / "in-a-home-directory-with-long-names"
    path.mkdir(parents=True)
    return path


def long_project_root(tmp_path: Path, store: Path) -> Path:
    """A project root of at least 120 characters with its own copy of the migrated MLflow store."""
    root = long_dir(tmp_path)
    (root / "outputs").mkdir()
    shutil.copy(store, root / "outputs" / "mlflow.db")
    return root


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}"


def run_cli(
    entry: str,
    *overrides: str,
    cwd: Path,
    check: bool = True,
    timeout: int = 600,
    tracking_uri: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.<entry> overrides…` in cwd as a user would; fail with its output on error.

    The run logs to cwd's outputs/mlflow.db unless `tracking_uri` sets MLFLOW_TRACKING_URI; `env` adds variables.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    if any("tests.integration.gate." in o for o in overrides):  # a test's own callback, imported by the training
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    proc = subprocess.run(
        [sys.executable, "-m", f"pipeline.cli.{entry}", *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pipeline.{entry} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_main(entry: str, *overrides: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """`pipeline-<entry> overrides…` through the console script's own main(), in this process, in cwd.

    For commands that do not train (a check, an error, predict): a subprocess would spend ~10 s importing torch.
    Returns what `run_cli(..., check=False)` returns (status, stdout, stderr); `check` fails on a non-zero status.
    """
    module = importlib.import_module(f"pipeline.cli.{entry}")
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    sys.argv = [f"pipeline-{entry}", *overrides]
    os.environ["HYDRA_FULL_ERROR"] = "0"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main()
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # sys.exit("message"): the interpreter would print it
            err.write(f"{exit_.code}\n")
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    if check and code != 0:
        raise AssertionError(f"pipeline-{entry} failed ({code}):\n{out.getvalue()[-4000:]}\n{err.getvalue()[-6000:]}")
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def run_dirs(workdir: Path, task: str = "train") -> list[Path]:
    return sorted((workdir / "outputs" / task / "runs").iterdir())
