"""dense_to_conv: a classifier's dense layer becomes a conv that scores every window of a larger map; load_matching
moves the weights that fit between models that share some layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models.surgery import dense_to_conv, load_matching


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_conv_equals_linear_on_the_trained_size() -> None:
    linear = nn.Linear(100 * 7 * 7, 200)
    conv = dense_to_conv(linear, in_channels=100, kernel_size=7)
    x = torch.randn(3, 100, 7, 7)
    out = conv(x)
    assert out.shape == (3, 200, 1, 1)
    torch.testing.assert_close(out.flatten(1), linear(x.flatten(1)), atol=1e-5, rtol=1e-5)


def test_conv_on_a_larger_map_scores_every_window() -> None:
    linear = nn.Linear(100 * 7 * 7, 200)
    conv = dense_to_conv(linear, in_channels=100, kernel_size=(7, 7))
    x = torch.randn(2, 100, 10, 12)
    out = conv(x)
    assert out.shape == (2, 200, 4, 6)
    for i in range(4):
        for j in range(6):
            window = x[:, :, i : i + 7, j : j + 7].flatten(1)
            torch.testing.assert_close(out[:, :, i, j], linear(window), atol=1e-5, rtol=1e-5)


def test_whole_classifier_becomes_fully_convolutional() -> None:
    """fc6 (over 8x3x5 features) -> ReLU -> fc7 as convs gives the classifier's scores at each window."""
    fc6, fc7 = nn.Linear(8 * 3 * 5, 16, bias=False), nn.Linear(16, 4)
    classifier = nn.Sequential(nn.Flatten(), fc6, nn.ReLU(), fc7)
    fully_conv = nn.Sequential(dense_to_conv(fc6, 8, (3, 5)), nn.ReLU(), dense_to_conv(fc7, 16, 1))
    x = torch.randn(2, 8, 6, 9)
    out = fully_conv(x)
    assert out.shape == (2, 4, 4, 5)
    torch.testing.assert_close(out[:, :, 2, 3], classifier(x[:, :, 2:5, 3:8]), atol=1e-5, rtol=1e-5)


def test_mismatched_sizes_are_rejected() -> None:
    linear = nn.Linear(100 * 7 * 7, 200)
    with pytest.raises(ValueError, match="4900 inputs"):
        dense_to_conv(linear, in_channels=100, kernel_size=6)
    with pytest.raises(ValueError, match="4900 inputs"):
        dense_to_conv(linear, in_channels=50, kernel_size=7)


def test_load_matching_copies_what_fits_and_names_what_stays_fresh():
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 5, 1))  # 5 classes
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1), torch.nn.Conv2d(2, 2, 1))
    fresh_before = {k: v.clone() for k, v in target.state_dict().items()}

    loaded, fresh = load_matching(target, source.state_dict())

    assert loaded == ["0.weight", "0.bias"]
    assert torch.equal(target[0].weight, source[0].weight) and torch.equal(target[0].bias, source[0].bias)
    assert fresh == {"1.weight": "[5, 4, 1, 1] in the checkpoint", "1.bias": "[5] in the checkpoint",
                     "2.weight": "not in the checkpoint", "2.bias": "not in the checkpoint"}  # fmt: skip
    for key in fresh:  # left exactly as initialised
        assert torch.equal(target.state_dict()[key], fresh_before[key])
