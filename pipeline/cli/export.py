"""`pipeline-export ckpt_path=… format=onnx|torchscript`: a checkpoint's network as a file that takes any input size.

Every exported graph takes `images` [B, 3, H, W]: RGB in 0..1 (the normalisation is inside), B, H and W free;
the FCN takes any H, W, the detector and instance model multiples of 32. Inputs are letterboxed as validation
does (longest side to `input_size`, padded bottom/right with 0) for the numbers the run logged. Outputs:

- FCN: `logits` [B, K, H, W] (K classes with background; argmax is the mask).
- Detector: `boxes` [B, P, 4] (x1, y1, x2, y2 input pixels, decoded with the checkpoint's anchors scaled to H, W)
  and `scores` [B, P, K-1] (objectness probability x class probability, class j = label j + 1) for each of the
  P = 3 x (H/8 x W/8 + H/16 x W/16 + H/32 x W/32) slots (`pipeline.models.slots.boxes_and_scores`): before NMS,
  which is the caller's step, as the net does it (`pipeline.models.slots.detections`: `ops.nms.select_detections`)
  with the thresholds in the sidecar JSON's `postprocess`:

      slot, label = torch.nonzero(scores[b] > score_threshold, as_tuple=True)  # image b's candidates
      if len(slot) > pre_nms_top_k:  # only the best go through NMS
          top = scores[b][slot, label].topk(pre_nms_top_k).indices
          slot, label = slot[top], label[top]
      keep = torchvision.ops.batched_nms(boxes[b][slot], scores[b][slot, label], label, iou_threshold)
      keep = keep[:max_detections]  # boxes[b][slot[keep]], scores[b][slot[keep], label[keep]], label[keep] + 1

- Instance model: the detector's `boxes` and `scores`, and `mask_features_8/16/32` [B, C, H/s, W/s] (the mask
  branch's inputs at strides 8, 16, 32), plus a second graph (`<name>.masks.<suffix>`): `mask_features_8/16/32`,
  `rois` [R, 5] (image index in the batch, x1, y1, x2, y2 input pixels: the detections after the NMS above) and
  `labels` [R] (1..K-1) -> `masks` [R, 2S, 2S]: each detection's box-relative mask probability for its own class
  (S = roi_size, 14). The caller pastes it into the image (`pipeline.ops.masks.masks_to_original`: each pixel
  centre inside the box reads the mask bilinearly) and thresholds it at the sidecar's `masks.threshold`.

The file goes beside the checkpoint (`<run dir>/checkpoints/last.onnx`, `last.torchscript.pt`) or to `output=`,
with a sidecar `<file>.json` (names, shapes, class names, thresholds, the parity check), all logged to the
checkpoint's MLflow run under `export/`. Before that, the export is run at two input sizes against PyTorch.
A TorchScript instance export needs `import torchvision` before `torch.jit.load` (it calls torchvision's RoIAlign).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.export import Dim
from torchvision.ops import roi_align

from pipeline.cli import CONF_DIR
from pipeline.cli.common import exit_on_user_error
from pipeline.errors import ConfigError
from pipeline.models.mask_yolo import MaskYOLO
from pipeline.models.slots import boxes_and_scores
from pipeline.ops.roi import fpn_levels
from pipeline.tracking import runs, store
from pipeline.training.checkpoint import resolve_checkpoint
from pipeline.training.config import validate_config
from pipeline.training.loading import load_task

EXPORT_KEYS = {"paths", "task_name", "ckpt_path", "format", "output"}
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# Largest |exported - PyTorch| accepted by the check, relative to the output's magnitude where that exceeds 1
# (boxes are in pixels).
TOLERANCE = 1e-4


class Normalised(nn.Module):
    """The tasks' input convention: RGB in 0..1, ImageNet-normalised inside (the task's own mean and std)."""

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.net = task.net
        self.register_buffer("mean", task.mean.detach().clone())
        self.register_buffer("std", task.std.detach().clone())

    def normalise(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


class SegmentationExport(Normalised):
    """images [B, 3, H, W] in 0..1 -> logits [B, K, H, W] (the task's forward)."""

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.normalise(images))


@torch.jit.script_if_tracing
def _multiple_of_32(images: Tensor) -> Tensor:
    """`images`, refused unless H and W are multiples of 32: scripted inside a trace, so TorchScript keeps the test
    (the net's own check is Python, which a trace drops); ONNX's dynamic sizes are multiples of 32 by construction."""
    if images.shape[-2] % 32 != 0 or images.shape[-1] % 32 != 0:
        raise ValueError("detector input height and width must be multiples of 32")
    return images


