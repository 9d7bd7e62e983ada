"""The detector's loss: finite with or without objects, objectness-only on empty images, GIoU or CIoU boxes as
torchvision computes them; anchors from config; the net's contract (losses in training, detections in eval) and its
loss built from `model.loss`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from torchvision.ops import box_iou, complete_box_iou_loss, generalized_box_iou_loss

from pipeline.ops.assign import assign, ignored
from pipeline.ops.boxes import SlotGrid, decode, flatten_levels
from pipeline.ops.nms import select_detections
from pipeline.tasks.detection import DetectionTask
from tests.helpers import ANCHORS, LOSS, POST, TIMM_STEMS, one_training_step, task_from_config


def _task(**kwargs: object) -> DetectionTask:
    net = {"_target_": "pipeline.models.yolo.YOLO", "backbone": {"name": "vgg_tiny", "width": 4}, "neck_width": 16}
    optimizer = {"_target_": "torch.optim.SGD", "lr": 0.1}
    args = {"anchors": ANCHORS, "loss": LOSS, "postprocess": POST, **kwargs}
    return DetectionTask(net, optimizer, None, 4, ["background", "a", "b", "c"], input_size=64, **args)


def _batch(boxes: list[list[list[float]]]) -> dict:
    return {
        "image": torch.rand(len(boxes), 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        "boxes": [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
        "labels": [torch.ones(len(b), dtype=torch.long) for b in boxes],
        "iscrowd": [torch.zeros(len(b), dtype=torch.bool) for b in boxes],
    }


def _slots(task: DetectionTask, images: torch.Tensor) -> tuple[torch.Tensor, SlotGrid]:
    """The net's raw slot predictions [B, P, 5 + K] and their grid, as its forward computes them."""
    outputs, _ = task.net.outputs(images)
    return flatten_levels(outputs), task.net.slots.grid(outputs, tuple(images.shape[-2:]))


def _loss(task: DetectionTask, pred: torch.Tensor, grid: SlotGrid, batch: dict) -> dict[str, torch.Tensor]:
    return task.net.loss(pred, grid, task._targets(batch))


def test_images_without_objects_train_objectness_only() -> None:
    task = _task()
    batch = _batch([[], []])
    pred, grid = _slots(task, batch["image"])
    losses = _loss(task, pred, grid, batch)
    assert losses["box"] == 0 and losses["cls"] == 0 and torch.isfinite(losses["loss"]) and losses["obj"] > 0
    losses["loss"].backward()
    head = task.net.heads[0][-1]
    grad = head.weight.grad.view(3, 8, -1)  # [anchor, 5 + K, in]
    assert grad[:, 4].abs().sum() > 0 and grad[:, :4].abs().sum() == 0 and grad[:, 5:].abs().sum() == 0


def test_a_batch_with_objects_trains_every_term() -> None:
    task = _task()
    batch = _batch([[[4.0, 4.0, 20.0, 18.0], [30.0, 30.0, 62.0, 60.0]], []])
    pred, grid = _slots(task, batch["image"])
    losses = _loss(task, pred, grid, batch)
    assert all(torch.isfinite(losses[k]) and losses[k] > 0 for k in ("box", "obj", "cls"))


def test_anchors_from_config_are_sorted_by_area_and_checked() -> None:
    task = _task(anchors=list(reversed(ANCHORS)))
    areas = task.slots.anchors.reshape(-1, 2).prod(1)
    assert task.slots.anchors.shape == (3, 3, 2) and torch.equal(areas, areas.sort().values)
    with pytest.raises(ValueError, match="needs 9 positive"):
        _task(anchors=ANCHORS[:4])
    with pytest.raises(InstantiationException, match="typo"):  # the loss class's signature refuses it
        _task(loss={**LOSS, "typo": 1.0})
    with pytest.raises(InstantiationException, match="box_loss='diou': choose one of giou, ciou"):
        _task(loss={**LOSS, "box_loss": "diou"})
    with pytest.raises(RuntimeError, match="no anchors yet"):
        _task(anchors=None).slots.level_anchors((64, 64))
    assert _task(anchors="kmeans").slots.anchors is None  # k-means when fitting starts
    with pytest.raises(ValueError, match="give \\[w, h\\] pairs, null or kmeans"):
        _task(anchors="auto")


