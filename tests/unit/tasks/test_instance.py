"""The instance task: mask loss on ground-truth RoIs, empty outputs for images without detections, torchvision's
Mask R-CNN running one training and one validation step in the same task, and both nets on a timm backbone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from pipeline.cli import CONF_DIR
from pipeline.cli import common as _resolvers  # noqa: F401 (registers the ${pipeline.…} resolvers of the configs)
from pipeline.data.datamodule import ShapesDataModule
from pipeline.models.maskrcnn import TorchvisionMaskRCNN
from pipeline.ops.boxes import SlotGrid, flatten_levels
from pipeline.ops.masks import masks_to_original
from pipeline.tasks.instance import InstanceTask
from tests.helpers import ANCHORS, LOSS, POST, TIMM_STEMS, one_training_step, task_from_config

MASKS = {"threshold": 0.5}
MASK_LOSS = {**LOSS, "_target_": "pipeline.losses.mask.MaskYOLOLoss", "mask": 1.0, "rois_per_image": 8,
             "positive_iou": 0.5}  # fmt: skip


def _task(**post: float) -> InstanceTask:
    net = {"_target_": "pipeline.models.mask_yolo.MaskYOLO", "backbone": {"name": "vgg_tiny", "width": 4},
           "neck_width": 16, "mask_width": 8}  # fmt: skip
    return InstanceTask(
        masks=MASKS, net=net, optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}, scheduler=None, num_classes=4,
        class_names=["background", "a", "b", "c"], input_size=64, anchors=ANCHORS, loss=MASK_LOSS,
        postprocess={**POST, **post},
    )  # fmt: skip


def _batch(boxes: list[list[list[float]]]) -> dict:
    masks = []
    for image_boxes in boxes:
        m = torch.zeros(len(image_boxes), 64, 64, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(image_boxes):
            m[i, int(y1) : int(y2), int(x1) : int(x2)] = 1
        masks.append(m)
    return {
        "image": torch.rand(len(boxes), 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        "boxes": [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
        "labels": [torch.full((len(b),), 2, dtype=torch.long) for b in boxes],
        "iscrowd": [torch.zeros(len(b), dtype=torch.bool) for b in boxes],
        "masks": masks,
    }


def _raw(task: InstanceTask, images: torch.Tensor) -> tuple[torch.Tensor, SlotGrid, list[torch.Tensor]]:
    """The net's slot predictions [B, P, 5 + K], their grid and the neck levels, as its forward computes them."""
    outputs, levels = task.net.outputs(images)
    return flatten_levels(outputs), task.net.slots.grid(outputs, tuple(images.shape[-2:])), levels


def _mask_loss(task: InstanceTask, batch: dict) -> torch.Tensor:
    """The mask term alone of the net's loss (`MaskYOLOLoss.mask_loss`) on the batch's targets."""
    pred, grid, levels = _raw(task, batch["image"])
    targets, loss = task._targets(batch), task.net.loss
    assignment = loss.assign(grid, targets, pred.device)
    return loss.mask_loss(pred, grid, targets, assignment, lambda rois: task.net.mask_logits(levels, rois))