class DetectionExport(nn.Module):
    """images [B, 3, H, W] in 0..1 (H, W multiples of 32) -> boxes [B, P, 4] xyxy input pixels, scores [B, P, K-1].

    The net's own normalisation and decoding (`pipeline.models.slots`), on a grid built with tensor ops
    (`Slots.traceable_grid`), so the export takes any input size; anchors scale with W and H as the net's.
    """

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.net = task.net

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        images = _multiple_of_32(images)
        outputs, _ = self.net.outputs(images)
        return boxes_and_scores(outputs, self.net.slots.traceable_grid(outputs, images))


class InstanceExport(DetectionExport):
    """images -> boxes, scores (as DetectionExport) and the mask branch's features [B, C, H/s, W/s], s = 8, 16, 32."""

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        images = _multiple_of_32(images)
        outputs, levels = self.net.outputs(images)
        features = [lateral(level) for lateral, level in zip(self.net.mask_lateral, levels, strict=True)]
        return (*boxes_and_scores(outputs, self.net.slots.traceable_grid(outputs, images)), *features)


class MaskHeadExport(nn.Module):
    """(mask features at strides 8/16/32, rois [R, 5], labels [R] 1..K-1) -> masks [R, 2S, 2S] probabilities.

    As `ops.roi.multiscale_roi_align` + the mask head + the own class's sigmoid (`MaskYOLO._with_masks`), but
    each level's RoIAlign runs over every RoI and `torch.where` keeps the level FPN's rule picks: the same values
    without the data-dependent indexing an export cannot size.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.head = net.mask_head
        self.strides = list(net.strides)
        self.roi_size = int(net.roi_size)

    def forward(self, f8: Tensor, f16: Tensor, f32: Tensor, rois: Tensor, labels: Tensor) -> Tensor:
        level_of = fpn_levels(rois[:, 1:], self.strides)[:, None, None, None]
        pooled = torch.zeros((), dtype=f8.dtype, device=f8.device)
        for k, (features, stride) in enumerate(zip((f8, f16, f32), self.strides, strict=True)):
            this = roi_align(features, rois, (self.roi_size, self.roi_size), spatial_scale=1.0 / stride,
                             sampling_ratio=2, aligned=True)  # fmt: skip
            pooled = torch.where(level_of == k, this, pooled)
        logits = self.head(pooled)  # [R, K-1, 2S, 2S]
        size = logits.shape[-1]
        own = (labels - 1)[:, None, None, None].expand(-1, 1, size, size)
        return logits.gather(1, own)[:, 0].sigmoid()


@dataclass
class Graph:
    """One graph to export: the module, its named inputs and outputs (with their shapes, for the sidecar), the
    dynamic dimensions of each input, and two example inputs of different sizes (export, then check)."""

    module: nn.Module
    inputs: dict[str, str]
    outputs: dict[str, str]
    dynamic: tuple[dict[int, Any], ...]
    examples: list[tuple[Tensor, ...]]


IMAGES = "[B, 3, H, W] RGB in 0..1, letterboxed (padded bottom/right with 0)"
MASK_FEATURES = {f"mask_features_{s}": f"[B, C, H/{s}, W/{s}] the mask branch's features at stride {s}"
                 for s in (8, 16, 32)}  # fmt: skip
DETECTOR_OUTPUTS = {
    "boxes": "[B, P, 4] x1, y1, x2, y2 input pixels of every slot, before NMS",
    "scores": "[B, P, K-1] objectness probability x class probability (column j: label j + 1)",
}


def _example_images(size: int, generator: torch.Generator) -> list[tuple[Tensor]]:
    """Two inputs of different batch, height and width: [2, 3, S, S] to export with, [1, 3, S + 32, 2S] to check."""
    return [(torch.rand(2, 3, size, size, generator=generator),),
            (torch.rand(1, 3, size + 32, 2 * size, generator=generator),)]  # fmt: skip


def _example_rois(images: Tensor, num_labels: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """RoIs [R, 5] (image index, x1, y1, x2, y2) of all sizes, so every FPN level is read, and labels [R] 1..K-1."""
    batch, height, width = images.shape[0], images.shape[2], images.shape[3]
    corner = torch.rand(6 * batch, 2, generator=generator) * torch.tensor([width, height]) / 2
    side = torch.rand(6 * batch, 2, generator=generator) * torch.tensor([width, height]) / 2 + 2
    whole = torch.tensor([[0.0, 0.0, float(width), float(height)]]).expand(batch, -1)
    boxes = torch.cat([torch.cat([corner, corner + side], dim=1), whole])
    index = torch.cat([torch.arange(6 * batch) % batch, torch.arange(batch)]).float()
    labels = torch.randint(1, num_labels + 1, (len(boxes),), generator=generator)
    return torch.cat([index[:, None], boxes], dim=1), labels


def graphs(task: nn.Module, size: int) -> dict[str, Graph]:
    """The graphs that export `task` ("model", and "masks" for the instance model) with examples at `size`."""
    generator = torch.Generator().manual_seed(0)
    images = _example_images(size, generator)
    batch = Dim("batch")
    if task.TARGETS == "semantic":
        dims = {0: batch, 2: Dim("height"), 3: Dim("width")}
        outputs = {"logits": "[B, K, H, W] class logits (K = data.num_classes, background first)"}
        return {"model": Graph(SegmentationExport(task).eval(), {"images": IMAGES}, outputs, (dims,), images)}
    if task.TARGETS == "instances" and not isinstance(task.net, MaskYOLO):
        raise ConfigError(
            f"pipeline-export exports the FCN, the detector (model=yolo) and our instance model (model=instance), "
            f"not {type(task.net).__name__} (model=torchvision_maskrcnn): torchvision's Mask R-CNN resizes, "
            "proposes boxes and runs NMS inside its forward, so its outputs have data-dependent shapes."
        )
    dims = {0: batch, 2: 32 * Dim("height_32"), 3: 32 * Dim("width_32")}
    inputs = {"images": IMAGES.replace("H, W]", "H, W] (H, W multiples of 32)")}
    if task.TARGETS == "boxes":
        return {"model": Graph(DetectionExport(task).eval(), inputs, DETECTOR_OUTPUTS, (dims,), images)}
    main = InstanceExport(task).eval()
    heads = MaskHeadExport(task.net).eval()
    mask_examples = []
    for (example,) in images:
        with torch.no_grad():
            features = main(example)[2:]
        mask_examples.append((*features, *_example_rois(example, task.net.num_classes - 1, generator)))
    rois = Dim("rois")
    mask_dims = tuple({0: batch, 2: Dim(f"height_{s}"), 3: Dim(f"width_{s}")} for s in (8, 16, 32))
    side = 2 * heads.roi_size
    mask_inputs = {
        **MASK_FEATURES,
        "rois": "[R, 5] image index in the batch, x1, y1, x2, y2 input pixels (the detections after NMS)",
        "labels": "[R] int64 label of each RoI, 1..K-1",
    }
    return {
        "model": Graph(main, inputs, {**DETECTOR_OUTPUTS, **MASK_FEATURES}, (dims,), images),
        "masks": Graph(
            heads,
            mask_inputs,
            {"masks": f"[R, {side}, {side}] box-relative mask probability of each RoI's own class"},
            (*mask_dims, {0: rois}, {0: rois}),
            mask_examples,
        ),
    }


def _write(graph: Graph, path: Path, fmt: str) -> None:
    """Export `graph` to `path` from its first example, with every dimension of `graph.dynamic` left free."""
    example = graph.examples[0]
    if fmt == "onnx":
        # external_data=False: weights inside the one file (torch's default writes them to <file>.data beside it,
        # which a copy of the .onnx alone, an MLflow artifact say, would lack); ONNX allows up to 2 GB that way.
        torch.onnx.export(graph.module, example, str(path), dynamo=True, input_names=list(graph.inputs),
                          output_names=list(graph.outputs), dynamic_shapes=graph.dynamic, external_data=False,
                          verbose=False)  # fmt: skip
        return
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python-level shape read; the check at a second size is what tells.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph.module, example)
    torch.jit.save(traced, str(path))


def run_exported(path: Path, fmt: str, inputs: tuple[Tensor, ...], names: list[str]) -> list[Tensor]:
    """Outputs of an exported file (onnxruntime or torch.jit.load) for `inputs`, as tensors."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)}
        return [torch.from_numpy(out) for out in session.run(None, feed)]
    with torch.no_grad():
        outputs = torch.jit.load(str(path))(*inputs)
    return list(outputs) if isinstance(outputs, tuple | list) else [outputs]


