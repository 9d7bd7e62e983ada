"""Backbones: declared strides/channels match the features (ours, torchvision's, timm's), dilation, weights files,
errors."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config
from torchvision import models

from pipeline.models.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, build_backbone

# One small model per timm family the tests cover: ResNet, ConvNeXt (no stride-2 feature), EfficientNet (trained on
# 0.5/0.5 normalisation), MobileNetV3.
TIMM = ["resnet10t", "convnext_atto", "tf_efficientnet_lite0", "mobilenetv3_small_050"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("dilate_last", [False, True])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_features_match_declared_strides_and_channels(name: str, dilate_last: bool) -> None:
    kwargs = {"width": 8} if name == "vgg_tiny" else {}
    backbone = build_backbone(name, dilate_last=dilate_last, **kwargs).eval()
    assert backbone.strides == {"c1": 2, "c2": 4, "c3": 8, "c4": 16, "c5": 16 if dilate_last else 32}
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert list(features) == ["c1", "c2", "c3", "c4", "c5"]
    for tap, f in features.items():
        stride = backbone.strides[tap]
        assert f.shape == (1, backbone.channels[tap], 64 // stride, 96 // stride), tap


@pytest.mark.parametrize("name", ["vgg_tiny", "resnet18", "resnet50"])
def test_dilated_c5_is_the_strided_c5_computed_densely(name: str) -> None:
    """With the same weights, every other dilated c5 position equals the stride-32 net's c5."""
    strided = build_backbone(name, width=8).eval()
    dilated = build_backbone(name, width=8, dilate_last=True).eval()
    dilated.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        c5, dense = strided(x)["c5"], dilated(x)["c5"]
    assert dense.shape[-2:] == (4, 6)
    # Only float rounding differs (the convs sum in another order); random-init ResNet-50 features reach ~100.
    torch.testing.assert_close(dense[..., ::2, ::2], c5, atol=1e-5 * float(c5.abs().max()), rtol=1e-5)


def test_vgg_tiny_widths() -> None:
    assert build_backbone("vgg_tiny", width=16).channels == {"c1": 16, "c2": 32, "c3": 64, "c4": 128, "c5": 128}


def test_vgg16_keeps_torchvision_parameter_names() -> None:
    with torch.device("meta"):  # names only: skip allocating and initialising 138M parameters twice
        tv_keys = {k for k in models.vgg16().state_dict() if k.startswith("features.")}
        assert set(build_backbone("vgg16").body.state_dict()) == tv_keys


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_keep_torchvision_parameter_names(name: str) -> None:
    """The c1/c2 taps add no tensor: old checkpoints (and torchvision's classifier files) still load."""
    with torch.device("meta"):
        tv_keys = [k for k in getattr(models, name)().state_dict() if not k.startswith("fc.")]
        assert list(build_backbone(name).body.state_dict()) == tv_keys


def test_resnet_c1_is_the_stem_before_the_max_pool_and_c2_is_layer1() -> None:
    backbone = build_backbone("resnet18").eval()
    reference = models.resnet18().eval()
    reference.load_state_dict(backbone.body.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        features = backbone(x)
        stem = reference.relu(reference.bn1(reference.conv1(x)))
        layer1 = reference.layer1(reference.maxpool(stem))
    torch.testing.assert_close(features["c1"], stem, rtol=0, atol=0)
    torch.testing.assert_close(features["c2"], layer1, rtol=0, atol=0)


def test_vgg_c1_and_c2_end_the_first_two_stages() -> None:
    """vgg_tiny's stages: [conv, pool, BN, ReLU], then [conv, BN, ReLU, conv, pool, BN, ReLU]."""
    backbone = build_backbone("vgg_tiny", width=8).eval()
    layers = backbone.body.features
    assert [type(m).__name__ for m in layers[:11]] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"] + [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"
    ]  # fmt: skip
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        features = backbone(x)
        torch.testing.assert_close(features["c1"], layers[:4](x), rtol=0, atol=0)
        torch.testing.assert_close(features["c2"], layers[:11](x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "state_dict_key"])
