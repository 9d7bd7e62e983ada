"""What every task shares: input normalisation, primitive hyper-parameters, optimizers built from config."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import OmegaConf

# Backbones expect ImageNet-normalised input (so pretrained weights work); batches carry RGB in 0..1.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_primitive(value: Any) -> Any:
    """OmegaConf containers as plain dicts/lists (resolved); anything else unchanged."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def build_optimizers(task: pl.LightningModule) -> Any:
    """The optimizer (and scheduler) of `task.hparams.optimizer`/`scheduler` config dicts, for configure_optimizers."""
    optimizer = instantiate(task.hparams.optimizer, params=task.parameters())
    if not task.hparams.scheduler:
        return optimizer
    scheduler = instantiate(task.hparams.scheduler, optimizer=optimizer)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": task.hparams.scheduler_interval},
    }