def check(graph: Graph, path: Path, fmt: str) -> dict[str, dict[str, float]]:
    """Max |exported - PyTorch| per output at both example sizes; raises when one exceeds TOLERANCE (scaled)."""
    report = {}
    for example in graph.examples:
        with torch.no_grad():
            expected = graph.module(*example)
        expected = list(expected) if isinstance(expected, tuple) else [expected]
        got = run_exported(path, fmt, example, list(graph.inputs))
        shape = "x".join(map(str, example[0].shape))
        if "rois" in graph.inputs:
            shape += f" with {len(example[3])} rois"
        report[shape] = {}
        for name, out, ref in zip(graph.outputs, got, expected, strict=True):
            if out.shape != ref.shape:
                raise RuntimeError(f"{path}: output {name} has shape {list(out.shape)} at input {shape}, PyTorch's "
                                   f"{list(ref.shape)}: the export does not generalise to this size")  # fmt: skip
            diff = float((out - ref).abs().max()) if ref.numel() else 0.0
            if diff > TOLERANCE * max(1.0, float(ref.abs().max()) if ref.numel() else 0.0):
                raise RuntimeError(f"{path}: output {name} differs from PyTorch by up to {diff:.3g} at input {shape}")
            report[shape][name] = diff
    return report


def _beside(path: Path, part: str) -> Path:
    """`last.onnx` -> `last.masks.onnx`, `last.torchscript.pt` -> `last.torchscript.masks.pt`."""
    return path.with_name(f"{path.stem}.{part}{path.suffix}")


