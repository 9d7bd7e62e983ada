"""The `${pipeline.<name>:…}` config resolvers, registered when this module is imported: every entry point and
`training.loading` (a checkpoint's config names them) import it."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.data.checks import DataError, read_json
from pipeline.data.formats import yolo_class_names
from pipeline.metrics.monitor import monitor_mode


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
