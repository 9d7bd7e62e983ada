"""`pipeline-predict ckpt_path=… input=<image or folder>`: masks and overlays, or detections drawn plus COCO JSON."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.progress import track
from torchvision.ops import box_convert

from pipeline import tracking
from pipeline.checkpoint import resolve_checkpoint
from pipeline.cli import CONF_DIR, exit_on_user_error
from pipeline.config import PREDICT_KEYS, ConfigError, validate_config
from pipeline.data.coco import read_rgb
from pipeline.data.formats import IMAGE_SUFFIXES
from pipeline.data.transforms import letterbox
from pipeline.eval import load_task
from pipeline.ops.boxes import letterbox_scale, unletterbox
from pipeline.ops.masks import encode_rle
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


def _to_input(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> [1, 3, H, W] float in 0..1 on `device`."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255).unsqueeze(0).to(device)


def _predict_masks(task: torch.nn.Module, images: list[Path], out_dir: Path, train_cfg: DictConfig, device) -> None:
    """Segmentation as validation scores it: letterboxed to the training's `data.val_size`, mapped back to each
    image's own size; index-PNG masks (pixel = class id) and overlays."""
    size = int(train_cfg.data.val_size)
    num_classes = int(train_cfg.data.num_classes)
    colours = palette(num_classes).numpy().astype(np.uint8).reshape(-1).tolist()
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    for path in track(images, description="Predicting"):
        rgb = read_rgb(path)
        image = _to_input(letterbox(size, 0)(image=rgb)["image"], device)
        labels = task.predict_masks(image, [rgb.shape[:2]])[0].cpu()
        mask = Image.fromarray(labels.numpy().astype(np.uint8))
        mask.putpalette(colours)  # makes it an index PNG: pixel value = class id, shown in class colours
        mask.save(out_dir / "masks" / f"{path.stem}.png")
        picture = overlay(torch.from_numpy(rgb).permute(2, 0, 1), labels, num_classes).permute(1, 2, 0).numpy()
        Image.fromarray(picture).save(out_dir / "overlays" / f"{path.stem}.png")
    print(f"Wrote {len(images)} masks to {out_dir / 'masks'} and overlays to {out_dir / 'overlays'}")


def _predict_detections(
    task: torch.nn.Module, images: list[Path], out_dir: Path, meta: dict, min_score: float, device
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
    for image_id, path in enumerate(track(images, description="Predicting"), start=1):
        rgb = read_rgb(path)
        height, width = rgb.shape[:2]
        det = task.detect(_to_input(letterbox(size, 0)(image=rgb)["image"], device))[0]
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
    tracking.write_json(out_dir / "predictions.json", results)
    print(f"Wrote {len(results)} detections (score >= {min_score}) to {out_dir / 'predictions.json'} and drawings "
          f"to {pictures}")  # fmt: skip


def predict(cfg: DictConfig) -> Path:
    """Predict every input image; returns the output directory."""
    validate_config(cfg, PREDICT_KEYS)
    images = list_images(Path(cfg.input).expanduser())
    task, train_cfg, meta = load_task(resolve_checkpoint(cfg.ckpt_path))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    task.to(device)
    out_dir = Path(cfg.paths.output_dir)
    with torch.inference_mode():
        if task.TARGETS in ("boxes", "instances"):
            _predict_detections(task, images, out_dir, meta, float(cfg.min_score), device)
        else:
            _predict_masks(task, images, out_dir, train_cfg, device)
    return out_dir


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_user_error(predict, cfg)


def main() -> None:
    """Console entry point `pipeline-predict`."""
    _hydra_main()


if __name__ == "__main__":
    main()
