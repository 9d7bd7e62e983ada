"""Shared entry-point behaviour: user errors end in one clear message, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.data.checks import read_json
from pipeline.data.formats import yolo_class_names

T = TypeVar("T")

# Absolute, so Hydra finds conf/ whether we run as a console script or as `python -m pipeline.<entry>`.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# `${cwd:}`: the directory the command was started in (Hydra does not chdir). Unlike `${hydra:runtime.cwd}` it
# also resolves while a multirun sweeper computes its sweep dir, before any job's HydraConfig exists.
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)
OmegaConf.register_new_resolver("len", len, replace=True)


def coco_class_names(annotations: str) -> list[str]:
    """`${coco_class_names:<instances json>}`: "background" then the file's category names in id order."""
    categories = sorted(read_json(Path(annotations))["categories"], key=lambda c: c["id"])
    return ["background", *(c["name"] for c in categories)]


OmegaConf.register_new_resolver("coco_class_names", coco_class_names, replace=True)
OmegaConf.register_new_resolver("yolo_class_names", yolo_class_names, replace=True)

USER_ERRORS = (ConfigError, CheckpointError, ConnectionError, FileNotFoundError, InstantiationException)


def exit_on_user_error(func: Callable[..., T], *args: object) -> T:
    """Run func; a config, checkpoint, data or connection error exits with status 1 and its message."""
    try:
        return func(*args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
