"""MaskYOLO's RoI features sit where its mask targets do: features that encode their own position, pooled along
boxes, read back the positions of the sample points (pixel-centre convention, as `ops.masks.mask_targets`)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.mask_yolo import MaskYOLO

HEIGHT, WIDTH, ROI = 640, 768, 7


def _coordinate_levels(widths: list[int], batch: int) -> list[torch.Tensor]:
    """Per stride 8/16/32 [B, C, H/s, W/s]: channel 0 = x of the cell centre in input pixels, 1 = y, 2 = image index."""
    levels = []
    for stride, channels in zip((8, 16, 32), widths, strict=True):
        h, w = HEIGHT // stride, WIDTH // stride
        level = torch.zeros(batch, channels, h, w)
        level[:, 0] = ((torch.arange(w, dtype=torch.float32) + 0.5) * stride)[None, None, :]
        level[:, 1] = ((torch.arange(h, dtype=torch.float32) + 0.5) * stride)[None, :, None]
        level[:, 2] = torch.arange(batch, dtype=torch.float32)[:, None, None]
        levels.append(level)
    return levels


def _bin_centres(box: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [S, S] and y [S, S] of the centres of a box's S x S bins, in input pixels (hand formula)."""
    x1, y1, x2, y2 = box
    steps = torch.arange(ROI, dtype=torch.float64) + 0.5
    xs, ys = x1 + steps * (x2 - x1) / ROI, y1 + steps * (y2 - y1) / ROI
    return xs[None, :].expand(ROI, ROI), ys[:, None].expand(ROI, ROI)


def test_pooled_features_read_the_coordinates_of_the_bin_centres_at_every_level() -> None:
    net = MaskYOLO(4, {"name": "vgg_tiny", "width": 4}, neck_width=16, mask_width=8, roi_size=ROI, input_size=64)
    with torch.no_grad():
        for lateral in net.mask_lateral:  # 1x1 convs passing channels 0..2 through unchanged
            lateral.weight.zero_()
            lateral.bias.zero_()
            for c in range(3):
                lateral.weight[c, c] = 1.0
    net.mask_head = nn.Identity()  # mask_logits then returns the pooled RoI features [R, C, S, S]
    # sqrt(area) 89 and 300 (FPN levels 3 and 4, strides 8 and 16); 553 and 225 (levels 5 and 4, strides 32, 16).
    # Every sample point lies at least half a cell inside its level, where bilinear reads are exact.
    boxes = [[[40.0, 30.0, 140.0, 110.0], [100.0, 60.0, 400.0, 360.0]],
             [[60.0, 50.0, 660.0, 560.0], [200.0, 100.0, 420.0, 330.0]]]  # fmt: skip
    with torch.no_grad():
        pooled = net.mask_logits(_coordinate_levels(net.widths, 2), [torch.tensor(b) for b in boxes]).double()
    assert pooled.shape == (4, 8, ROI, ROI)
    for r, (b, box) in enumerate((b, box) for b, image_boxes in enumerate(boxes) for box in image_boxes):
        xs, ys = _bin_centres(box)
        torch.testing.assert_close(pooled[r, 0], xs, rtol=0, atol=1e-4)
        torch.testing.assert_close(pooled[r, 1], ys, rtol=0, atol=1e-4)
        torch.testing.assert_close(pooled[r, 2], torch.full((ROI, ROI), float(b), dtype=torch.float64))
