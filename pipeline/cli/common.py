"""Shared entry-point behaviour: user errors end in one clear message, not a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data.checks import DataError, read_json
from pipeline.data.formats import yolo_class_names
from pipeline.errors import ConfigError
from pipeline.metrics.monitor import monitor_mode
from pipeline.tracking.registry import checkpoint_from_model_uri
from pipeline.training.callbacks import NonFiniteLossError
from pipeline.training.checkpoint import CheckpointError, resolve_checkpoint

T = TypeVar("T")


def _register(name: str, resolver: Callable[..., object]) -> None:
    """Register `${pipeline.<name>:…}` once; the prefix keeps a user's own resolvers in the same process intact."""
    if not OmegaConf.has_resolver(f"pipeline.{name}"):
        OmegaConf.register_new_resolver(f"pipeline.{name}", resolver)


# `${pipeline.cwd:}`: the directory the command was started in (Hydra does not chdir). Unlike
# `${hydra:runtime.cwd}` it also resolves while a multirun sweeper computes its sweep dir, before any HydraConfig.
_register("cwd", os.getcwd)
_register("len", len)
_register("monitor_mode", monitor_mode)  # checkpoint and sweep direction follow the metric


def coco_class_names(annotations: str) -> list[str]:
    """`${pipeline.coco_class_names:<instances json>}`: "background" then the file's category names in id order."""
    categories = read_json(Path(annotations))["categories"]
    if not all(isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c for c in categories):
        raise DataError(f"{annotations}: every category needs an integer 'id' and a 'name'.")
    return ["background", *(c["name"] for c in sorted(categories, key=lambda c: c["id"]))]


@functools.lru_cache(maxsize=32)
def _names_of_version(kind: str, path: str, stamp: tuple[int, int]) -> tuple[str, ...]:
    """Class names of one version (mtime, size) of a file, parsed once per process."""
    return tuple(coco_class_names(path) if kind == "coco" else yolo_class_names(path))


def _names(kind: str, path: str) -> list[str]:
    """Class names read once per file version: OmegaConf calls a resolver on every access of the key (many times
    per run), and a large COCO json takes seconds to parse. Module-level, so configs holding it still pickle
    (submitit and joblib pickle the config with its resolvers)."""
    try:
        stat = os.stat(path)
    except OSError:
        return coco_class_names(path) if kind == "coco" else yolo_class_names(path)  # its own error naming the file
    return list(_names_of_version(kind, path, (stat.st_mtime_ns, stat.st_size)))


def cached_coco_class_names(annotations: str) -> list[str]:
    """`coco_class_names`, parsed once per version of the file."""
    return _names("coco", annotations)


def cached_yolo_class_names(yaml_file: str) -> list[str]:
    """`yolo_class_names`, parsed once per version of the file."""
    return _names("yolo", yaml_file)


_register("coco_class_names", cached_coco_class_names)
_register("yolo_class_names", cached_yolo_class_names)

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