def _store_problem(uri: str) -> str | None:
    """Why the tracking store at `uri` cannot be written now, or None. A missing SQLite file is a problem: MLflow
    would create an empty store there."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return None if db.is_file() else f"{db} does not exist"
    return store.unreachable(uri)


def log_to_run(meta: dict, files: list[Path]) -> bool:
    """Log `files` to the checkpoint's MLflow run under `export/`; False (with a message saying why) when it
    cannot be reached: the export itself stands, its files stay where they were written."""
    run_id, uri = meta.get("mlflow_run_id"), meta.get("tracking_uri")
    problem = "the checkpoint names no MLflow run" if not (run_id and uri) else _store_problem(uri)
    if problem is None:
        client = store.client(uri)
        try:
            client.get_run(run_id)
            for path in files:
                client.log_artifact(run_id, str(path), "export")
        except (MlflowException, OSError) as err:
            problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if problem is not None:
        print(f"warning: exported files not logged to MLflow run {run_id} in {uri} ({problem}); they are at "
              f"{files[0].parent}", file=sys.stderr)  # fmt: skip
        return False
    print(f"Logged to MLflow run {run_id} under export/: {runs.ui_hint(uri, run_id)}")
    return True


def export(cfg: DictConfig) -> list[Path]:
    """Export the checkpoint's network in `cfg.format`, check it against PyTorch, write the sidecar, log all."""
    validate_config(cfg, EXPORT_KEYS)
    fmt = str(cfg.format)
    if fmt not in SUFFIXES:
        raise ConfigError(f"format={fmt}: choose one of {', '.join(SUFFIXES)}.")
    ckpt = resolve_checkpoint(cfg.ckpt_path)
    task, train_cfg, meta = load_task(ckpt)
    size = int(task.hparams.input_size if "input_size" in task.hparams else train_cfg.data.val_size)
    parts = graphs(task, size)
    main = Path(cfg.output).expanduser().resolve() if cfg.output else ckpt.with_name(ckpt.stem + SUFFIXES[fmt])
    main.parent.mkdir(parents=True, exist_ok=True)
    paths = {name: main if name == "model" else _beside(main, name) for name in parts}
    sidecar: dict[str, Any] = {
        "format": fmt, "checkpoint": str(ckpt), "mlflow_run_id": meta.get("mlflow_run_id"),
        "task": type(task).__name__, "class_names": list(task.hparams.class_names), "input_size": size,
        "graphs": {},
    }  # fmt: skip
    for key in ("postprocess", "masks"):
        if key in task.hparams:
            sidecar[key] = dict(task.hparams[key])
    if "masks" in parts:
        sidecar["masks"]["roi_size"] = parts["masks"].module.roi_size
    for name, graph in parts.items():
        _write(graph, paths[name], fmt)
        diffs = check(graph, paths[name], fmt)
        sidecar["graphs"][name] = {"file": paths[name].name, "inputs": graph.inputs, "outputs": graph.outputs,
                                   "max_abs_diff": diffs}  # fmt: skip
        worst = max(d for per_size in diffs.values() for d in per_size.values())
        print(f"Exported {paths[name]} ({fmt}); against PyTorch at {' and '.join(diffs)}: max abs diff {worst:.2g}")
    meta_path = main.with_name(main.name + ".json")
    runs.write_json(meta_path, sidecar)
    files = [*paths.values(), meta_path]
    log_to_run(meta, files)
    return files


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_user_error(export, cfg)


def main() -> None:
    """Console entry point `pipeline-export`."""
    _hydra_main()


if __name__ == "__main__":
    main()
