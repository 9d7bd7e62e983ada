"""Every config in conf/ composes, resolves and passes validation; typos fail with a message naming the key; shared
values live in one place; --help lists the groups. (Every debug config training on every data config:
tests/integration/config/test_debug_configs_train.py.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from pipeline.cli import CONF_DIR
from pipeline.errors import ConfigError
from pipeline.training.config import EVAL_KEYS, PREDICT_KEYS, TRAIN_KEYS, validate_config
from tests.helpers import SHARED, requires_shared, run_main
from tests.helpers import conf_options as _options

COCO_TINY = SHARED / "datasets" / "coco_tiny"
# Options whose values the user must give (paths to their data).
REQUIRED = {
    "data=coco": [f"data.{split}.{key}={COCO_TINY / value}" for split in ("train", "val")
                  for key, value in (("images", "val2017"), ("annotations", "annotations/instances_val2017.json"))],
    "data=yolo": [f"data.yaml={SHARED / 'datasets' / 'coco128-seg' / 'coco128-seg.yaml'}"],
    "data=masks": [f"data.{split}.{key}=folder" for split in ("train", "val") for key in ("images", "masks")],
    "data=voc": ["data.root=VOC2012"],
    "data=coco128seg": [],  # its class names are read from the shared yaml
    "experiment=coco128seg_instance": [],
}  # fmt: skip
GROUPS = ["data", "model", "trainer", "logger", "callbacks", "paths", "hydra", "experiment", "debug", "hparams_search"]
NESTED = ["model/backbone", "model/optim", "model/sched"]


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


@pytest.mark.parametrize("model", ["fcn8s", "yolo", "instance", "torchvision_maskrcnn"])
@pytest.mark.parametrize("backbone", _options("model/backbone"))
def test_one_backbone_group_serves_every_model(model: str, backbone: str):
    cfg = _compose("train", [f"model={model}", f"model/backbone={backbone}"])
    validate_config(cfg, TRAIN_KEYS)
    assert _tree(cfg.model.net.backbone) == _tree(
        OmegaConf.load(Path(CONF_DIR) / "model" / "backbone" / f"{backbone}.yaml")
    )


def test_torchvision_maskrcnn_has_no_backbone_unless_one_is_chosen():
    """Without model/backbone the net is torchvision's ResNet-50-FPN v2 (no `backbone` argument)."""
    assert "backbone" not in _compose("train", ["model=torchvision_maskrcnn"]).model.net


