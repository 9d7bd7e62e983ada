"""`pipeline-eval ckpt_path=…`: recompute validation metrics of a checkpoint, print them, log an eval run.

Detection and instance checkpoints also write `predictions.json`: every detection in COCO results format (with
its mask as RLE for instances), with the image and category ids of the evaluated annotation file, so
pycocotools (or any COCO tool) can score it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from rich.console import Console
from rich.table import Table

from pipeline import tracking
from pipeline.checkpoint import check_model, load_checkpoint, resolve_checkpoint
from pipeline.cli import CONF_DIR, exit_on_user_error
from pipeline.config import EVAL_KEYS, validate_config


def load_task(ckpt: Path) -> tuple[pl.LightningModule, DictConfig, dict]:
    """The trained LightningModule (weights-only load), the training config and the checkpoint's metadata.

    A file that is not a readable, current pipeline-train checkpoint, or whose weights do not fit the model its own
    config builds with this code, is refused with a CheckpointError naming the file and the difference.
    """
    state = load_checkpoint(ckpt)
    meta = state["pipeline"]
    train_cfg = OmegaConf.create(meta["config"])
    try:
        task = get_class(train_cfg.model._target_).load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    except RuntimeError as err:
        if "Error(s) in loading state_dict" not in str(err):
            raise
        check_model(ckpt, state, instantiate(train_cfg.model), train_cfg)  # says which keys and shapes differ
        raise
    return task.eval(), train_cfg, meta


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate the checkpoint on its (or an overridden) validation set; write metrics.json, log to MLflow."""
    validate_config(cfg, EVAL_KEYS)
    tracking.check_reachable(cfg.logger.tracking_uri)
    ckpt = resolve_checkpoint(cfg.ckpt_path)
    task, train_cfg, meta = load_task(ckpt)
    data_cfg = OmegaConf.merge(train_cfg.data, cfg.data)
    datamodule = instantiate(data_cfg, targets=task.TARGETS)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[RichProgressBar()], max_epochs=1)
    (results,) = trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in results.items()}
    if not trainer.is_global_zero:
        return metrics

    out_dir = Path(cfg.paths.output_dir)
    tracking.write_json(out_dir / "metrics.json", {"checkpoint": str(ckpt), "metrics": metrics})
    artifacts = [out_dir / "metrics.json"]
    if task.TARGETS != "semantic":
        results = coco_results(task.results, datamodule.category_ids)
        tracking.write_json(out_dir / "predictions.json", results)
        artifacts.append(out_dir / "predictions.json")
    _print_table(metrics, ckpt)
    train_run = meta.get("mlflow_run_id") or ""
    client = MlflowClient(cfg.logger.tracking_uri)
    exp_id = tracking.experiment_id(client, cfg.logger.experiment_name, cfg.paths.log_dir)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    run = client.create_run(
        exp_id,
        run_name=f"eval-{out_dir.name}",
        tags={
            "pipeline.kind": "evaluation",
            "pipeline.train_run_id": train_run,
            "pipeline.checkpoint": str(ckpt),
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
    print(f"MLflow eval run {run_id}: {tracking.ui_hint(cfg.logger.tracking_uri, run_id)}")
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


def main() -> None:
    """Console entry point `pipeline-eval`."""
    _hydra_main()


if __name__ == "__main__":
    main()
