"""The configs ship with the package: a wheel built from this checkout holds every YAML of conf/, and installed
into a fresh virtual environment outside the repository it trains from an empty directory, with a user's own
config directory found beside the packaged ones (issue 25.3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

# What pyproject.toml's [project.scripts] promise a user, written out here rather than read from pyproject.
SCRIPTS = {
    "pipeline-train": "pipeline.cli.train:main",
    "pipeline-eval": "pipeline.cli.eval:main",
    "pipeline-predict": "pipeline.cli.predict:main",
    "pipeline-check-data": "pipeline.cli.check_data:main",
    "pipeline-export": "pipeline.cli.export:main",
    "pipeline-report": "pipeline.cli.report:main",
}
# Folders of a checkout that are no part of the source: a wheel built from a fresh clone never sees them.
NOT_SOURCE_AT_TOP = {".git", ".venv", "build", "dist", "outputs", "data"}
NOT_SOURCE = {"__pycache__", ".pytest_cache", ".ruff_cache"}
# The user's own experiment, in a config directory of their own (a sibling of the directory the run starts in).
MY_EXPERIMENT = """\
# @package _global_
tags: [from-my-config-dir]
"""


def _clean_env() -> dict[str, str]:
    """The environment a user's shell would give the installed commands: nothing pointing into this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV"}}
    return {**env, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


def _run(args: list[str | Path], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `args` in `cwd`; fail with its output unless it exits 0."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _copy_source(dest: Path) -> Path:
    """The checkout without its virtual environment, outputs and build leftovers (as a fresh clone has it), so
    the build sees only the source and writes its build/ and egg-info there rather than into the checkout."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        at_top = NOT_SOURCE_AT_TOP if Path(folder) == ROOT else set()
        return {n for n in names if n in at_top or n in NOT_SOURCE or n.endswith(".egg-info")}

    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built once, as `pip wheel .` builds it for a user (isolated build backend)."""
    base = tmp_path_factory.mktemp("wheel")
    source = _copy_source(base / "source")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", base / "dist", source], cwd=base)
    (found,) = (base / "dist").glob("pipeline-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment outside the repository with the wheel installed (no editable install).

    Installing every dependency anew would take minutes, so the new environment sees this one's site-packages
    through a .pth file instead. A folder added by a .pth file is not scanned for .pth files in turn, so this
    environment's editable install of the checkout (a .pth that installs an import finder) stays out.
    """
    path = tmp_path_factory.mktemp("venv") / "venv"
    assert not path.is_relative_to(ROOT), "the fresh environment must lie outside the repository"
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / "bin" / "python"

    def site_paths(interpreter: str | Path) -> list[str]:
        # -I: sys.path as the interpreter's own site setup makes it, without PYTHONPATH or the current directory
        out = _run([interpreter, "-I", "-c", "import sys; print('\\n'.join(sys.path))"], cwd=path.parent).stdout
        return out.splitlines()

    fresh = site_paths(python)
    ours = [p for p in site_paths(sys.executable) if p not in fresh and Path(p).is_dir() and Path(p) != ROOT]
    (site,) = (p for p in fresh if p.endswith("site-packages"))
    (Path(site) / "_dependencies.pth").write_text("\n".join(ours) + "\n")
    # --ignore-installed: this environment's editable `pipeline` is visible through the .pth; never touch it
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=path.parent)
    where = _run([python, "-c", "import pipeline.cli; print(pipeline.cli.__file__); print(pipeline.cli.CONF_DIR)"],
                 cwd=path.parent).stdout.split()  # fmt: skip
    assert [Path(p).is_relative_to(path) for p in where] == [True, True], f"not the wheel's files: {where}"
    return path


def test_the_wheel_holds_every_config_module_and_command(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert len(configs) > 40 and "train.yaml" in configs and "model/torchvision_maskrcnn.yaml" in configs
    assert [c for c in configs if f"pipeline/conf/{c}" not in names] == []
    modules = sorted(
        p.relative_to(ROOT).as_posix()
        for top in ("pipeline", "hydra_plugins")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert [m for m in modules if m not in names] == []
    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert [f"{s} = {t}" for s, t in SCRIPTS.items() if f"{s} = {t}" not in text] == []


def test_the_installed_wheel_trains_from_an_empty_directory_with_a_config_dir_of_the_users(venv: Path, tmp_path: Path):
    mine = tmp_path / "my-configs"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text(MY_EXPERIMENT)
    empty = tmp_path / "empty"
    empty.mkdir()

    # python -m with --config-dir: the help lists the packaged groups and options, and the user's experiment
    text = _run([venv / "bin" / "python", "-m", "pipeline.cli.train", "--config-dir", mine, "--help"], cwd=empty).stdout
    shipped = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert f"experiment: {', '.join(sorted(shipped | {'mine'}))}\n" in text
    models = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    assert f"model: {', '.join(models)}\n" in text
    assert list(empty.iterdir()) == []  # --help writes nothing

    # the console script with the folder on Hydra's search path (the other way to add one; Hydra's help lists
    # only --config-dir's options): a smoke training of the packaged configs and the user's experiment
    proc = _run([venv / "bin" / "pipeline-train", f"hydra.searchpath=[file://{mine}]", "experiment=mine", "debug=fast",
                 "trainer.accelerator=cpu", "model.net.backbone.width=8"], cwd=empty)  # fmt: skip
    (run_dir,) = (empty / "outputs" / "train" / "runs").iterdir()
    assert f"run directory:   {run_dir}" in proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (empty / "data" / "shapes" / "annotations" / "instances_train.json").is_file()  # generated here
    client = MlflowClient(f"sqlite:///{empty / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pipeline.experiment"] == "mine"
    assert run.data.tags["pipeline.tag.from-my-config-dir"] == "1"
    assert run.data.params["trainer.max_epochs"] == "1"  # debug=fast, from the wheel's conf/debug/fast.yaml
