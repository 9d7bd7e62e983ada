"""Network surgery: a classifier's dense layers recast as the equivalent convolutions (the FCN paper), and
weights moved between models that share only some layers (fine-tuning across heads)."""

from __future__ import annotations

import torch
from torch import nn


def dense_to_conv(linear: nn.Linear, in_channels: int, kernel_size: int | tuple[int, int]) -> nn.Conv2d:
    """The valid kh x kw conv [B, C, H, W] -> [B, out, H - kh + 1, W - kw + 1] equal to `linear` on each window.

    `linear` must act on flattened [C, kh, kw] features (`torch.flatten(x, 1)`), e.g. VGG's fc6 on 512x7x7.
    The weights are copied, so a trained classifier scores every window of a larger map without retraining;
    later dense layers become 1x1 convs (kernel_size=1, in_channels = the previous layer's out_features).
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if in_channels < 1 or kh < 1 or kw < 1:
        raise ValueError(f"in_channels and kernel_size must be positive, got {in_channels} and {(kh, kw)}")
    if linear.in_features != in_channels * kh * kw:
        raise ValueError(
            f"a Linear with {linear.in_features} inputs cannot read [{in_channels}, {kh}, {kw}] features "
            f"({in_channels * kh * kw} values); pass the in_channels and kernel_size it was trained on"
        )
    conv = nn.Conv2d(
        in_channels,
        linear.out_features,
        (kh, kw),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        # flatten(1) orders a [C, kh, kw] window channel-major, the same order reshape undoes here.
        conv.weight.copy_(linear.weight.reshape(linear.out_features, in_channels, kh, kw))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def load_matching(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """Copy into `module` every tensor of `state_dict` whose name and shape it has (fine-tuning across heads).

    Returns the names loaded and, for each of the module's tensors left as initialised, why: not in the
    checkpoint, or the checkpoint's shape (another number of classes, another head).
    """
    own = module.state_dict()
    loaded = [k for k, v in state_dict.items() if k in own and own[k].shape == v.shape]
    fresh = {
        k: "not in the checkpoint" if k not in state_dict else f"{list(state_dict[k].shape)} in the checkpoint"
        for k in own
        if k not in loaded
    }
    module.load_state_dict({k: state_dict[k] for k in loaded}, strict=False)
    return loaded, fresh