def test_weights_file_from_a_torchvision_classifier(tmp_path: Path, wrap: bool) -> None:
    saved = models.resnet18().state_dict()  # includes the classifier's fc.*, which the backbone ignores
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": saved} if wrap else saved, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every backbone tensor is in the file: no "left at random init" warning
        backbone = build_backbone("resnet18", weights=str(path))
    params = dict(backbone.body.named_parameters())
    torch.testing.assert_close(params["conv1.weight"], saved["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(params["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(backbone.body.layer3[0].bn1.running_var, saved["layer3.0.bn1.running_var"])


def test_weights_file_round_trips_vgg_tiny(tmp_path: Path) -> None:
    source = build_backbone("vgg_tiny", width=8)
    path = tmp_path / "tiny.pt"
    torch.save(source.body.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_backbone("vgg_tiny", width=8, weights=str(path))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x)["c5"], source.eval()(x)["c5"])


def test_weights_file_without_matching_keys_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "unrelated.pt"
    torch.save({"encoder.stem.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"unrelated\.pt.*conv1\.weight.*encoder\.stem\.weight"):
        build_backbone("resnet18", weights=str(path))


def test_weights_file_with_wrong_shapes_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=r"conv1\.weight: \(64, 3, 3, 3\) in file, \(64, 3, 7, 7\) in net"):
        build_backbone("resnet18", weights=str(path))


def test_partial_weights_file_warns(tmp_path: Path) -> None:
    path = tmp_path / "stem_only.pt"
    torch.save({"conv1.weight": torch.ones(64, 3, 7, 7)}, path)
    with pytest.warns(UserWarning, match="at random init"):
        backbone = build_backbone("resnet18", weights=str(path))
    assert bool((backbone.body.conv1.weight == 1).all())


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_backbone("resnet18", weights=str(tmp_path / "nope.pt"))


def test_pretrained_and_weights_together_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        build_backbone("resnet18", pretrained=True, weights=str(tmp_path / "w.pt"))


def test_vgg_tiny_has_no_pretrained_weights() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("vgg_tiny", pretrained=True)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'.*vgg_tiny, vgg16, resnet18, resnet34, resnet50"):
        build_backbone("resnet7")


# --- timm ------------------------------------------------------------------------------------------------------


def _timm_tap_names(name: str) -> list[str]:
    """c<k> for each feature of timm's features_only `name` at stride 2**k (its default out_indices: all of them)."""
    with torch.device("meta"):
        strides = timm.create_model(name, features_only=True).feature_info.reduction()
    return [f"c{int(math.log2(stride))}" for stride in strides]


@pytest.mark.parametrize("dilate_last", [False, True], ids=["stride32", "dilated"])
@pytest.mark.parametrize("name", TIMM)
def test_timm_taps_are_timms_features(name: str, dilate_last: bool) -> None:
    """Taps, channels and strides are timm's feature_info; the features are timm's own, on timm's normalisation."""
    backbone = build_backbone(name, source="timm", dilate_last=dilate_last).eval()
    reference = timm.create_model(name, features_only=True, **({"output_stride": 16} if dilate_last else {})).eval()
    taps = _timm_tap_names(name)
    assert backbone.taps == tuple(taps) and taps[-3:] == ["c3", "c4", "c5"]
    assert backbone.channels == dict(zip(taps, reference.feature_info.channels(), strict=True))
    assert backbone.strides == dict(zip(taps, reference.feature_info.reduction(), strict=True))
    assert backbone.strides["c5"] == (16 if dilate_last else 32)

    reference.load_state_dict(backbone.body.state_dict())
    config = resolve_data_config({}, model=reference)  # the normalisation timm's transforms would apply
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    pixels = torch.rand(1, 3, 64, 96)
    ours = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = backbone(ours)
        expected = reference((pixels - mean) / std)
    assert list(features) == taps
    for tap, want in zip(taps, expected, strict=True):
        stride = backbone.strides[tap]
        assert features[tap].shape == (1, backbone.channels[tap], 64 // stride, 96 // stride), tap
        torch.testing.assert_close(features[tap], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TIMM)
def test_timm_weights_file_round_trips(tmp_path: Path, name: str) -> None:
    source = build_backbone(name, source="timm").eval()
    path = tmp_path / f"{name}.pt"
    torch.save(source.body.state_dict(), path)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor is in the file
        loaded = build_backbone(name, source="timm", weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for tap, feature in source(x).items():
            torch.testing.assert_close(loaded(x)[tap], feature, rtol=0, atol=0)


def test_a_timm_classifier_file_loads_where_timm_keeps_the_names(tmp_path: Path) -> None:
    """A ResNet's features net keeps the classifier's parameter names: timm's weights saved offline load as they are."""
    classifier = timm.create_model("resnet10t")
    path = tmp_path / "resnet10t.pth"
    torch.save(classifier.state_dict(), path)  # with the head (fc.*), which the backbone skips
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = build_backbone("resnet10t", source="timm", weights=str(path))
    torch.testing.assert_close(backbone.body.layer4[0].conv2.weight, classifier.layer4[0].conv2.weight, rtol=0, atol=0)


def test_timm_dilation_where_the_family_has_none_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"timm model 'vgg11' does not support output_stride=16 \(dilate_last=true\)"):
        build_backbone("vgg11", source="timm", dilate_last=True)


def test_timm_pretrained_weights_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # No network here: the Hub client in offline mode fails at once (online it retries for about a minute).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=r"pretrained weights for 'resnet10t' could not be fetched.*weights=<state dict"):
        build_backbone("resnet10t", source="timm", pretrained=True)


def test_timm_names_and_sources_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown timm model 'resnet7'"):
        build_backbone("resnet7", source="timm")
    with pytest.raises(ValueError, match=r"'convmixer_768_32' has no features at strides \[2, 4, 8, 16, 32\]: \[7\]"):
        build_backbone("convmixer_768_32", source="timm")
    with pytest.raises(ValueError, match="unknown backbone source 'hub'; available: builtin, timm"):
        build_backbone("resnet18", source="hub")
