"""A trained task back from its checkpoint, for pipeline-eval, pipeline-predict and pipeline-export."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import pipeline.training.resolvers  # noqa: F401  (a checkpoint's config names the ${pipeline.*} resolvers)
from pipeline.training.checkpoint import check_model, load_checkpoint

# Task classes merged into another since a checkpoint was written: its config still names the old one.
MERGED_TASKS = {"pipeline.tasks.instance.TorchvisionInstanceTask": "pipeline.tasks.instance.InstanceTask"}


def load_task(ckpt: Path) -> tuple[pl.LightningModule, DictConfig, dict]:
    """The trained LightningModule (weights-only load), the training config and the checkpoint's metadata.

    A file that is not a readable, current pipeline-train checkpoint, or whose weights do not fit the model its own
    config builds with this code, is refused with a CheckpointError naming the file and the difference.
    """
    state = load_checkpoint(ckpt)
    meta = state["pipeline"]
    train_cfg = OmegaConf.create(meta["config"])
    train_cfg.model._target_ = MERGED_TASKS.get(train_cfg.model._target_, train_cfg.model._target_)
    try:
        task = get_class(train_cfg.model._target_).load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):
            raise
        check_model(ckpt, state, instantiate(train_cfg.model), train_cfg)  # says which keys and shapes differ
        raise
    return task.eval(), train_cfg, meta
