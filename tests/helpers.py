"""What the test modules share: the project's paths and the tiny training's overrides, a project dir with its own
migrated MLflow store, the console entry points (in a subprocess or in this process), free ports, a real
`mlflow server`, one trained project per model family, a task built from the real configs and one training step
of it, the callbacks a test's training process imports, and pycocotools' matching as an independent reference.

Test modules and conftest.py import from here; no test module imports another test module or conftest.py.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
# Real annotated datasets in ../shared beside the repository (CI has them; a user's clone may not); the configs of
# data=coco128seg and the shared experiments name the same folder.
SHARED = ROOT.parent / "shared"
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

# Each model family's tiny training on the shapes data (TINY plus what the family needs at 64 px).
FAMILIES = {
    "fcn": [*TINY],
    "yolo": ["experiment=shapes_yolo", *TINY, "model.net.neck_width=32"],
    "instance": ["experiment=shapes_instance", *TINY, "model.net.neck_width=32", "model.net.mask_width=16"],
}

# A tiny detector task's settings (unit tests of the detection and instance tasks): 9 anchors for 64 px inputs.
ANCHORS = [[8, 8], [12, 10], [10, 14], [16, 16], [24, 20], [20, 28], [32, 32], [48, 40], [40, 56]]
LOSS = {"_target_": "pipeline.losses.yolo.YOLOLoss", "box": 1.0, "obj": 1.0, "cls": 0.5, "anchor_iou": 0.5,
        "ignore_iou": 0.5, "obj_balance": [4.0, 1.0, 0.4]}  # fmt: skip
POST = {"score_threshold": 0.001, "iou_threshold": 0.6, "max_detections": 100, "pre_nms_top_k": 1000}


# --- project dirs and stores ---------------------------------------------------------------------------------


def migrate_store(path: Path) -> Path:
    """Create and migrate an MLflow SQLite store at `path` (migrations take seconds: tests copy one)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def project_dir(path: Path, store: Path) -> Path:
    """`path` made a project directory with its own MLflow store: a copy of the migrated `store` in outputs/."""
    (path / "outputs").mkdir(parents=True, exist_ok=True)
    shutil.copy(store, path / "outputs" / "mlflow.db")
    return path


def long_dir(base: Path, length: int = 120) -> Path:
    """A new directory under `base` whose path is at least `length` characters (a deep clone, a long $HOME)."""
    path = base / "a-project-cloned-somewhere-deep"
    while len(str(path)) < length:
        path = path / "in-a-home-directory-with-long-names"
    path.mkdir(parents=True)
    return path


def long_project_root(tmp_path: Path, store: Path) -> Path:
    """A project root of at least 120 characters with its own copy of the migrated MLflow store."""
    return project_dir(long_dir(tmp_path), store)


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}"


def run_dirs(workdir: Path, task: str = "train") -> list[Path]:
    return sorted((workdir / "outputs" / task / "runs").iterdir())


def assert_checkpoints_uploaded(client, run_id: str, run_dir: Path, dest: Path) -> None:
    """`last/last.ckpt` and `best/best.ckpt` in the run's artifacts are byte-equal to the run dir's checkpoints, and
    every staged copy was uploaded and removed."""
    for name in ("last", "best"):
        local = client.download_artifacts(run_id, f"{name}/{name}.ckpt", str(dest))
        assert Path(local).read_bytes() == (run_dir / "checkpoints" / f"{name}.ckpt").read_bytes(), name
    assert not (run_dir / "mlflow-uploads").exists()  # every staged copy was uploaded and removed


def conf_options(group: str) -> list[str]:
    """The options of a config group: the names of conf/<group>/*.yaml, sorted."""
    from pipeline.cli import CONF_DIR

    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


# --- the entry points ------------------------------------------------------------------------------------------


