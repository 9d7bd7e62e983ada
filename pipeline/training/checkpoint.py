"""Resume resolution, run metadata stored in every checkpoint, and the checks a checkpoint passes before use.

Lightning's `ckpt_path="last"` only looks in the current run's folder; with Hydra's timestamped run dirs it
finds nothing and silently trains from scratch. We resolve the checkpoint ourselves and fail loudly instead.
A checkpoint is checked (readable, ours, this format, weights that fit the model, the run's latest state when
continuing) before any MLflow run is created or re-opened, so a bad file never leaves a run RUNNING or forked.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import time
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO

from pipeline.training.config import changed_keys, flat_keys

# The layout of the `pipeline` block and of what we store; bump it when a checkpoint of the previous layout can no
# longer be resumed, evaluated or predicted from, so such a file is refused with a message instead of a KeyError.
FORMAT = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(FileNotFoundError):
    """A checkpoint that cannot be resumed from; the message says which file and why."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's checkpoints/last.ckpt; never None, never a silent fresh start."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        last = p / "checkpoints" / "last.ckpt"
        if not last.is_file():
            found = sorted(q.name for q in (p / "checkpoints").glob("*.ckpt")) if (p / "checkpoints").is_dir() else []
            raise CheckpointError(f"Run directory {p} has no checkpoints/last.ckpt (found: {found or 'nothing'}).")
        return last
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {p} does not exist; refusing to start from scratch.")
    return p


