"""Config validation: every key must mean something before any work starts.

Hydra accepts `+model.typo=3` and the object built from that node silently drops it. We check each node that
has a `_target_` against the signature of what it builds, and the top level against the entry's known keys,
so a typo fails with a message naming the key and the accepted ones.
"""

from __future__ import annotations

import difflib
import inspect
import json
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.errors import ConfigError

HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


def _accepted_keys(target: str, where: str) -> set[str] | None:
    """Parameter names that `target` accepts (following **kwargs up the class hierarchy), or None for any."""
    try:
        obj = get_object(target)
    except Exception as err:  # Hydra wraps import errors in several types
        raise ConfigError(f"{where}._target_: cannot import '{target}' ({err})") from None
    inits = (
        [cls.__dict__["__init__"] for cls in obj.__mro__ if "__init__" in cls.__dict__]
        if inspect.isclass(obj)
        else [obj]
    )
    names: set[str] = set()
    for func in inits:
        params = inspect.signature(func).parameters.values()
        names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _unknown_key_error(key: str, where: str, accepted: set[str], owner: str) -> ConfigError:
    full = f"{where}.{key}" if where else key
    close = difflib.get_close_matches(key, sorted(accepted), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"Unknown config key '{full}': {owner} does not accept it.{hint} Accepted keys: {', '.join(sorted(accepted))}."
    )


def _check_node(node: Any, where: str) -> None:
    """Recursively check every `_target_` node's keys against its target's signature."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_node(item, f"{where}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node else None
    if target is not None:
        accepted = _accepted_keys(str(target), where)
        if accepted is not None:
            for key in node.keys():
                if key not in HYDRA_KEYS and key not in accepted:
                    raise _unknown_key_error(str(key), where, accepted, str(target))
    for key in node.keys():
        if str(key) in HYDRA_KEYS:
            continue
        _check_node(node._get_node(key), f"{where}.{key}" if where else str(key))


def _missing_keys(cfg: DictConfig, where: str = "") -> list[str]:
    """Dotted keys still `???`, found without resolving interpolations (which may themselves need them)."""
    missing = []
    for key in cfg.keys():
        path = f"{where}.{key}" if where else str(key)
        node = cfg._get_node(key)
        if OmegaConf.is_missing(cfg, key):
            missing.append(path)
        elif isinstance(node, DictConfig) and not node._is_interpolation():
            missing += _missing_keys(node, path)
    return missing


def validate_config(cfg: DictConfig, top_level: set[str]) -> None:
    """Raise ConfigError for an unknown top-level key or a key no built object accepts."""
    for key in cfg.keys():
        if key not in top_level:
            raise _unknown_key_error(str(key), "", top_level, "the entry config")
    _check_node(cfg, "")
    missing = _missing_keys(cfg)
    if missing:
        raise ConfigError(
            f"Missing mandatory value(s): {', '.join(sorted(missing))} (pass e.g. {sorted(missing)[0]}=…)."
        )


TRAIN_KEYS = {
    "data", "model", "trainer", "logger", "callbacks", "paths",
    "task_name", "tags", "seed", "deterministic", "ckpt_path", "resume_mode", "register",
}  # fmt: skip
EVAL_KEYS = {"trainer", "logger", "paths", "task_name", "ckpt_path", "model_uri", "data", "deterministic", "split"}
PREDICT_KEYS = {"paths", "logger", "task_name", "ckpt_path", "model_uri", "input", "device", "min_score", "batch_size"}


def flat_keys(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested config (plain containers) as {"a.b.c": "value"} strings; lists and empty dicts as JSON."""
    out: dict[str, str] = {}
    if isinstance(node, dict) and node:
        for key, value in node.items():
            out.update(flat_keys(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = json.dumps(node) if isinstance(node, (list, dict)) else str(node)
    return out


def changed_keys(old: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """{key: (old, new)} for every flattened key whose value differs or that exists on one side only."""
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
