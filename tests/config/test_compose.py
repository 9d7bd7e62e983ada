"""Every config in conf/ composes, resolves and passes validation; typos fail with a message naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from pipeline.cli import CONF_DIR
from pipeline.config import EVAL_KEYS, PREDICT_KEYS, TRAIN_KEYS, ConfigError, validate_config
from tests.conftest import SHARED, requires_shared

COCO_TINY = SHARED / "datasets" / "coco_tiny"
# Options whose values the user must give (paths to their data).
REQUIRED = {
    "data=coco": [f"data.{split}.{key}={COCO_TINY / value}" for split in ("train", "val")
                  for key, value in (("images", "val2017"), ("annotations", "annotations/instances_val2017.json"))],
    "data=yolo": [f"data.yaml={SHARED / 'datasets' / 'coco128-seg' / 'coco128-seg.yaml'}"],
    "data=masks": [f"data.{split}.{key}=folder" for split in ("train", "val") for key in ("images", "masks")],
    "data=voc": ["data.root=VOC2012"],
    "experiment=coco128seg_instance": [],  # its class names are read from the shared yaml
}  # fmt: skip
GROUPS = ["data", "model", "trainer", "logger", "callbacks", "paths", "hydra", "experiment", "debug", "hparams_search"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/run"  # set by Hydra when a job really runs
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    return cfg


@pytest.mark.parametrize(
    "override",
    [pytest.param(f"{g}={o}", marks=[requires_shared] if f"{g}={o}" in REQUIRED else [])
     for g in GROUPS if g not in ("paths", "hydra") for o in _options(g)],
    ids=str,
)  # fmt: skip
def test_every_group_option_composes_and_validates(override: str):
    validate_config(_compose("train", [override, *REQUIRED.get(override, [])]), TRAIN_KEYS)


@pytest.mark.parametrize("model", ["fcn8s", "yolo", "instance"])
@pytest.mark.parametrize("backbone", _options("model/backbone"))
def test_one_backbone_group_serves_every_model(model: str, backbone: str):
    cfg = _compose("train", [f"model={model}", f"model/backbone={backbone}"])
    validate_config(cfg, TRAIN_KEYS)
    assert cfg.model.net.backbone.name == backbone


def test_every_conf_file_is_covered():
    assert {g for g in GROUPS} <= {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    assert _options("model") == ["fcn16s", "fcn32s", "fcn8s", "instance", "torchvision_maskrcnn", "yolo"]
    assert _options("model/backbone") == ["resnet18", "resnet34", "resnet50", "vgg16", "vgg_tiny"]


def test_eval_and_predict_configs_compose():
    validate_config(_compose("eval", ["ckpt_path=x.ckpt"]), EVAL_KEYS)
    validate_config(_compose("predict", ["ckpt_path=x.ckpt", "input=img.png"]), PREDICT_KEYS)


def test_trainer_group_maps_onto_lightning_trainer_and_run_dir_has_subseconds():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.max_epochs=3", "+trainer.gradient_clip_val=1.0"],
                      return_hydra_config=True)  # fmt: skip
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.trainer.max_epochs == 3
    assert "%f" in OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.typo=3", "Unknown config key 'model.typo'"),
        ("+trainer.max_epoch=3", "Did you mean 'max_epochs'"),
        ("+data.train_transforms.0.probability=1", "data.train_transforms[0].probability"),
        ("+learning_rate=1", "Unknown config key 'learning_rate'"),
    ],
)
def test_unknown_keys_are_rejected_with_their_name(override: str, message: str):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_config(_compose("train", [override]), TRAIN_KEYS)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.typo=3", "Unknown config key 'model.typo'"),
        ("trainer.max_epoch=3", "max_epoch"),
        ("model=nope", "fcn8s"),
        ("resume_mode=later", "choose 'continue' or 'fork'"),
    ],
)
def test_cli_typo_fails_before_any_work(
    tmp_path: Path, override: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    # The console script's own entry point, in this process (a subprocess would spend ~10 s importing torch).
    from pipeline.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pipeline-train", override])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    assert exit_.value.code not in (0, None)
    assert message in out.err + out.out
    assert "Traceback" not in out.err
    assert not (tmp_path / "data").exists()  # nothing generated, nothing trained


@pytest.mark.parametrize("model", [m for m in _options("model") if m.startswith("fcn")])
def test_every_segmentation_model_config_builds_a_task_that_keeps_the_input_size(model: str):
    import torch
    from hydra.utils import instantiate

    task = instantiate(_compose("train", [f"model={model}", "model.net.backbone.width=8"]).model)
    with torch.no_grad():
        logits = task.eval()(torch.rand(2, 3, 45, 67))
    assert logits.shape == (2, 4, 45, 67)


def test_the_detector_config_builds_a_task_that_detects_at_any_multiple_of_32():
    import torch
    from hydra.utils import instantiate

    anchors = "[" + ",".join(f"[{4 * i},{3 * i}]" for i in range(1, 10)) + "]"
    task = instantiate(
        _compose("train", ["model=yolo", "model.net.backbone.width=8", f"model.anchors={anchors}"]).model
    )
    with torch.no_grad():
        detections = task.eval().detect(torch.rand(2, 3, 64, 96))
    assert len(detections) == 2
    for det in detections:
        assert det["boxes"].shape[1:] == (4,) and len(det["boxes"]) <= 100
        assert set(det["labels"].tolist()) <= {1, 2, 3}


def test_the_instance_config_builds_a_task_whose_detections_carry_box_relative_masks():
    import torch
    from hydra.utils import instantiate

    anchors = "[" + ",".join(f"[{4 * i},{3 * i}]" for i in range(1, 10)) + "]"
    cfg = _compose("train", ["experiment=shapes_instance", "model.net.backbone.width=8", f"model.anchors={anchors}"])
    task = instantiate(cfg.model)
    assert cfg.model.monitor == "val/segm_map" and cfg.model.loss.mask == 1.0  # model=yolo's settings plus masks
    with torch.no_grad():
        detections = task.eval().detect(torch.rand(2, 3, 64, 96))
    for det in detections:
        assert det["masks"].shape == (len(det["boxes"]), 28, 28)
        assert bool(((det["masks"] >= 0) & (det["masks"] <= 1)).all())


def test_a_default_fcn8s_checkpoint_is_about_7_mb_as_the_readme_says():
    """The README's disk cost per run: weights and AdamW's two moments of the default model, as torch.save writes."""
    import io

    import torch
    from hydra.utils import instantiate

    task = instantiate(_compose("train", [])["model"])
    optimizer = torch.optim.AdamW(task.parameters())
    for p in task.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments
    buffer = io.BytesIO()
    torch.save({"state_dict": task.state_dict(), "optimizer_states": [optimizer.state_dict()]}, buffer)
    assert 6.8e6 < buffer.tell() < 7.6e6
