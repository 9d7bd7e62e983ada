"""torchvision's Mask R-CNN as our instance net: batch sizes the backbone sees, masks pasted as torchvision does; our
backbones (timm's included) under torchvision's FPN, sized as torchvision sizes its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import Tensor

from pipeline.models.backbones import Backbone
from pipeline.models.maskrcnn import TorchvisionMaskRCNN, fpn_maskrcnn
from pipeline.ops.masks import masks_to_original

# few proposals and detections keep a Mask R-CNN fast on CPU
SMALL = {"rpn_pre_nms_top_n_train": 64, "rpn_post_nms_top_n_train": 32, "rpn_pre_nms_top_n_test": 64,
         "rpn_post_nms_top_n_test": 32, "box_batch_size_per_image": 16, "box_detections_per_img": 8}  # fmt: skip


@pytest.fixture(scope="module")
def net() -> TorchvisionMaskRCNN:
    torch.manual_seed(0)
    return TorchvisionMaskRCNN(num_classes=3, input_size=64, box_score_thresh=0.0, **SMALL)


def _record_backbone_inputs(net: TorchvisionMaskRCNN) -> tuple[list[Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[Tensor] = []
    handle = net.model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, handle


def _targets(size: int, count: int) -> list[dict[str, Tensor]]:
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, 8:40, 8:40] = 1
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks,
              "iscrowd": torch.tensor([False])}  # fmt: skip
    return [target] * count


def test_each_multi_scale_training_batch_reaches_the_backbone_at_its_own_size(net: TorchvisionMaskRCNN) -> None:
    seen, handle = _record_backbone_inputs(net)
    try:
        net.train()
        for size in (64, 96):  # input_size is 64: torchvision's resize used to scale the 96 batch back to 64
            losses = net(torch.rand(2, 3, size, size), _targets(size, 2))
            assert all(torch.isfinite(v) for v in losses.values())
            batch, targets = net.model.transform(list(torch.rand(2, 3, size, size)), _targets(size, 2))
            assert batch.image_sizes == [(size, size)] * 2
            assert torch.equal(targets[0]["boxes"], torch.tensor([[8.0, 8.0, 40.0, 40.0]]))  # boxes not rescaled
        net.eval()
        images = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            net(images)
    finally:
        handle.remove()
        net.eval()
    assert [tuple(x.shape) for x in seen] == [(2, 3, 64, 64), (2, 3, 96, 96), (1, 3, 64, 64)]
    # In eval the input (at input_size) reaches the backbone only normalised: torchvision's resize is the identity.
    mean = torch.tensor(net.model.transform.image_mean)[:, None, None]
    std = torch.tensor(net.model.transform.image_std)[:, None, None]
    torch.testing.assert_close(seen[-1][0], (images[0] - mean) / std, rtol=0, atol=1e-6)


def test_masks_at_scale_one_equal_torchvisions_own_postprocessed_masks(net: TorchvisionMaskRCNN) -> None:
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = net.eval()(images)
        reference = net.model(list(images))  # torchvision's forward: postprocess pastes into the input's size
    assert sum(len(d["boxes"]) for d in ours) > 0
    for det, ref in zip(ours, reference, strict=True):
        torch.testing.assert_close(det["boxes"], ref["boxes"])
        pasted = TorchvisionMaskRCNN.masks_to_original(det, (1.0, 1.0), 64, 64, 0.5)
        assert pasted.dtype == torch.bool and pasted.shape == (len(det["boxes"]), 64, 64)
        assert torch.equal(pasted, ref["masks"][:, 0] >= 0.5)


def test_letterboxed_masks_equal_torchvisions_postprocess_into_the_original_image() -> None:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    torch.manual_seed(2)
    # Original 128 wide x 96 high, letterboxed to 64: scale 0.5, content 64 x 48, padded at the bottom.
    boxes = torch.tensor([[3.3, 4.7, 20.2, 30.9], [40.0, 30.0, 64.0, 64.0], [10.1, 10.2, 11.0, 11.4]])
    det = {"boxes": boxes, "masks": torch.rand(3, 28, 28), "scores": torch.ones(3), "labels": torch.ones(3).long()}
    ours = TorchvisionMaskRCNN.masks_to_original(det, (0.5, 0.5), 96, 128, 0.5)
    # torchvision maps the whole 64 x 64 input onto a 128 x 128 original; the letterbox's image is its top part.
    transform = GeneralizedRCNNTransform(64, 64, [0.0] * 3, [1.0] * 3).eval()
    result = [{"boxes": boxes.clone(), "masks": det["masks"][:, None].clone()}]
    (expected,) = transform.postprocess(result, [(64, 64)], [(128, 128)])
    assert torch.equal(ours, expected["masks"][:, 0, :96] >= 0.5)
    assert ours[1, 95].any()  # the box reaching past the content is cut at the image's edge, not squeezed
    assert not torch.equal(ours, masks_to_original(det, (0.5, 0.5), 96, 128, 0.5))  # the conventions differ
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 28, 28)}
    assert TorchvisionMaskRCNN.masks_to_original(empty, (0.5, 0.5), 96, 128, 0.5).shape == (0, 96, 128)


def test_a_weights_file_that_fits_no_tensor_is_an_error_naming_the_file_and_keys(
    net: TorchvisionMaskRCNN, tmp_path: Path
) -> None:
    before = net.model.state_dict()["backbone.body.conv1.weight"].clone()
    other = tmp_path / "other_net.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"other_net\.pth") as error:
        net.load_weights(other)
    message = str(error.value)
    assert "expected keys like ['backbone.body.conv1.weight'" in message and "found ['conv1.weight'" in message
    same_names = tmp_path / "wrong_shapes.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1), "roi_heads.box_predictor.cls_score.bias": torch.zeros(1)},
               same_names)  # fmt: skip
    with pytest.raises(ValueError, match=r"wrong_shapes\.pth.*2 share a name but not the shape"):
        net.load_weights(same_names)
    wrapped = tmp_path / "lightning_like.pth"
    torch.save({"state_dict": {"net.model.backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7)}}, wrapped)
    with pytest.raises(ValueError, match=r"found \['net\.model\.backbone\.body\.conv1\.weight'\]"):
        net.load_weights(wrapped)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        net.load_weights(not_a_dict)
    assert torch.equal(net.model.state_dict()["backbone.body.conv1.weight"], before)  # nothing was loaded


def _transform_settings(model: torch.nn.Module) -> tuple:
    t = model.transform
    return t.min_size, t.max_size, t._skip_resize, t.image_mean, t.image_std, t.size_divisible


def test_a_timm_backbone_under_torchvisions_fpn_has_the_levels_anchors_and_sizes_of_torchvisions_own(
    net: TorchvisionMaskRCNN,
) -> None:
    torch.manual_seed(0)
    ours = TorchvisionMaskRCNN(num_classes=3, input_size=64, backbone={"source": "timm", "name": "convnext_atto"},
                               box_score_thresh=0.0, **SMALL)  # fmt: skip
    assert type(net.model.backbone).__name__ == "BackboneWithFPN"  # without `backbone`: the ResNet-50-FPN v2
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        levels, reference = ours.model.backbone(images), net.model.backbone(images)
    assert list(levels) == ["c2", "c3", "c4", "c5", "pool"]
    assert [v.shape for v in levels.values()] == [v.shape for v in reference.values()]  # 256 wide, strides 4..64
    mine, theirs = ours.model.rpn.anchor_generator, net.model.rpn.anchor_generator
    assert (mine.sizes, mine.aspect_ratios) == (theirs.sizes, theirs.aspect_ratios)
    assert ours.model.roi_heads.box_roi_pool.featmap_names == ours.model.roi_heads.mask_roi_pool.featmap_names == [
        "c2", "c3", "c4", "c5"
    ]  # fmt: skip
    assert _transform_settings(ours.model) == _transform_settings(net.model)  # letterbox and multi-scale as before
    with torch.no_grad():
        (det,) = ours.eval()(images[:1])
    assert det["masks"].shape == (len(det["boxes"]), 28, 28)


def test_a_backbone_without_c2_puts_the_fpn_on_c3_to_c5_with_anchors_8x_the_strides() -> None:
    torch.manual_seed(0)
    body = timm.create_model("resnet10t", features_only=True, out_indices=(2, 3, 4))
    taps = ("c3", "c4", "c5")
    backbone = Backbone(body, dict(zip(taps, body.feature_info.channels(), strict=True)),
                        dict(zip(taps, body.feature_info.reduction(), strict=True)), "resnet10t from c3")  # fmt: skip
    model = fpn_maskrcnn(backbone, 3, min_size=64, max_size=64, **SMALL)
    assert model.rpn.anchor_generator.sizes == ((64,), (128,), (256,), (512,))  # strides 8, 16, 32 and the pool's 64
    assert model.roi_heads.box_roi_pool.featmap_names == ["c3", "c4", "c5"]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 8:40] = 1
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model.train()(list(torch.rand(2, 3, 64, 64)), [target, target])
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_mask" in losses


def test_a_backbone_without_the_fpn_strides_is_an_error_naming_it_and_its_taps() -> None:
    with pytest.raises(
        ValueError, match=r"Mask R-CNN needs backbone taps c3, c4, c5.*'vgg_tiny' has .*c5 \(stride 16\)"
    ):
        TorchvisionMaskRCNN(
            num_classes=3, input_size=64, backbone={"name": "vgg_tiny", "width": 4, "dilate_last": True}
        )