def _check_archive(path: Path) -> None:
    """Refuse a file that is empty, not a torch zip archive, truncated, or whose data fails its CRC-32.

    torch's own reader skips the archive's checksums: a file with flipped bytes in a tensor loads without error.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        size = path.stat().st_size
    except OSError as err:
        raise CheckpointError(f"Checkpoint {path} cannot be read: {err.strerror or err}.") from None
    if not head:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): nothing was written to it.")
    if head != _ZIP_MAGIC:
        raise CheckpointError(
            f"{path} is not a checkpoint: torch.save writes a zip archive, and this file starts with {head!r}. "
            "Pass a .ckpt file that pipeline-train wrote (<run dir>/checkpoints/last.ckpt or best.ckpt)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.CRC:  # 0: saved without checksums (torch.serialization config), nothing to compare
                    with archive.open(entry) as data:
                        while data.read(1 << 24):
                            pass
    except Exception as err:  # zipfile meets damaged headers with BadZipFile, EOFError, OSError,
        # NotImplementedError (a flipped method or flag bit), UnicodeDecodeError (a flipped name byte), …
        damage = "the end of its zip archive is missing" if "not a zip file" in str(err) else str(err)
        raise CheckpointError(
            f"Checkpoint {path} is truncated or corrupt ({size} bytes; {damage}). It cannot be loaded; use another "
            "checkpoint of the run (best.ckpt, last.ckpt, or the copy in its MLflow artifacts)."
        ) from None


def _describe(obj: object) -> str:
    """What a loaded object is, in a few words: "a Tensor", "a dict with keys ['a', 'b']"."""
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        return f"a dict with keys {keys[:8]}{' …' if len(keys) > 8 else ''}"
    return f"a {type(obj).__name__}"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A whole pipeline-train checkpoint, loaded weights-only (memory-mapped); one clear CheckpointError otherwise.

    Refused: an unreadable, empty, truncated or corrupt file, one that is not a torch checkpoint or holds objects a
    weights-only load rejects, one not written by pipeline-train, and one of another checkpoint format.
    """
    path = Path(path)
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\n|$)", str(err))
        raise CheckpointError(
            f"{path} holds Python objects that a weights-only load refuses ({found.group(1) if found else err}), so it "
            "was not written by pipeline-train, whose checkpoints hold only tensors and plain values. It is not loaded "
            "unsafely; pass a checkpoint that pipeline-train wrote."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as err:  # what torch raises for an archive it cannot parse
        reason = str(err).split("\n")[0] or type(err).__name__
        raise CheckpointError(f"Checkpoint {path} is corrupt: torch.load cannot read it ({reason}).") from None
    meta = state.get("pipeline") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(
            f"{path} was not written by pipeline-train: it holds {_describe(state)}, without the 'pipeline' block "
            "(config, MLflow run) that every pipeline-train checkpoint carries."
        )
    written = meta.get("format")
    if written != FORMAT:
        age = "a newer" if isinstance(written, int) and written > FORMAT else "an older"
        raise CheckpointError(
            f"{path} was written by {age}, incompatible version of pipeline-train (checkpoint format "
            f"{written if written is not None else 'none'}; this version reads format {FORMAT}), so it cannot be "
            "resumed, forked, evaluated or predicted from here. Use the version that wrote it (its commit is the "
            "run's mlflow.source.git.commit tag in MLflow)."
        )
    missing = [key for key in ("state_dict", "epoch", "global_step") if key not in state]
    if missing:
        raise CheckpointError(f"Checkpoint {path} is incomplete: it has no {', '.join(missing)}.")
    return state


def _family(model: dict) -> tuple[str, str]:
    """(task class, net class) of a model config: what decides whether a checkpoint's weights can fit at all."""
    net = model.get("net") or {}
    return str(model.get("_target_")), str(net.get("_target_") if isinstance(net, dict) else None)


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def check_model(path: str | os.PathLike, state: dict[str, Any], task: torch.nn.Module, cfg: DictConfig) -> None:
    """Refuse a checkpoint whose weights do not fit `task` (built from `cfg`): another model family, another number
    of classes, another architecture; the message names the first differing keys and shapes and the config keys."""
    theirs = state["pipeline"]["config"]
    ours = OmegaConf.to_container(cfg, resolve=True)
    if _family(theirs["model"]) != _family(ours["model"]):
        (their_task, their_net), (our_task, our_net) = _family(theirs["model"]), _family(ours["model"])
        raise CheckpointError(
            f"{path} is a checkpoint of another model family: {their_task.rsplit('.', 1)[-1]} with "
            f"{their_net.rsplit('.', 1)[-1]} (model._target_={their_task}, model.net._target_={their_net}), while this "
            f"command builds {our_task.rsplit('.', 1)[-1]} with {our_net.rsplit('.', 1)[-1]} (model._target_="
            f"{our_task}, model.net._target_={our_net}). Choose the model the checkpoint was trained with (its "
            "config is the run's config.yaml), or a checkpoint of this model."
        )
    got, expected = state["state_dict"], task.state_dict()
    shapes = [f"{k} is {_shape(got[k])} in the checkpoint, {_shape(v)} here" for k, v in expected.items()
              if k in got and got[k].shape != v.shape]  # fmt: skip
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if not (shapes or missing or unexpected):
        return
    problems = shapes[:3] + [f"{len(shapes) - 3} more of another shape"] * (len(shapes) > 3)
    if missing:
        problems.append(f"this model has {_some(missing)}, which the checkpoint lacks")
    if unexpected:
        problems.append(f"the checkpoint has {_some(unexpected)}, which this model lacks")
    settings = changed_keys(flat_keys(theirs["model"], "model."), flat_keys(ours["model"], "model."))
    config = {k: v for k, v in settings.items() if not k.startswith(("model.optimizer.", "model.scheduler.",
                                                                     "model.class_names"))}  # fmt: skip
    classes = theirs.get("data", {}).get("num_classes"), ours.get("data", {}).get("num_classes")
    if classes[0] != classes[1]:
        why = f"the checkpoint has {classes[0]} classes (data.num_classes), this run {classes[1]}"
    elif config:
        why = "the model settings differ: " + "; ".join(f"{k} is {a} in the checkpoint, {b} here" for k, (a, b) in
                                                         list(config.items())[:4])  # fmt: skip
    else:
        why = ("its own config builds a different model with this version of the code, so it was written by an "
               "incompatible version")  # fmt: skip
    raise CheckpointError(f"The weights in {path} do not fit the model built here ({'; '.join(problems)}): {why}.")


def check_latest(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Refuse to continue a run from anything but its latest state (its run dir's last.ckpt or the same step).

    Continuing from best.ckpt or an older copy would log a second history into the same MLflow run and overwrite
    last.ckpt with a branch; a fork (a new run from the weights) is what such a user wants.
    """
    path = Path(path).resolve()
    meta = state["pipeline"]
    last = Path(meta["run_dir"]) / "checkpoints" / "last.ckpt"
    if not last.is_file():  # the run dir moved or is gone: nothing to branch from; only a last.ckpt is the latest
        if path.name == "last.ckpt":
            return
        where = f"its run directory's {last} is missing"
    elif last.resolve() == path:
        return
    else:
        try:
            latest = load_checkpoint(last)
        except CheckpointError as err:
            raise CheckpointError(
                f"Cannot tell whether {path} is its run's latest state: {err} To start a new run from {path.name}'s "
                f"weights instead, add resume_mode=fork: pipeline-train ckpt_path={path} resume_mode=fork"
            ) from None
        if (latest["global_step"], latest["epoch"]) == (state["global_step"], state["epoch"]):
            return
        where = f"the run went on to global step {latest['global_step']} (epoch {latest['epoch']}) in {last}"
    raise CheckpointError(
        f"{path} is not the latest state of MLflow run {meta.get('mlflow_run_id')}: it was saved at global step "
        f"{state['global_step']} (epoch {state['epoch']}), and {where}. Continuing from it (resume_mode=continue) "
        f"would log a second history into that run and overwrite its last.ckpt with a branch. To continue the run, "
        f"pass ckpt_path={Path(meta['run_dir'])}; to start a new run from these weights, add resume_mode=fork: "
        f"pipeline-train ckpt_path={path} resume_mode=fork"
    )


def check_fork(path: str | os.PathLike, state: dict[str, Any], task: torch.nn.Module) -> None:
    """Refuse to fork from a checkpoint that shares no tensor (by name and shape) with `task`: nothing to start
    from. Any overlap is enough (another number of classes, the detector's weights for the instance model)."""
    got, expected = state["state_dict"], task.state_dict()
    # weights, not counters: two models with any BatchNorm share a `num_batches_tracked` of shape []
    if not any(k in got and got[k].shape == v.shape and v.is_floating_point() and v.numel() > 1
               for k, v in expected.items()):  # fmt: skip
        their = _family(state["pipeline"]["config"]["model"])
        raise CheckpointError(
            f"{path} shares no weights with the model built here: none of its {len(got)} tensors (a "
            f"{their[0].rsplit('.', 1)[-1]} with {their[1].rsplit('.', 1)[-1]}) has the name and shape of one of "
            f"this model's {len(expected)}. Fork from a checkpoint of a model with the same backbone."
        )


def check_resumable(path: str | os.PathLike, state: dict[str, Any], task: torch.nn.Module, cfg: DictConfig) -> None:
    """Refuse a loaded checkpoint (load_checkpoint) that this training cannot start from, before any MLflow run is
    created or re-opened: continuing needs weights that fit `task` exactly (check_model) and the run's latest
    state (check_latest); a fork needs some weights in common (check_fork)."""
    if cfg.resume_mode == "fork":
        check_fork(path, state, task)
        return
    check_model(path, state, task, cfg)
    check_latest(path, state)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but each file is written beside its target and renamed into place.

    Lightning's own atomic save stages the file with `tempfile.mkstemp()` in $TMPDIR: from another filesystem
    the final move is a copy, and a kill during it leaves a truncated last.ckpt. A temporary file in the target's
    own directory makes the rename atomic without touching the process-wide temporary directory (which
    multiprocessing also uses for its sockets, whose paths must stay short).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        """Write `checkpoint` to `<dir>/.<name>.<random>.tmp`, fsync it, then `os.replace` it onto `path`."""
        if storage_options is not None or "://" in str(path):  # remote or custom storage: Lightning's own path
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a save that was killed (SIGKILL)
            stale.unlink(missing_ok=True)
        staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(staging, "xb") as f:  # created with the usual permissions (umask), unlike mkstemp's 0600
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise


class RunMetadata(pl.Callback):
    """Stores the resolved config, MLflow run id and run dir in every checkpoint (plain dicts and strings).

    Also the dataset's category ids (label i = category_ids[i - 1]), so predictions name the training file's ids.
    """

    def __init__(self, config: dict, run_id: str | None, run_dir: str, tracking_uri: str) -> None:
        self.meta = {"config": config, "mlflow_run_id": run_id, "run_dir": run_dir, "tracking_uri": tracking_uri}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        category_ids = getattr(trainer.datamodule, "category_ids", None)
        checkpoint["pipeline"] = {**self.meta, "format": FORMAT,
                                  "category_ids": list(category_ids) if category_ids else None}  # fmt: skip


def argv_for_resume(argv: list[str]) -> list[str]:
    """Command-line args that make Hydra reuse the checkpoint's run directory when continuing a run.

    Hydra fixes the run dir before our code runs, so `ckpt_path=…` (without `resume_mode=fork` or an explicit
    `hydra.run.dir=…`) is resolved here first; this invocation's Hydra files go to `.hydra/resume-<time>`.
    Lightning-spawned DDP children already get the parent's run dir (`hydra.run.dir=…` on their command line);
    every rank that torchrun/srun started resolves it here itself. The file is checked here too (and a continued
    run's checkpoint must be its latest state), so a bad one is refused before Hydra writes into any run dir.
    """
    args = dict(a.lstrip("+").split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))
    ckpt = args.get("ckpt_path")
    if ckpt in (None, "", "null") or "hydra.run.dir" in args:
        return argv
    if args.get("resume_mode", "continue") == "fork":
        if not {"-m", "--multirun"} & set(argv):  # a sweep's jobs check their own values
            load_checkpoint(resolve_checkpoint(ckpt))
        return argv
    path = resolve_checkpoint(ckpt)
    state = load_checkpoint(path)
    check_latest(path, state)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    return [*argv, f'hydra.run.dir="{state["pipeline"]["run_dir"]}"', f"hydra.output_subdir=.hydra/resume-{stamp}"]
