"""The import layers hold (import-linter's contracts in pyproject.toml), and an upward import breaks them; the package
never imports the peers of bench/peers.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports with pyproject's contracts, `pipeline` imported from `package_parent`."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([LINT, "--config", str(ROOT / "pyproject.toml")], cwd=package_parent, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_checkout_keeps_its_layers() -> None:
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout
    assert "3 kept, 0 broken" in proc.stdout


def test_an_op_importing_tracking_breaks_the_layers(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "pipeline" / "ops" / "boxes.py").open("a") as boxes:
        boxes.write("from pipeline.tracking import store  # noqa: E402, F401\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1
    assert "pipeline.ops is not allowed to import pipeline.tracking" in proc.stdout
    assert "pipeline.ops.boxes -> pipeline.tracking.store" in proc.stdout


def test_a_peer_import_breaks_the_contract(tmp_path: Path) -> None:
    """ultralytics (AGPL) and segmentation_models_pytorch are bench-only: an import anywhere in the package, even
    inside a function, breaks the contract, whether or not the peers are installed."""
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "pipeline" / "models" / "fcn.py").open("a") as fcn:
        fcn.write("\n\ndef _peer():\n    from ultralytics import YOLO  # noqa: F401\n")
    with (tmp_path / "pipeline" / "ops" / "boxes.py").open("a") as boxes:
        boxes.write("import segmentation_models_pytorch  # noqa: E402, F401\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1
    assert "pipeline.models.fcn -> ultralytics" in proc.stdout
    assert "pipeline.ops.boxes -> segmentation_models_pytorch" in proc.stdout
