"""`pipeline-check-data <data overrides> [model=…] [show=16]`: check a dataset before spending compute on it.

Reads both splits the way training will (the model decides: semantic masks, boxes or instances), runs the data
checks (one clear error for unusable data; repairs and warnings counted), prints each split's summary (also
written to summary.json), and with `show=N` writes N training samples after augmentation and multi-scale
resize, boxes and masks drawn, to samples.png.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from pipeline.cli import CONF_DIR
from pipeline.cli.common import exit_on_user_error
from pipeline.tracking.runs import write_json
from pipeline.training.config import TRAIN_KEYS, validate_config
from pipeline.viz import draw_instances, overlay

CHECK_KEYS = TRAIN_KEYS | {"show"}


def sample_tiles(batch: dict, class_names: list[str]) -> list[torch.Tensor]:
    """Each sample of a training batch drawn as uint8 [3, S, S]: its semantic mask, or its boxes (and masks)."""
    if "mask" in batch:
        pairs = zip(batch["image"], batch["mask"], strict=True)
        return [overlay(image, mask, len(class_names)) for image, mask in pairs]
    masks = batch.get("masks") or [None] * len(batch["image"])
    return [
        draw_instances(image, boxes, labels, None if m is None else m.bool(), class_names)
        for image, boxes, labels, m in zip(batch["image"], batch["boxes"], batch["labels"], masks, strict=True)
    ]


def samples_grid(datamodule, count: int, class_names: list[str]) -> np.ndarray:
    """`count` training samples as the model sees them (augmented, multi-scale), as one uint8 [H, W, 3] grid."""
    tiles: list[torch.Tensor] = []
    for batch in datamodule.train_dataloader():
        tiles += sample_tiles(batch, class_names)
        if len(tiles) >= count:
            break
    tiles = tiles[:count]
    size = max(t.shape[-1] for t in tiles)  # batches differ in size: pad to the largest, white
    tiles = [F.pad(t, (0, size - t.shape[-1], 0, size - t.shape[-2]), value=255) for t in tiles]
    return make_grid(tiles, nrow=int(np.ceil(np.sqrt(len(tiles)))), padding=2, pad_value=255).permute(1, 2, 0).numpy()


def check_data(cfg: DictConfig) -> Path | None:
    """Check (and summarise) the configured data; returns the samples grid's path when `show` > 0."""
    validate_config(cfg, CHECK_KEYS)
    targets = get_class(cfg.model._target_).TARGETS
    datamodule = instantiate(cfg.data, targets=targets, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup("fit")  # reads and checks both splits, prints their summaries
    print(f"Data OK for {targets} targets: {len(datamodule.train_set)} training and {len(datamodule.val_set)} "
          "validation images.")  # fmt: skip
    out_dir = Path(cfg.paths.output_dir)
    summary = {split: getattr(datamodule, f"{split}_set").source.report.summary() for split in ("train", "val")}
    write_json(out_dir / "summary.json", summary)
    print(f"Summary: {out_dir / 'summary.json'}")
    if not cfg.show:
        return None
    path = out_dir / "samples.png"
    Image.fromarray(samples_grid(datamodule, int(cfg.show), list(cfg.data.class_names))).save(path)
    print(f"Wrote {cfg.show} training samples (augmented, as the model sees them) to {path}")
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="check_data")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_user_error(check_data, cfg)


def main() -> None:
    """Console entry point `pipeline-check-data`."""
    _hydra_main()


if __name__ == "__main__":
    main()