def test_every_conf_file_is_covered():
    assert {g for g in GROUPS} <= {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    assert _options("model") == [
        "fcn16s",
        "fcn2s",
        "fcn32s",
        "fcn4s",
        "fcn8s",
        "instance",
        "torchvision_maskrcnn",
        "yolo",
    ]
    assert _options("model/backbone") == ["resnet18", "resnet34", "resnet50", "timm", "vgg16", "vgg_tiny"]
    assert _options("model/optim") == ["adamw", "sgd"] and _options("model/sched") == ["cosine", "warmup_cosine"]
    assert _options("callbacks") == ["default", "ema"]
    assert _options("data") == ["bccd", "coco", "coco128seg", "isbi", "masks", "shapes", "voc", "yolo"]


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
    from pipeline.cli.train import main

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


def _tree(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("model", ["fcn16s", "fcn32s", "fcn4s", "fcn2s"])
def test_the_fcn_variants_are_fcn8s_with_another_variant(model: str):
    expected = _tree(_compose("train", ["model=fcn8s"]).model)
    expected["net"]["variant"] = model.removeprefix("fcn")
    assert _tree(_compose("train", [f"model={model}"]).model) == expected


@pytest.mark.parametrize("model", ["fcn8s", "yolo", "instance", "torchvision_maskrcnn"])
@pytest.mark.parametrize("optim", _options("model/optim"))
def test_every_optimizer_option_serves_every_model_which_keeps_its_own_weight_decay(model: str, optim: str):
    import torch
    from hydra.utils import instantiate

    cfg = _compose("train", [f"model={model}", f"model/optim={optim}"])
    validate_config(cfg, TRAIN_KEYS)
    optimizer = instantiate(cfg.model.optimizer, params=[torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.model.scheduler, optimizer=optimizer)
    assert type(optimizer) is {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optim]
    assert optimizer.defaults["weight_decay"] == (5e-4 if model in ("yolo", "instance") else 1e-4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler.T_max == 60  # the default experiment's epochs


def test_each_model_starts_from_its_own_optimizer_and_the_readme_override_paths_still_apply():
    assert _compose("train", ["model=torchvision_maskrcnn"]).model.optimizer._target_ == "torch.optim.SGD"
    cfg = _compose("train", ["model=yolo", "model.optimizer.lr=1e-3", "model.scheduler.eta_min=0"])
    assert (cfg.model.optimizer._target_, cfg.model.optimizer.lr, cfg.model.scheduler.eta_min) == (
        "torch.optim.AdamW", 1e-3, 0)  # fmt: skip


@pytest.mark.parametrize(
    "experiment",
    ["shapes_yolo", "shapes_instance", "bccd_yolo", pytest.param("coco128seg_instance", marks=requires_shared)],
)
def test_averaged_weights_come_from_callbacks_ema(experiment: str):
    callbacks = _tree(_compose("train", [f"experiment={experiment}"]).callbacks)
    ema = callbacks.pop("ema")
    assert ema == {"_target_": "pytorch_lightning.callbacks.EMAWeightAveraging", "decay": 0.99}
    assert callbacks == _tree(_compose("train", []).callbacks)  # callbacks=default plus the average


def _marks(*overrides: str) -> list:
    return [requires_shared] if any(o in REQUIRED for o in overrides) else []


@pytest.mark.parametrize("data", [pytest.param(d, marks=_marks(f"data={d}")) for d in _options("data")])
@pytest.mark.parametrize("debug", _options("debug"))
def test_every_debug_config_composes_with_every_data_config(debug: str, data: str):
    cfg = _compose("train", [f"debug={debug}", f"data={data}", *REQUIRED.get(f"data={data}", [])])
    validate_config(cfg, TRAIN_KEYS)
    assert cfg.trainer.limit_train_batches <= 2 and cfg.data.num_workers == 0
    assert ("spec" in cfg.data) == (data == "shapes")  # the tiny generated dataset only where there is one
    if data == "shapes":
        assert (cfg.data.spec.num_train, cfg.data.spec.num_val, cfg.data.spec.image_size) == (16, 8, 64)


@pytest.mark.parametrize(
    ("experiment", "data"),
    [pytest.param(e, d, marks=_marks(f"experiment={e}", f"data={d}")) for e in _options("experiment")
     for d in _options("data")],
)  # fmt: skip
def test_every_experiment_composes_with_every_data_config(experiment: str, data: str):
    """An experiment is a recipe (model, epochs, callbacks): the dataset it names is only its default."""
    cfg = _compose("train", [f"experiment={experiment}", f"data={data}", *REQUIRED.get(f"data={data}", [])])
    validate_config(cfg, TRAIN_KEYS)
    default = _compose("train", [f"data={data}", *REQUIRED.get(f"data={data}", [])]).data
    assert _tree(cfg.data) == _tree(default)  # the data config as chosen, untouched by the experiment


def _help(entry: str, tmp_path: Path) -> str:
    proc = run_main(entry, "--help", cwd=tmp_path, check=True)
    return proc.stdout


def test_help_lists_every_group_with_its_options_and_examples_that_compose(tmp_path: Path):
    text = _help("train", tmp_path)
    for group in [g for g in GROUPS if g != "hydra"] + NESTED:
        assert f"{group}: {', '.join(_options(group))}\n" in text
    assert "hydra/launcher" not in text  # Hydra's own groups: --hydra-help
    examples = [re.split(r"\s{2,}", line.strip())[0] for line in text.splitlines() if re.match(r"\s+pipeline-", line)]
    assert len(examples) >= 5
    for example in examples:
        words = example.split()[1:]
        if "-m" not in words:  # a sweep's comma lists are Hydra's sweep syntax, not a single composition
            validate_config(_compose("train", [re.sub(r"<[^>]+>", "x", w) for w in words]), TRAIN_KEYS)
    assert not (tmp_path / "outputs").exists()  # help does no work


def test_check_data_help_names_its_own_command(tmp_path: Path):
    text = _help("check_data", tmp_path)
    assert text.startswith("pipeline-check-data: ") and f"data: {', '.join(_options('data'))}\n" in text
