"""`pipeline-predict ckpt_path=… input=<image or folder>`: write mask overlays and raw label masks."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.progress import track

from pipeline.checkpoint import resolve_checkpoint
from pipeline.cli import CONF_DIR, exit_on_user_error
from pipeline.config import PREDICT_KEYS, ConfigError, validate_config
from pipeline.data.coco import read_rgb
from pipeline.eval import load_task
from pipeline.viz import overlay, palette

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


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


def predict(cfg: DictConfig) -> list[Path]:
    """Predict every input image at its own size; returns the written mask paths."""
    validate_config(cfg, PREDICT_KEYS)
    images = list_images(Path(cfg.input).expanduser())
    task, train_cfg, _ = load_task(resolve_checkpoint(cfg.ckpt_path))
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    task.to(device)
    num_classes = int(train_cfg.data.num_classes)
    colours = palette(num_classes).numpy().astype(np.uint8).reshape(-1).tolist()

    out_dir = Path(cfg.paths.output_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    written = []
    with torch.inference_mode():
        for path in track(images, description="Predicting"):
            rgb = torch.from_numpy(read_rgb(path)).permute(2, 0, 1)
            labels = task.predict_masks(rgb.float().div(255).unsqueeze(0).to(device))[0].cpu()
            mask = Image.fromarray(labels.numpy().astype(np.uint8))
            mask.putpalette(colours)  # makes it an index PNG: pixel value = class id, shown in class colours
            mask.save(out_dir / "masks" / f"{path.stem}.png")
            picture = overlay(rgb, labels, num_classes).permute(1, 2, 0).numpy()
            Image.fromarray(picture).save(out_dir / "overlays" / f"{path.stem}.png")
            written.append(out_dir / "masks" / f"{path.stem}.png")
    print(f"Wrote {len(written)} masks to {out_dir / 'masks'} and overlays to {out_dir / 'overlays'}")
    return written


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_user_error(predict, cfg)


def main() -> None:
    """Console entry point `pipeline-predict`."""
    _hydra_main()


if __name__ == "__main__":
    main()