def test_anchors_scale_per_axis_with_the_input() -> None:
    task = _task()  # anchors in pixels of a 64 x 64 input
    anchors = task.slots.anchors
    scaled = task.slots.level_anchors((32, 128))  # half the height, twice the width
    assert torch.equal(scaled[..., 0], anchors[..., 0] * 2) and torch.equal(scaled[..., 1], anchors[..., 1] / 2)


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, [[10.0, 12.0]] * 9), ([[3.0, 4.0]] * 9, [[3.0, 4.0]] * 9), ("kmeans", "kmeans")],
)
def test_a_fork_keeps_the_checkpoint_anchors_unless_the_command_gives_or_refits_them(given, expected):
    from omegaconf import OmegaConf

    from pipeline.cli.train import _fork_anchors

    cfg = OmegaConf.create({"model": {"anchors": given, "input_size": 64}})
    OmegaConf.set_struct(cfg, True)
    _fork_anchors(cfg, {"hyper_parameters": {"anchors": [[10.0, 12.0]] * 9, "input_size": 64}})
    assert OmegaConf.to_container(cfg.model)["anchors"] == expected


def test_a_fork_at_another_input_size_rescales_the_checkpoint_anchors():
    from omegaconf import OmegaConf

    from pipeline.cli.train import _fork_anchors

    cfg = OmegaConf.create({"model": {"anchors": None, "input_size": 128}})
    _fork_anchors(cfg, {"hyper_parameters": {"anchors": [[10.0, 12.5]] * 9, "input_size": 64}})
    assert cfg.model.anchors == [[20.0, 25.0]] * 9  # pixels at 64 -> at 128


def _per_image_loss(
    task: DetectionTask, pred: torch.Tensor, grid: SlotGrid, batch: dict, box_loss=generalized_box_iou_loss
) -> dict[str, torch.Tensor]:
    """The YOLOv3 loss written image by image from the ops (the loop the batched `YOLOLoss` replaced), its box term
    torchvision's `box_loss`."""
    cfg = task.hparams.loss
    boxes = decode(pred[..., :4], grid)
    obj_target = torch.zeros_like(pred[..., 4])
    keep = torch.ones_like(obj_target, dtype=torch.bool)
    pos_boxes, gt_boxes, pos_cls, gt_labels = [], [], [], []
    for b, (gt, labels, crowd) in enumerate(zip(batch["boxes"], batch["labels"], batch["iscrowd"], strict=True)):
        slots, index = assign(gt[~crowd], grid, cfg["anchor_iou"])
        targets = gt[~crowd][index]
        keep[b] = ~ignored(boxes[b].detach(), gt, cfg["ignore_iou"])
        keep[b, slots] = True
        obj_target[b, slots] = box_iou(boxes[b, slots].detach(), targets).diagonal().clamp(min=0)
        pos_boxes.append(boxes[b, slots])
        pos_cls.append(pred[b, slots, 5:])
        gt_boxes.append(targets)
        gt_labels.append(labels[~crowd][index] - 1)
    bce = F.binary_cross_entropy_with_logits(pred[..., 4], obj_target, reduction="none")
    obj = pred.new_zeros(())
    ends = [*grid.offsets[1:], pred.shape[1]]
    for weight, start, end in zip(cfg["obj_balance"], grid.offsets, ends, strict=True):
        obj = obj + weight * (bce[:, start:end] * keep[:, start:end]).sum() / keep[:, start:end].sum().clamp(min=1)
    box = box_loss(torch.cat(pos_boxes), torch.cat(gt_boxes), reduction="mean")
    cls_target = F.one_hot(torch.cat(gt_labels), pred.shape[-1] - 5).to(pred.dtype)
    cls = F.binary_cross_entropy_with_logits(torch.cat(pos_cls), cls_target)
    return {"loss": cfg["box"] * box + cfg["obj"] * obj + cfg["cls"] * cls, "box": box, "obj": obj, "cls": cls}


