"""`pipeline-predict ckpt_path=… input=<image or folder>`: masks and overlays, or detections drawn plus COCO JSON.

Images go through the net `batch_size` at a time, each letterboxed to the same square as validation does, so a
batch is a plain stack and every image's output is what it would be alone (batch norm runs in eval mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.ops import box_convert

from pipeline.cli import CONF_DIR
from pipeline.cli.common import checkpoint_of, exit_on_user_error
from pipeline.data.coco import read_rgb
from pipeline.data.formats import IMAGE_SUFFIXES
from pipeline.data.transforms import letterbox
from pipeline.errors import ConfigError
from pipeline.ops.boxes import letterbox_scale, unletterbox
from pipeline.ops.masks import encode_rle
from pipeline.tracking import runs
from pipeline.training.config import PREDICT_KEYS, validate_config
from pipeline.training.loading import load_task
from pipeline.viz import draw_boxes, draw_instances, overlay, palette


def list_images(path: Path) -> list[Path]:
    """The image itself, or every image file directly inside a folder (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return files
        raise ConfigError(f"input={path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder.")
    raise ConfigError(f"input={path}: no such file or folder.")


def _batches(
    images: list[Path], size: int, batch_size: int, device: torch.device
) -> Iterator[tuple[list[Path], list[np.ndarray], torch.Tensor]]:
    """`batch_size` images at a time, with a progress bar: (paths, RGB uint8 [H, W, 3] each, their letterboxes
    [B, 3, size, size] float in 0..1 on `device`)."""
    square = letterbox(size, 0)
    columns = (TextColumn("Predicting"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns) as progress:
        bar = progress.add_task("predict", total=len(images))
        for start in range(0, len(images), batch_size):
            paths = images[start : start + batch_size]
            rgbs = [read_rgb(path) for path in paths]
            boxed = np.stack([square(image=rgb)["image"] for rgb in rgbs])
            batch = torch.from_numpy(boxed).permute(0, 3, 1, 2).float().div(255).to(device)
            yield paths, rgbs, batch
            progress.advance(bar, len(paths))


def _predict_masks(
    task: torch.nn.Module, images: list[Path], out_dir: Path, train_cfg: DictConfig, batch_size: int, device
) -> None:
    """Segmentation as validation scores it: letterboxed to the training's `data.val_size`, mapped back to each
    image's own size; index-PNG masks (pixel = class id) and overlays."""
    size = int(train_cfg.data.val_size)
    num_classes = int(train_cfg.data.num_classes)
    colours = palette(num_classes).numpy().astype(np.uint8).reshape(-1).tolist()
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    for paths, rgbs, batch in _batches(images, size, batch_size, device):
        for path, rgb, labels in zip(paths, rgbs, task.predict_masks(batch, [r.shape[:2] for r in rgbs]), strict=True):
            labels = labels.cpu()
            mask = Image.fromarray(labels.numpy().astype(np.uint8))
            mask.putpalette(colours)  # makes it an index PNG: pixel value = class id, shown in class colours
            mask.save(out_dir / "masks" / f"{path.stem}.png")
            picture = overlay(torch.from_numpy(rgb).permute(2, 0, 1), labels, num_classes).permute(1, 2, 0).numpy()
            Image.fromarray(picture).save(out_dir / "overlays" / f"{path.stem}.png")
    print(f"Wrote {len(images)} masks to {out_dir / 'masks'} and overlays to {out_dir / 'overlays'}")


def _predict_detections(
    task: torch.nn.Module, images: list[Path], out_dir: Path, meta: dict, min_score: float, batch_size: int, device
) -> None:
    """Detection at the training input size (letterboxed), in original pixels: boxes (and instance masks) drawn
    in class colours (`boxes/` or `overlays/`), and COCO results JSON (masks as RLE)."""
    size = int(task.hparams.input_size)
    names = list(task.hparams.class_names)
    category_ids = meta.get("category_ids") or list(range(1, len(names)))
    instances = task.TARGETS == "instances"
    pictures = out_dir / ("overlays" if instances else "boxes")
    pictures.mkdir(parents=True, exist_ok=True)
    results = []
    detected = ((path, rgb, det) for paths, rgbs, batch in _batches(images, size, batch_size, device)
                for path, rgb, det in zip(paths, rgbs, task.detect(batch), strict=True))  # fmt: skip
    for image_id, (path, rgb, det) in enumerate(detected, start=1):
        height, width = rgb.shape[:2]
        det = {k: v[det["scores"] >= min_score].cpu() for k, v in det.items()}
        scale = letterbox_scale(height, width, size)
        boxes, scores, labels = unletterbox(det["boxes"], scale, height, width), det["scores"], det["labels"]
        image = torch.from_numpy(rgb).permute(2, 0, 1)
        records = [
            {"image_id": image_id, "file_name": path.name, "category_id": category_ids[label - 1], "bbox": box,
             "score": score}
            for box, score, label in zip(box_convert(boxes, "xyxy", "xywh").tolist(), scores.tolist(), labels.tolist(),
                                         strict=True)
        ]  # fmt: skip
        if instances:
            masks = task.masks_to_original(det, scale, height, width)
            picture = draw_instances(image, boxes, labels, masks, names, scores)
            for record, mask in zip(records, masks, strict=True):
                record["segmentation"] = encode_rle(mask)
        else:
            picture = draw_boxes(image, boxes, labels, names, scores)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(pictures / f"{path.stem}.png")
        results += records
    runs.write_json(out_dir / "predictions.json", results)
    print(f"Wrote {len(results)} detections (score >= {min_score}) to {out_dir / 'predictions.json'} and drawings "
          f"to {pictures}")  # fmt: skip


def predict(cfg: DictConfig) -> Path:
    """Predict every input image; returns the output directory."""
    validate_config(cfg, PREDICT_KEYS)
    batch_size = cfg.batch_size
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: give a whole number of images, 1 or more.")
    images = list_images(Path(cfg.input).expanduser())
    task, train_cfg, meta = load_task(checkpoint_of(cfg, cfg.logger.tracking_uri))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    task.to(device)
    out_dir = Path(cfg.paths.output_dir)
    with torch.inference_mode():
        if task.TARGETS in ("boxes", "instances"):
            _predict_detections(task, images, out_dir, meta, float(cfg.min_score), batch_size, device)
        else:
            _predict_masks(task, images, out_dir, train_cfg, batch_size, device)
    return out_dir


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_user_error(predict, cfg)


def main() -> None:
    """Console entry point `pipeline-predict`."""
    _hydra_main()


if __name__ == "__main__":
    main()
