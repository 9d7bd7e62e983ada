"""Training longer reschedules every model (issue 25.5): a cosine run of 2 epochs continued to 4 takes the new
length and goes on from where it was; its learning rate never climbs back towards the base rate (README,
"Training longer"). The same for the per-step warm-up cosine (model/sched=warmup_cosine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers import run_dirs, run_main, tracking_uri

pytestmark = pytest.mark.slow

# Set on the command line, so that the expected rates below depend on nothing but the cosine formula.
BASE_LR = 1e-3
ETA_MIN = 1e-4
STEPS_PER_EPOCH = 2  # debug=fast: limit_train_batches=2
# A smoke run of each model config (debug=fast: 16 + 8 shapes of 64 px, two batches of 4 per epoch), cut smaller
# where the config has widths to cut. torchvision_maskrcnn (its heads over a timm resnet10t FPN, not the default
# ResNet-50-FPN: the schedule is the task's) runs at 64 px, its smallest here, and its RoI heads do most of its work there: 64 sampled RoIs per training image (not 512), 100 proposals (not 1000)
# and 10 detections (not 100) per validation image; its training steps took half the time (CPU, 2 cores).
MODELS = {
    "fcn8s": ["experiment=shapes_fcn", "model.net.backbone.width=8"],
    "yolo": ["experiment=shapes_yolo", "model.net.backbone.width=8", "model.net.neck_width=32"],
    # The per-step warm-up cosine without warm-up: at each epoch's start the same rates as the per-epoch cosine.
    "yolo_warmup_cosine": [
        "experiment=shapes_yolo",
        "model.net.backbone.width=8",
        "model.net.neck_width=32",
        "model/sched=warmup_cosine",
        "model.scheduler.warmup_epochs=0",
    ],
    "instance": [
        "experiment=shapes_instance",
        "model.net.backbone.width=8",
        "model.net.neck_width=32",
        "model.net.mask_width=16",
    ],
    "torchvision_maskrcnn": [
        "experiment=shapes_instance",
        "model=torchvision_maskrcnn",
        "model/backbone=timm",  # torchvision's MaskRCNN heads over a small timm ResNet: the task's schedule is the same
        "model.net.backbone.name=resnet10t",
        "model.net.box_detections_per_img=10",
        "+model.net.box_batch_size_per_image=64",
        "+model.net.rpn_post_nms_top_n_test=100",
    ],
}
# One validation batch per epoch and no sanity check: validation plays no part in the schedule.
COMMON = ["debug=fast", "trainer.limit_val_batches=1", "+trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu",
          "callbacks.model_summary.max_depth=0",
          f"model.optimizer.lr={BASE_LR}", f"model.scheduler.eta_min={ETA_MIN}"]  # fmt: skip


def cosine(epoch: float, t_max: int) -> float:
    """Cosine annealing from BASE_LR to ETA_MIN over t_max epochs: the rate of `epoch` (SGDR, without restarts)."""
    return ETA_MIN + (BASE_LR - ETA_MIN) * (1 + math.cos(math.pi * epoch / t_max)) / 2


def continued(epoch: int, t_max: int, start_epoch: int, start_lr: float) -> float:
    """The cosine of `t_max` epochs continued from `start_lr` at `start_epoch`: the distance to ETA_MIN shrinks
    as that curve's does from `start_epoch` on (torch's chainable form; no jump to the curve's own value there)."""
    return ETA_MIN + (start_lr - ETA_MIN) * (1 + math.cos(math.pi * epoch / t_max)) / (
        1 + math.cos(math.pi * start_epoch / t_max)
    )


def _epoch_lrs(workdir: Path) -> list[float]:
    """The learning rate of each epoch as the run's MLflow `lr-<optimizer>` metric shows it, in step order."""
    client = MlflowClient(tracking_uri(workdir))
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    (key,) = (k for k in run.data.metrics if k.startswith("lr-"))
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _length(schedule: dict) -> float:
    """The epochs a saved schedule anneals over: torch's cosine's T_max, or WarmupCosine's planned steps."""
    return schedule["T_max"] if "T_max" in schedule else schedule["planned"]["total_steps"] / STEPS_PER_EPOCH


@pytest.mark.parametrize("model", list(MODELS))
def test_training_longer_continues_the_cosine_without_climbing_back(model: str, workdir: Path):
    overrides = [*MODELS[model], *COMMON]
    run_main("train", *overrides, "trainer.max_epochs=2", cwd=workdir, check=True)
    (run_dir,) = run_dirs(workdir)
    first = _last(run_dir)
    assert first["epoch"] == 1 and first["global_step"] == 2 * STEPS_PER_EPOCH
    (schedule,) = first["lr_schedulers"]
    assert _length(schedule) == 2
    # the rate the next epoch would start with: the 2-epoch cosine has reached its end
    reached = cosine(2, t_max=2)
    assert [g["lr"] for g in first["optimizer_states"][0]["param_groups"]] == [pytest.approx(reached)]

    run_main("train", *overrides, f"ckpt_path={run_dir}", "trainer.max_epochs=4", cwd=workdir, check=True)
    assert run_dirs(workdir) == [run_dir]
    last = _last(run_dir)
    assert last["epoch"] == 3 and last["global_step"] == 4 * STEPS_PER_EPOCH
    expected = [cosine(0, t_max=2), cosine(1, t_max=2)] + [
        continued(e, t_max=4, start_epoch=2, start_lr=reached) for e in (2, 3)
    ]
    lrs = _epoch_lrs(workdir)
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False)), f"{model}: the rate climbs back: {lrs}"
    assert lrs == [pytest.approx(v) for v in expected], f"{model}: {lrs} (expected {expected})"
    (schedule,) = last["lr_schedulers"]
    assert _length(schedule) == 4  # the new length, not the checkpoint's
