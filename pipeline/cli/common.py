"""Shared entry-point behaviour: user errors end in one clear message, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError
from pipeline.tracking.registry import checkpoint_from_model_uri
from pipeline.training.callbacks import NonFiniteLossError
from pipeline.training.checkpoint import CheckpointError, resolve_checkpoint

T = TypeVar("T")


USER_ERRORS = (
    ConfigError, CheckpointError, ConnectionError, FileNotFoundError, InstantiationException, NonFiniteLossError
)  # fmt: skip


def user_error(err: BaseException) -> BaseException | None:
    """The config, checkpoint, data or connection error behind `err` (also inside a resolver), or None for a bug."""
    if isinstance(err, USER_ERRORS):
        return err
    if isinstance(err, OmegaConfBaseException):  # a resolver (e.g. class names read from the data) met a user error
        # OmegaConf drops __cause__ unless OC_CAUSE=1; the resolver's exception is still the __context__.
        cause = err.__cause__ or err.__context__
        return cause if isinstance(cause, USER_ERRORS) else None
    return None


def exit_on_user_error(func: Callable[..., T], *args: object) -> T:
    """Run func; a config, checkpoint, data or connection error exits with status 1 and its message."""
    try:
        return func(*args)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(1)


def checkpoint_of(cfg: DictConfig, tracking_uri: str) -> Path:
    """The checkpoint file that `ckpt_path` (a file or run directory) or `model_uri` (`models:/…`) names."""
    ckpt_path, model_uri = cfg.get("ckpt_path"), cfg.get("model_uri")
    if (ckpt_path is None) == (model_uri is None):
        raise ConfigError(
            f"Give exactly one of ckpt_path=<checkpoint file or run directory> and model_uri=models:/<name>/<version> "
            f"(or models:/<name>@<alias>); {'both were' if ckpt_path is not None else 'neither was'} given."
        )
    if model_uri is not None:
        return checkpoint_from_model_uri(str(model_uri), tracking_uri)
    return resolve_checkpoint(ckpt_path)