@pytest.mark.parametrize(
    ("box_loss", "reference"), [("giou", generalized_box_iou_loss), ("ciou", complete_box_iou_loss)]
)
def test_the_batched_loss_equals_the_loss_computed_image_by_image(box_loss, reference) -> None:
    task = _task(loss={**LOSS, "box_loss": box_loss})
    generator = torch.Generator().manual_seed(1)
    boxes = []
    for count in (6, 0, 3, 11):
        xy = torch.rand(count, 2, generator=generator) * 40
        boxes.append((torch.cat([xy, xy + 4 + torch.rand(count, 2, generator=generator) * 20], 1)).tolist())
    batch = _batch(boxes)
    batch["labels"] = [torch.randint(1, 4, (len(b),), generator=generator) for b in boxes]
    batch["iscrowd"][3][[2, 7]] = True  # crowd regions only ignore
    pred, grid = _slots(task, batch["image"])
    ours, theirs = _loss(task, pred, grid, batch), _per_image_loss(task, pred, grid, batch, reference)
    assert ours["box"] > 0 and ours["cls"] > 0  # positives in the batch, not only objectness
    for key in ("loss", "box", "obj", "cls"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)
    grads = [torch.autograd.grad(losses["loss"], pred, retain_graph=True)[0] for losses in (ours, theirs)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


def test_the_loss_runs_in_double_precision() -> None:
    task = _task().double()  # what trainer.precision=64-true does to the model and the batch
    batch = _batch([[[4.0, 4.0, 20.0, 18.0]], []])
    batch = {**batch, "image": batch["image"].double(), "boxes": [b.double() for b in batch["boxes"]]}
    losses = _loss(task, *_slots(task, batch["image"]), batch)
    assert losses["loss"].dtype == torch.float64 and torch.isfinite(losses["loss"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_loss_runs_under_mixed_precision_autocast(dtype: torch.dtype) -> None:
    task = _task()
    batch = _batch([[[4.0, 4.0, 20.0, 18.0], [30.0, 30.0, 62.0, 60.0]], [[10.0, 12.0, 40.0, 50.0]]])
    full = _loss(task, *_slots(task, batch["image"]), batch)
    with torch.autocast("cpu", dtype=dtype):  # what trainer.precision=bf16-mixed / 16-mixed run the step under
        mixed = _loss(task, *_slots(task, batch["image"]), batch)
    mixed["loss"].backward()
    torch.testing.assert_close(mixed["loss"].float(), full["loss"], rtol=0.05, atol=0.01)


def test_the_net_returns_losses_in_training_and_the_ops_detections_in_eval() -> None:
    task = _task()
    batch = _batch([[[4.0, 4.0, 20.0, 18.0]], [[30.0, 30.0, 62.0, 60.0]]])
    losses = task.train()(batch["image"], task._targets(batch))
    assert set(losses) == {"loss", "box", "obj", "cls"} and losses["loss"].requires_grad
    task.eval()
    with torch.no_grad():
        detections = task.detect(batch["image"])
        with_losses, same = task(batch["image"], task._targets(batch))
        # Reference: the ops by hand, on the raw head outputs and the anchors scaled to the input.
        outputs, _ = task.net.outputs(batch["image"])
        pred = flatten_levels(outputs)
        grid = SlotGrid.build([tuple(o.shape[2:4]) for o in outputs], [8, 16, 32], task.slots.anchors)
        boxes = decode(pred[..., :4], grid)
    assert set(with_losses) == {"loss", "box", "obj", "cls"}
    for b, det in enumerate(detections):
        kept, scores, labels = select_detections(boxes[b], pred[b, :, 4], pred[b, :, 5:], **POST)
        assert (
            len(kept) > 0 and torch.equal(det["labels"], labels + 1) and torch.equal(same[b]["labels"], det["labels"])
        )
        assert torch.equal(det["boxes"], kept) and torch.equal(det["scores"], scores)
    with pytest.raises(ValueError, match="needs targets"):
        task.train()(batch["image"])


def test_an_unknown_model_loss_key_fails_naming_it_before_training() -> None:
    from omegaconf import OmegaConf

    from pipeline.errors import ConfigError
    from pipeline.training.config import validate_config

    cfg = OmegaConf.create({"model": {"_target_": "pipeline.tasks.detection.DetectionTask", "_recursive_": False,
                                      "loss": {**LOSS, "ignore_ioo": 0.5}}})  # fmt: skip
    with pytest.raises(ConfigError, match="'model.loss.ignore_ioo'.*Did you mean 'ignore_iou'"):
        validate_config(cfg, {"model"})


@pytest.mark.parametrize("name", TIMM_STEMS)
def test_the_detector_on_a_timm_backbone_built_from_the_configs_trains_a_step(name: str) -> None:
    anchors = "[" + ",".join(f"[{w},{h}]" for w, h in ANCHORS) + "]"
    task = task_from_config("experiment=shapes_yolo", "model/backbone=timm", f"model.net.backbone.name={name}",
                            "model.net.neck_width=32", f"model.anchors={anchors}", "data.val_size=64")  # fmt: skip
    loss, changed = one_training_step(task, _batch([[[4.0, 4.0, 20.0, 18.0], [30.0, 30.0, 62.0, 60.0]], []]))
    assert math.isfinite(loss)
    assert {f"net.backbone.body.{TIMM_STEMS[name]}", "net.heads.0.1.weight"} <= changed
