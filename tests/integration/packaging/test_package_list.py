"""Packaging without building: pyproject's explicit package list covers the source tree, and the checkout's own
configs are the ones an editable install runs with (tests/integration/packaging builds and installs the wheel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_names_every_package_of_the_source_tree():
    """A package missing from `packages` is silently left out of the wheel (`packages.find` cannot be used: the
    configs are a package mapped from another folder), so the list must follow every new sub-package."""
    on_disk = {
        ".".join(folder.relative_to(ROOT).parts)
        for top in ("pipeline", "hydra_plugins")
        for folder in [ROOT / top, *(ROOT / top).rglob("*")]
        # hydra_plugins is a namespace package (no __init__.py): Hydra finds its plugins in every copy of it
        if folder.is_dir() and (folder.parent == ROOT or any(folder.glob("*.py")))
    }
    assert on_disk >= {"pipeline", "pipeline.cli", "pipeline.training", "hydra_plugins.pipeline_optuna_sweeper"}
    listed = set(_setuptools()["packages"])
    assert sorted(on_disk - listed) == []
    assert sorted(listed - on_disk - {"pipeline.conf"}) == []


def test_an_editable_install_runs_with_the_checkouts_configs():
    """Edits to conf/ apply without reinstalling: the entry points read the checkout's folder itself."""
    import pipeline
    from pipeline.cli import CONF_DIR

    if not Path(pipeline.__file__).is_relative_to(ROOT):
        pytest.skip(f"pipeline is imported from {pipeline.__file__}, not from this checkout")
    assert Path(CONF_DIR) == ROOT / "conf"