def test_mask_loss_trains_only_the_ground_truth_class_channel() -> None:
    task = _task()
    batch = _batch([[[4.0, 4.0, 20.0, 18.0], [30.0, 30.0, 62.0, 60.0]], []])
    loss = _mask_loss(task, batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    last = task.net.mask_head.layers[-1]  # 1x1 conv to one channel per class: label 2 is channel 1
    per_class = last.weight.grad.abs().sum(dim=(1, 2, 3))
    assert per_class[1] > 0 and per_class[0] == 0 and per_class[2] == 0


def _crowded(images: int, image_ids: list[int]) -> dict:
    """`images` copies of one image with 12 instances (a 4 x 3 grid of 12 x 10 boxes), more than the 8 RoIs."""
    grid = [[x, y, x + 12.0, y + 10.0] for x in (2.0, 18.0, 34.0, 50.0) for y in (2.0, 22.0, 42.0)]
    return {**_batch([grid] * images), "image_id": image_ids}


def _chosen(task: InstanceTask, batch: dict) -> list[list[int]]:
    """Per image, the instances (rows of its boxes) that got a mask RoI, checking each RoI is its owner's box."""
    with torch.no_grad():
        pred, grid, _ = _raw(task, batch["image"])
        targets = task._targets(batch)
        rois, owners, labels, _ = task.net.loss.mask_rois(
            pred, grid, targets, task.net.loss.assign(grid, targets, "cpu")
        )
    chosen, start = [], 0
    for image_rois, image_owners, gt in zip(rois, owners.split([len(r) for r in rois]), batch["boxes"], strict=True):
        rows = (image_owners - start).tolist()
        assert len(rows) == 8 and len(set(rows)) == 8 and torch.equal(image_rois, gt[rows])
        chosen.append(sorted(rows))
        start += len(gt)
    assert bool((labels == 2).all())
    return chosen


def test_a_crowded_image_gets_a_random_subset_of_its_instances_as_mask_rois() -> None:
    task = _task()
    batch = _crowded(1, [7])
    rng = torch.get_rng_state()
    subsets = []
    for seed in range(4):
        task.hparams.seed = seed
        subsets += _chosen(task, batch)
    assert torch.equal(torch.get_rng_state(), rng)  # torch's global generator is not drawn from
    assert len({tuple(s) for s in subsets}) == 4 and subsets[0] != list(range(8))  # not the first 8 in the file
    task.hparams.seed = 0
    assert _chosen(task, batch) == subsets[:1]


def test_the_mask_rois_drawn_follow_seed_step_rank_and_image_index(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task()
    batch = _crowded(2, [7, 7])  # the same image twice
    first, second = _chosen(task, batch)
    assert first != second  # image index
    monkeypatch.setattr(InstanceTask, "global_step", property(lambda self: 5))
    assert _chosen(task, batch) != [first, second]  # global step
    at_step_5 = _chosen(task, batch)
    assert _chosen(task, batch) == at_step_5
    monkeypatch.setattr(InstanceTask, "global_rank", property(lambda self: 1))
    assert _chosen(task, batch) != at_step_5  # rank
    # Evaluation: keyed by the image id, the same for both copies and at any step.
    evaluated = _chosen(task.eval(), batch)
    assert evaluated[0] == evaluated[1]
    monkeypatch.setattr(InstanceTask, "global_step", property(lambda self: 9))
    assert _chosen(task, batch) == evaluated


def test_a_batch_without_objects_gives_a_zero_mask_loss_that_keeps_the_head_in_the_graph() -> None:
    task = _task()
    batch = _batch([[], []])
    loss = _mask_loss(task, batch)
    assert loss == 0
    loss.backward()
    assert task.net.mask_head.layers[-1].weight.grad is not None


def test_an_image_without_detections_yields_empty_outputs_and_scores_zero() -> None:
    task = _task(score_threshold=1.0).eval()  # nothing can pass: every image has no detections
    batch = _batch([[[4.0, 4.0, 20.0, 18.0]], []])
    with torch.no_grad():
        detections = task.detect(batch["image"])
    for det in detections:
        assert det["boxes"].shape == (0, 4) and det["masks"].shape == (0, 28, 28) and det["labels"].shape == (0,)
    original = task._to_original(detections[0], (0.5, 0.5), 128, 128)
    assert original["masks"].shape == (0, 128, 128) and original["masks"].dtype == torch.bool
    gt = {"boxes": torch.tensor([[8.0, 8.0, 32.0, 28.0]]), "labels": torch.tensor([2]),
          "iscrowd": torch.tensor([0]), "area": torch.tensor([672.0]),
          "masks": torch.zeros(1, 128, 128, dtype=torch.bool).index_fill_(1, torch.arange(8, 36), True)}  # fmt: skip
    task.evaluator.reset(collect=True)
    task.evaluator.update([original], [gt], [7])
    assert task.evaluator.records == []
    stats = task.evaluator.map.summary("segm")
    assert stats["map"] == 0.0 and stats["mar_100"] == 0.0


def test_torchvision_maskrcnn_runs_a_training_and_a_validation_step_in_the_instance_task(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=shapes_instance", "model=torchvision_maskrcnn", "data.val_size=64"])
    task = instantiate(cfg.model)
    data = instantiate(
        cfg.data, root=str(tmp_path / "shapes"), spec={"num_train": 4, "num_val": 2, "image_size": 64},
        batch_size=2, num_workers=0, train_sizes=[64], train_transforms=[], targets=task.TARGETS,
    )  # fmt: skip
    assert isinstance(data, ShapesDataModule)
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(task, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "train/loss_mask" in metrics
    assert {"val/map", "val/segm_map", "val/segm_map_50"} <= set(metrics)
    with torch.no_grad():
        (det,) = task.eval().detect(torch.rand(1, 3, 64, 64))
    assert det["masks"].shape == (len(det["boxes"]), 28, 28)
    # Validation and predict paste this net's masks by torchvision's rule (checked against its postprocess in
    # tests/models/test_maskrcnn.py), not by our pixel-centre one.
    torch.manual_seed(3)
    boxes = torch.tensor([[3.3, 4.7, 20.2, 30.9], [40.0, 30.0, 64.0, 64.0]])
    det = {"boxes": boxes, "masks": torch.rand(2, 28, 28), "scores": torch.ones(2), "labels": torch.ones(2).long()}
    pasted = task._to_original(det, (0.5, 0.5), 96, 128)["masks"]
    assert torch.equal(pasted, TorchvisionMaskRCNN.masks_to_original(det, (0.5, 0.5), 96, 128, 0.5))
    assert not torch.equal(pasted, masks_to_original(det, (0.5, 0.5), 96, 128, 0.5))
    assert torch.equal(_task()._to_original(det, (0.5, 0.5), 96, 128)["masks"],
                       masks_to_original(det, (0.5, 0.5), 96, 128, 0.5))  # fmt: skip
    # A resume continues the schedule with this run's settings (a cosine's length), as the other tasks do.
    checkpoint = {"hyper_parameters": dict(task.hparams), "lr_schedulers": [{"T_max": 1, "last_epoch": 1}]}
    task.on_load_checkpoint(checkpoint)
    assert checkpoint["lr_schedulers"] == [{"T_max": cfg.trainer.max_epochs, "last_epoch": 1}]
    assert task.hparams.loss is None and task.slots is None  # torchvision's own losses and fixed anchors


def test_torchvision_maskrcnn_loads_a_local_weights_file_leaving_mismatched_heads_fresh(tmp_path: Path) -> None:
    source = TorchvisionMaskRCNN(num_classes=91, input_size=64)
    path = tmp_path / "maskrcnn.pth"
    torch.save(source.model.state_dict(), path)
    target = TorchvisionMaskRCNN(num_classes=4, input_size=64, weights=str(path))
    fresh = target.load_weights(path)
    assert fresh == sorted(["roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
                            "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight",
                            "roi_heads.mask_predictor.mask_fcn_logits.bias",
                            "roi_heads.mask_predictor.mask_fcn_logits.weight"])  # fmt: skip
    backbone = "backbone.body.layer1.0.conv1.weight"
    assert torch.equal(target.model.state_dict()[backbone], source.model.state_dict()[backbone])
    with pytest.raises(FileNotFoundError, match="no such file"):
        TorchvisionMaskRCNN(num_classes=4, input_size=64, weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_instance_losses_run_under_mixed_precision_autocast(dtype: torch.dtype) -> None:
    task = _task()
    batch = _batch([[[4.0, 4.0, 40.0, 36.0], [30.0, 30.0, 62.0, 60.0]], [[10.0, 12.0, 40.0, 50.0]]])
    with torch.autocast("cpu", dtype=dtype):  # trainer.precision=bf16-mixed / 16-mixed
        losses = task(batch["image"], task._targets(batch))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["mask"] > 0


# Per net, its overrides and parameters the step must change besides the backbone's stem: the net's own.
TIMM_NETS = {
    "mask_yolo": (["experiment=shapes_instance", "model.net.neck_width=32", "model.net.mask_width=16",
                   "model.anchors=[" + ",".join(f"[{w},{h}]" for w, h in ANCHORS) + "]"],
                  "net.backbone.body.", {"net.mask_head.layers.0.weight"}),
    "torchvision_maskrcnn": (["experiment=shapes_instance", "model=torchvision_maskrcnn",
                              # few RoIs: the mask head's 256-wide convs on hundreds of RoIs take seconds on a CPU
                              "+model.net.box_batch_size_per_image=16", "+model.net.rpn_post_nms_top_n_train=32"],
                             "net.model.backbone.body.body.",
                             {"net.model.backbone.fpn.inner_blocks.0.0.weight",
                              "net.model.roi_heads.mask_head.0.0.weight"}),
}  # fmt: skip
# Our instance net over each timm family; torchvision's Mask R-CNN (seconds a step on a CPU) over one.
NET_BACKBONES = [("mask_yolo", name) for name in TIMM_STEMS] + [("torchvision_maskrcnn", "convnext_atto")]


@pytest.mark.parametrize(("net", "name"), NET_BACKBONES)
def test_each_instance_net_on_a_timm_backbone_built_from_the_configs_trains_a_step(net: str, name: str) -> None:
    overrides, body, learners = TIMM_NETS[net]
    task = task_from_config(*overrides, "model/backbone=timm", f"model.net.backbone.name={name}", "data.val_size=64")
    batch = _batch([[[4.0, 4.0, 40.0, 36.0], [30.0, 30.0, 62.0, 60.0]], [[10.0, 12.0, 40.0, 50.0]]])
    loss, changed = one_training_step(task, batch)
    assert math.isfinite(loss)
    assert {body + TIMM_STEMS[name], *learners} <= changed
