"""`pipeline-eval ckpt_path=…` (or `model_uri=models:/…`): recompute validation metrics of a checkpoint, print
them, log an eval run.

Detection and instance checkpoints also write `predictions.json`: every detection in COCO results format (with
its mask as RLE for instances), with the image and category ids of the evaluated annotation file, so
pycocotools (or any COCO tool) can score it. `data.<key>=…` overrides the checkpoint's own data config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from rich.console import Console
from rich.table import Table

from pipeline.cli import CONF_DIR
from pipeline.cli.common import checkpoint_of, exit_on_user_error
from pipeline.errors import ConfigError
from pipeline.tracking import runs, store
from pipeline.training.config import EVAL_KEYS, validate_config
from pipeline.training.loading import load_task


def data_config(cfg: DictConfig, train_data: DictConfig) -> DictConfig:
    """The checkpoint's data config with the command's `data.*` overrides, checked like a training's.

    Hydra cannot catch a misspelt key here (eval.yaml's `data` starts empty), so every key given must be in the
    checkpoint's data config, or be a top-level argument its DataModule accepts.
    """
    group = runs.config_choices().get("data")  # a data group the command selected (data=coco)
    if group:
        files = " ".join(f"data.{k}={v}" for k, v in _leaves(train_data)
                         if isinstance(v, str) and "/" in v and k != "check_cache")  # fmt: skip
        raise ConfigError(
            f"data={group}: pipeline-eval evaluates with the checkpoint's own data config "
            f"({train_data.get('_target_')}), which a data group cannot replace. Point it at other files of that "
            f"format with its keys (data.<key>=…); its files now: {files or '(none)'}."
        )
    _check_keys(cfg.data, train_data, "data", str(train_data.get("_target_")))
    merged = OmegaConf.merge(train_data, cfg.data)
    validate_config(OmegaConf.create({"data": merged}), {"data"})
    return merged


def split_config(data: DictConfig, split: str, targets: str) -> DictConfig:
    """The data config that validates on `split`: "val" as trained, or "test" where the format names one (a YOLO
    yaml's `test:` entry, a VOC root's ImageSets/<Main for boxes | Segmentation>/test.txt)."""
    if split == "val":
        return data
    target = str(data.get("_target_", "")).rsplit(".", 1)[-1]
    if split != "test":
        raise ConfigError(f"split={split}: give split=val (the checkpoint's validation data) or split=test.")
    if target == "VocDataModule":  # voc_ids would read every file of the folder where the list is missing
        listing = Path(data.root) / "ImageSets" / ("Main" if targets == "boxes" else "Segmentation") / "test.txt"
        if not listing.is_file():
            raise ConfigError(f"split=test: {listing} does not exist, so {data.root} has no test split.")
    elif target != "YoloDataModule":  # a YOLO yaml without `test:` is refused by yolo_dataset, naming the yaml
        files = " ".join(f"data.val.{key}=…" for key in data.get("val") or {})
        raise ConfigError(
            f"split=test: {target} data has no named test split. Evaluate your test files with "
            f"{files or 'data.val.images=… data.val.annotations=…'} instead."
        )
    return OmegaConf.merge(data, {"val_split": "test"})


def _leaves(node: DictConfig, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every non-dict value under `node`."""
    out = []
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            out += _leaves(child, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", node[key]))
    return out


def _check_keys(given: DictConfig, base: DictConfig, where: str, target: str) -> None:
    """Every key of `given` exists in `base`, except top-level values (not dicts) that `validate_config` checks."""
    for key in given.keys():
        here = f"{where}.{key}"
        node, known = given._get_node(key), base._get_node(key) if key in base else None
        if isinstance(known, DictConfig) and not known._is_none() and isinstance(node, DictConfig):
            _check_keys(node, known, here, target)
        elif known is None and (where != "data" or isinstance(node, DictConfig)):
            raise ConfigError(
                f"Unknown config key '{here}': the checkpoint's data config ({target}) has no '{key}' under "
                f"{where}. Its keys there: {', '.join(sorted(map(str, base.keys())))}."
            )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate the checkpoint on its (or an overridden) validation set; write metrics.json, log to MLflow."""
    # With a data group given, data_config says what to do instead, before the group's own `???` keys are named.
    if "data" not in runs.config_choices():
        validate_config(cfg, EVAL_KEYS)
    store.check_reachable(cfg.logger.tracking_uri)
    ckpt = checkpoint_of(cfg, cfg.logger.tracking_uri)
    task, train_cfg, meta = load_task(ckpt)
    data = split_config(data_config(cfg, train_cfg.data), str(cfg.split), task.TARGETS)
    datamodule = instantiate(data, targets=task.TARGETS)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[RichProgressBar()], max_epochs=1)
    (results,) = trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in results.items()}
    if not trainer.is_global_zero:
        return metrics

    out_dir = Path(cfg.paths.output_dir)
    record = {"checkpoint": str(ckpt), "split": str(cfg.split), "metrics": metrics}
    runs.write_json(out_dir / "metrics.json", record)
    artifacts = [out_dir / "metrics.json"]
    if task.TARGETS != "semantic":
        results = coco_results(task.evaluator.records, datamodule.category_ids)
        runs.write_json(out_dir / "predictions.json", results)
        artifacts.append(out_dir / "predictions.json")
    _print_table(metrics, ckpt)
    train_run = meta.get("mlflow_run_id") or ""
    client = store.client(cfg.logger.tracking_uri)
    exp_id = runs.experiment_id(client, cfg.logger.experiment_name, cfg.paths.log_dir)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    run = client.create_run(
        exp_id,
        run_name=f"eval-{out_dir.name}",
        tags={
            "pipeline.kind": "evaluation",
            "pipeline.train_run_id": train_run,
            "pipeline.checkpoint": str(ckpt),
            "pipeline.split": str(cfg.split),
            **({"pipeline.model_uri": str(cfg.model_uri)} if cfg.get("model_uri") else {}),
            "pipeline.overrides": " ".join(overrides) or "(none)",
            "mlflow.parentRunId": train_run,
        },
    )
    run_id = run.info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path in artifacts:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    print("\n".join(f"{p.name}: {p}" for p in artifacts))
    print(f"MLflow eval run {run_id}: {runs.ui_hint(cfg.logger.tracking_uri, run_id)}")
    return metrics


def coco_results(detections: list[dict], category_ids: list[int]) -> list[dict]:
    """Detections {"image_id", "label" 1..K, "bbox" xywh, "score"[, "segmentation" RLE]} as COCO results."""
    return [
        {"image_id": d["image_id"], "category_id": category_ids[d["label"] - 1],
         **{k: d[k] for k in ("bbox", "score", "segmentation") if k in d}}
        for d in detections
    ]  # fmt: skip


def _print_table(metrics: dict[str, float], ckpt: Path) -> None:
    table = Table(title="Validation metrics", caption=str(ckpt))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4f}")
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    exit_on_user_error(evaluate, cfg)


def _data_override(arg: str) -> str:
    """`data.<key>=…` as Hydra's `++data.<key>=…` (set or add): eval.yaml's `data` is empty until the checkpoint's
    data config is merged under it, so Hydra would refuse every such key as new; `data_config` checks them.
    `+data=<group>` as `data=<group>`, which `data_config` refuses with the keys to use (Hydra's own error for
    the `+` says neither)."""
    if arg.startswith("+data="):
        return arg[1:]
    return f"++{arg}" if arg.startswith("data.") else arg


def main() -> None:
    """Console entry point `pipeline-eval`."""
    argv = sys.argv
    sys.argv = [argv[0], *map(_data_override, argv[1:])]
    try:
        _hydra_main()
    finally:
        sys.argv = argv


if __name__ == "__main__":
    main()
