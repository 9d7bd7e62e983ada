"""Backbones: declared strides/channels match the features, dilation, weights files, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torchvision import models

from pipeline.models.backbones import BACKBONES, build_backbone


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("dilate_last", [False, True])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_features_match_declared_strides_and_channels(name: str, dilate_last: bool) -> None:
    kwargs = {"width": 8} if name == "vgg_tiny" else {}
    backbone = build_backbone(name, dilate_last=dilate_last, **kwargs).eval()
    assert backbone.strides == {"c3": 8, "c4": 16, "c5": 16 if dilate_last else 32}
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert set(features) == {"c3", "c4", "c5"}
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
    assert build_backbone("vgg_tiny", width=16).channels == {"c3": 64, "c4": 128, "c5": 128}


def test_vgg16_keeps_torchvision_parameter_names() -> None:
    with torch.device("meta"):  # names only: skip allocating and initialising 138M parameters twice
        tv_keys = {k for k in models.vgg16().state_dict() if k.startswith("features.")}
        assert set(build_backbone("vgg16").body.state_dict()) == tv_keys


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