def run_cli(
    entry: str,
    *overrides: str,
    cwd: Path,
    check: bool = True,
    timeout: int = 600,
    tracking_uri: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline.cli.<entry> overrides…` in cwd as a user would; fail with its output on error.

    The run logs to cwd's outputs/mlflow.db unless `tracking_uri` sets MLFLOW_TRACKING_URI; `env` adds variables.
    An override naming a `tests.` class (a callback below) puts the repository on the process's PYTHONPATH.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    if any("=tests." in o for o in overrides):  # a test's own callback, imported by the training
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


def run_main(
    entry: str,
    *overrides: str,
    cwd: Path,
    check: bool = False,
    tracking_uri: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`pipeline-<entry> overrides…` through the console script's own main(), in this process, in cwd.

    For commands that do not need a process of their own (a check, an error, predict, a one-process training): a
    subprocess would spend ~10 s importing torch. Returns what `run_cli(..., check=False)` returns (status, stdout,
    stderr); `check` fails on a non-zero status. `tracking_uri` and `env` as for run_cli, for this call only.
    """
    module = importlib.import_module(f"pipeline.cli.{entry}")
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    sys.argv = [f"pipeline-{entry}", *overrides]
    os.environ["HYDRA_FULL_ERROR"] = "0"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.update(env or {})
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
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


def train_project(path: Path, store: Path, *overrides: str) -> Path:
    """The trained-checkpoint factory: `path` made a project dir (its own copy of the migrated `store`) in which
    `pipeline-train overrides…` trained once (a family's tiny shapes run: FAMILIES[family] plus what the test needs),
    in this process: a module-scoped fixture's training that many tests read. Returns `path`; the run dir is
    `run_dirs(path)[0]`, the stdout of the training `path / "train.out"`."""
    project_dir(path, store)
    proc = run_main("train", *overrides, cwd=path, check=True)
    (path / "train.out").write_text(proc.stdout)
    return path


# --- a task from the real configs, one training step ---------------------------------------------------------


# A timm ResNet, ConvNeXt, EfficientNet and MobileNet (random weights), each with its stem's parameter name: the
# families the backbone tests and each task's one-step tests run over.
TIMM_STEMS = {
    "resnet10t": "conv1.0.weight",
    "convnext_atto": "stem_0.weight",
    "tf_efficientnet_lite0": "conv_stem.weight",
    "mobilenetv3_small_050": "conv_stem.weight",
}


def task_from_config(*overrides: str) -> pl.LightningModule:
    """The task `pipeline-train overrides…` would train: conf/ composed with the overrides, `model` instantiated."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from pipeline.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", list(overrides))
    return instantiate(cfg.model)


def one_training_step(task: pl.LightningModule, batch: dict) -> tuple[float, set[str]]:
    """One step of the task's own `training_step` and configured optimizer on `batch`, outside a Trainer: the loss
    and the names of the parameters the step changed."""
    import torch

    configured = task.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    before = {name: p.detach().clone() for name, p in task.named_parameters()}
    task.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer to log to
        loss = task.training_step(batch, 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = {name for name, p in task.named_parameters() if not torch.equal(p.detach(), before[name])}
    return float(loss.detach()), changed


# --- processes on the network ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifact folder) that a test can kill and restart.

    `mlflow server` runs uvicorn as a child process: it gets its own process group, so a kill takes the whole
    server down (killing only the `mlflow` process leaves uvicorn serving). Job execution (seven huey consumers
    that the runs here never use) is off.
    """

    def __init__(self, workdir: Path) -> None:
        self.uri = f"http://127.0.0.1:{free_port()}"
        self.store = workdir / "outputs" / "mlflow.db"  # a migrated copy (project_dir)
        self.artifacts = workdir / "server-artifacts"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        port = self.uri.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port,
             "--backend-store-uri", f"sqlite:///{self.store}", "--artifacts-destination", str(self.artifacts),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail("mlflow server did not start within 120 s")

    def kill(self) -> None:
        """SIGKILL the whole server, as a crash would."""
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[MlflowServer]:
    """A started MlflowServer on `workdir`'s store, stopped on the way out."""
    server = MlflowServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- callbacks a test's training process imports (`+callbacks.<name>._target_=tests.helpers.<Class>`) ----------


class EpochGate(pl.Callback):
    """At the start of each epoch in `epochs`, write `<folder>/at-<epoch>` and wait for `<folder>/go-<epoch>`."""

    def __init__(self, folder: str, epochs: list[int], timeout: float = 300.0) -> None:
        self.folder, self.epochs, self.timeout = Path(folder), list(epochs), timeout

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.epochs:
            return
        (self.folder / f"at-{epoch}").touch()
        deadline = time.monotonic() + self.timeout
        while not (self.folder / f"go-{epoch}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no go-{epoch} in {self.folder} within {self.timeout:g} s")
            time.sleep(0.1)


class SignalAt(pl.Callback):
    """Send `signum` to this training process when a training batch ends at global step `step` (rank 0 only):
    an interruption at an exact point of the training, as a scheduler's SIGTERM or the OOM killer's SIGKILL."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


# --- independent references ------------------------------------------------------------------------------------


def cocoeval_confusion(images: list[tuple[np.ndarray, np.ndarray]], min_score: float, classes: int = 4) -> np.ndarray:
    """The [classes, classes] matrix (rows predicted, columns true, 0 background) from pycocotools COCOeval's own
    matches with useCats=0 (class-agnostic), IoU 0.5, every detection kept. `images`: per image (dets [D, 6]
    x1 y1 x2 y2 score label, gts [G, 6] x1 y1 x2 y2 label crowd)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, results = [], []
    for image_id, (dets, gts) in enumerate(images, start=1):
        for x1, y1, x2, y2, label, crowd in gts:
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(crowd)})  # fmt: skip
        for x1, y1, x2, y2, score, label in dets[dets[:, 4] >= min_score]:
            results.append({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})  # fmt: skip
    dataset = {"info": {}, "images": [{"id": i, "width": 64, "height": 64} for i in range(1, len(images) + 1)],
               "annotations": annotations, "categories": [{"id": c} for c in range(1, classes)]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.params.useCats = 0
        evaluator.params.iouThrs = np.array([0.5])
        evaluator.params.maxDets = [10_000]
        evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluator.evaluate()
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for entry in evaluator.evalImgs:
        if entry is None:  # neither ground truth nor detections
            continue
        for dt_id, match, ignore in zip(entry["dtIds"], entry["dtMatches"][0], entry["dtIgnore"][0], strict=True):
            if not ignore:
                true = gt.anns[int(match)]["category_id"] if match else 0
                matrix[evaluator.cocoDt.anns[dt_id]["category_id"], true] += 1
        for gt_id, match, ignore in zip(entry["gtIds"], entry["gtMatches"][0], entry["gtIgnore"], strict=True):
            if not ignore and not match:
                matrix[0, gt.anns[gt_id]["category_id"]] += 1
    return matrix
