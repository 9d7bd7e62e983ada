"""FCN: input-sized logits for any image size (ours, torchvision's and timm's backbones), bilinear upsampling init,
zero-initialised skips down to FCN-2s, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.fcn import FCN, bilinear_kernel, transposed_upsampler


def _tiny(**kwargs: object) -> dict:
    """A vgg_tiny backbone config of width 8."""
    return {"name": "vgg_tiny", "width": 8, **kwargs}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


VARIANTS = ["32s", "16s", "8s", "4s", "2s"]


@pytest.mark.parametrize("upsample", ["transposed", "bilinear", "nearest"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dilate_last", [False, True])
def test_logits_have_the_input_size(dilate_last: bool, variant: str, upsample: str) -> None:
    net = FCN(5, _tiny(dilate_last=dilate_last), variant=variant, upsample=upsample).eval()
    with torch.no_grad():
        for h, w in [(33, 47), (64, 64), (97, 61), (5, 3)]:
            assert net(torch.randn(2, 3, h, w)).shape == (2, 5, h, w)


@pytest.mark.parametrize("upsample", ["transposed", "bilinear", "nearest"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_have_the_input_size_resnet(variant: str, upsample: str) -> None:
    for dilate_last in (False, True):
        net = FCN(5, {"name": "resnet18", "dilate_last": dilate_last}, variant=variant, upsample=upsample).eval()
        with torch.no_grad():
            assert net(torch.randn(1, 3, 49, 38)).shape == (1, 5, 49, 38)


@pytest.mark.parametrize(
    ("name", "variant"), [("resnet10t", "2s"), ("mobilenetv3_small_050", "2s"), ("convnext_atto", "4s")]
)
@pytest.mark.parametrize("dilate_last", [False, True])
def test_logits_have_the_input_size_timm(name: str, variant: str, dilate_last: bool) -> None:
    """The finest variant each timm family allows (ConvNeXt has no stride-2 feature), at an odd size."""
    backbone = {"source": "timm", "name": name, "dilate_last": dilate_last}
    net = FCN(5, backbone, variant=variant).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 67, 45)).shape == (1, 5, 67, 45)


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_transposed_upsampling_starts_bilinear(factor: int) -> None:
    n = 5
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([x + 2 * y, 3 - x * y])[None]  # two channels: channel i must map only to channel i
    up = transposed_upsampler(2, factor)
    with torch.no_grad():
        out = up(ramp)
    expected = F.interpolate(ramp, scale_factor=factor, mode="bilinear", align_corners=False)
    assert out.shape == expected.shape == (1, 2, n * factor, n * factor)
    # The outer factor/2 pixels differ: interpolate clamps to the edge value, the transposed conv sees zeros.
    inner = slice(factor // 2, -(factor // 2))
    torch.testing.assert_close(out[..., inner, inner], expected[..., inner, inner], atol=1e-4, rtol=1e-5)
    assert up.weight.requires_grad


def test_bilinear_kernel_is_diagonal() -> None:
    k = bilinear_kernel(3, 4)
    assert k.shape == (3, 3, 4, 4)
    off_diagonal = k.clone()
    off_diagonal[range(3), range(3)] = 0
    assert bool((off_diagonal == 0).all())
    torch.testing.assert_close(k[1, 1, :, 1], torch.tensor([0.1875, 0.5625, 0.5625, 0.1875]))


def _same_start(variants: list[str], **kwargs: object) -> dict[str, FCN]:
    """Nets of each variant sharing the 32s net's backbone and c5 scores, as the paper initialises them."""
    nets = {v: FCN(4, variant=v, **kwargs).eval() for v in variants}
    shared = {k: t for k, t in nets["32s"].state_dict().items() if k.startswith(("backbone.", "score.c5."))}
    for net in nets.values():
        net.load_state_dict(shared, strict=False)
    return nets


@pytest.mark.parametrize(
    "config",
    [
        {"name": "vgg_tiny", "width": 8},
        {"name": "resnet18", "dilate_last": True},
        {"source": "timm", "name": "resnet10t"},
    ],
    ids=["vgg_tiny", "resnet18-dilated", "timm-resnet10t"],
)
def test_variants_start_from_the_coarse_net_output(config: dict) -> None:
    """With nearest upsampling (x2 then x2 then x8 is exactly x32), 16s..2s at init predict what 32s does."""
    nets = _same_start(VARIANTS, backbone=config, upsample="nearest")
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        out = {v: net(x) for v, net in nets.items()}
    for variant in VARIANTS[1:]:
        torch.testing.assert_close(out[variant], out["32s"], msg=variant)


@pytest.mark.parametrize("upsample", ["transposed", "bilinear", "nearest"])
def test_skip_taps_contribute_nothing_at_init(upsample: str) -> None:
    net = FCN(4, _tiny(), variant="8s", upsample=upsample).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        before = net(x)
        net.backbone.register_forward_hook(
            lambda module, args, out: {**out, "c3": torch.randn_like(out["c3"]), "c4": torch.randn_like(out["c4"])}
        )
        after = net(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["8s", "2s"])
def test_every_parameter_learns(variant: str) -> None:
    """Zero-initialised skip scores still get gradients, so training moves away from the coarse net."""
    net = FCN(4, _tiny(), variant=variant)
    F.cross_entropy(net(torch.randn(2, 3, 48, 48)), torch.randint(0, 4, (2, 48, 48))).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_invalid_variant_and_upsample_list_the_choices() -> None:
    with pytest.raises(ValueError, match="'1s'.*32s, 16s, 8s, 4s, 2s"):
        FCN(3, _tiny(), variant="1s")
    with pytest.raises(ValueError, match="'bicubic'.*transposed, bilinear, nearest"):
        FCN(3, _tiny(), upsample="bicubic")


def test_a_variant_needing_a_tap_the_backbone_lacks_names_variant_backbone_and_taps() -> None:
    with pytest.raises(ValueError, match=r"FCN-2s needs backbone taps c5, c4, c3, c2, c1; backbone 'convnext_atto' has "
                       r"c2, c3, c4, c5 \(no c1\)"):  # fmt: skip
        FCN(3, {"source": "timm", "name": "convnext_atto"}, variant="2s")
