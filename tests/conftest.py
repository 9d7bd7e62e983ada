"""Fixtures only (the helpers they use live in tests/helpers.py): one migrated MLflow store per session, and a
fresh project directory with its own copy of it as the current directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import migrate_store, project_dir


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store created and migrated per session (migrations take seconds); tests copy it."""
    return migrate_store(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db")


@pytest.fixture
def workdir(tmp_path: Path, _migrated_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project directory (outputs/, data/) with its own MLflow store, as the current directory."""
    project_dir(tmp_path, _migrated_store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_hydra_state():
    """Each test starts without the HydraConfig a composing test or an in-process entry point left behind (its
    choices would name runs and fill defaults in the next test)."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
