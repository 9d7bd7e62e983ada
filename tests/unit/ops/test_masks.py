"""Instance-mask geometry: RoIAlign mask targets along boxes, and box-relative masks pasted back into images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pipeline.ops.masks import mask_targets, paste_masks


def _polygon(points: list[float], height: int, width: int) -> torch.Tensor:
    """A polygon (x, y, x, y, ...) rasterised by pycocotools as uint8 [H, W] (pixel i covers [i, i + 1))."""
    rle = mask_utils.merge(mask_utils.frPyObjects([points], height, width))
    return torch.from_numpy(mask_utils.decode(rle).astype(np.uint8))


def _ellipse(cx: float, cy: float, rx: float, ry: float, height: int, width: int) -> torch.Tensor:
    angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    points = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1).ravel().tolist()
    return _polygon(points, height, width)


def _rectangle(x1: int, y1: int, x2: int, y2: int, height: int, width: int) -> torch.Tensor:
    return _polygon([x1, y1, x2, y1, x2, y2, x1, y2], height, width)


def _tight_box(mask: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) in pixel-edge coordinates: the last pixel i ends at i + 1."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return (a & b).sum().item() / (a | b).sum().item()


# --------------------------------------------------------------------------------------------- mask targets


def test_pycocotools_rasterises_a_rectangle_polygon_onto_its_pixels() -> None:
    # The convention every test below relies on: polygon [10, 30) x [20, 40) covers pixels 10..29 x 20..39.
    mask = _rectangle(10, 20, 30, 40, 64, 64)
    assert mask.sum() == 400 and _tight_box(mask).tolist() == [10, 20, 30, 40]


@pytest.mark.parametrize("box", [(10, 20, 66, 76), (7, 3, 67, 93), (20, 11, 90, 68)])
def test_a_rectangle_seen_through_its_own_box_is_all_ones(box: tuple[int, int, int, int]) -> None:
    # Sides >= 2 cells of 28 px: every sample point lies between pixels of the rectangle, none reads outside.
    mask = _rectangle(*box, 100, 100)
    target = mask_targets(mask[None], torch.tensor([box], dtype=torch.float32), torch.tensor([0]), 28)
    assert target.shape == (1, 28, 28) and target.dtype == torch.float32
    torch.testing.assert_close(target[0], torch.ones(28, 28))


def test_a_small_box_gives_soft_borders_and_a_solid_inside() -> None:
    # A 20-px rectangle in 28 cells: border cells sample half outside the rectangle, so they are fractional.
    mask = _rectangle(10, 20, 30, 40, 64, 64)
    target = mask_targets(mask[None], torch.tensor([[10.0, 20.0, 30.0, 40.0]]), torch.tensor([0]), 28)[0]
    torch.testing.assert_close(target[2:-2, 2:-2], torch.ones(24, 24))
    assert 0.5 < target[0, 14].item() < 1.0 and 0.5 < target[14, -1].item() < 1.0
    assert 0.9 < target.mean().item() < 1.0


def test_a_right_triangle_fills_the_lower_left_half_of_its_box() -> None:
    # Legs along the left and bottom edges of box [10, 20, 66, 76] (56 px = 2 px per cell).
    mask = _polygon([10, 20, 10, 76, 66, 76], 100, 100)
    assert _tight_box(mask).tolist() == [10, 20, 66, 76]
    target = mask_targets(mask[None], torch.tensor([[10.0, 20.0, 66.0, 76.0]]), torch.tensor([0]), 28)[0]
    direct = _polygon([0, 0, 0, 28, 28, 28], 28, 28).float()  # the same triangle rasterised at 28x28
    assert (target - direct).abs().max().item() <= 0.25 + 1e-6  # only the diagonal cells are partly covered
    rows, cols = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    assert (target[rows > cols] == 1).all()  # strictly below the diagonal: inside
    assert (target[rows < cols] == 0).all()  # strictly above: outside
    diagonal = torch.diagonal(target)
    assert ((diagonal > 0.5) & (diagonal < 1)).all()
    assert target.mean().item() == pytest.approx(0.5, abs=0.02)


def test_boxes_cut_out_the_part_of_the_mask_they_cover() -> None:
    mask = _rectangle(10, 20, 130, 76, 100, 160)  # 120 x 56 px
    boxes = torch.tensor(
        [
            [10.0, 20.0, 70.0, 76.0],  # left half of the rectangle
            [140.0, 80.0, 156.0, 96.0],  # entirely outside it
            [70.0, 20.0, 190.0, 76.0],  # right half of the rectangle and as much empty space (past the image)
        ]
    )
    targets = mask_targets(mask[None], boxes, torch.zeros(3, dtype=torch.long), 28)
    torch.testing.assert_close(targets[0], torch.ones(28, 28))
    torch.testing.assert_close(targets[1], torch.zeros(28, 28))
    # The box is 120 px wide from x=70, the rectangle ends at 130: the left 14 columns are ones, the right 14 zeros.
    torch.testing.assert_close(targets[2][:, :13], torch.ones(28, 13))
    torch.testing.assert_close(targets[2][:, 15:], torch.zeros(28, 13))


def test_index_picks_each_box_its_own_mask() -> None:
    masks = torch.stack(
        [
            _rectangle(10, 20, 66, 76, 100, 100),
            _polygon([10, 20, 10, 76, 66, 76], 100, 100),
            torch.zeros(100, 100, dtype=torch.uint8),
        ]
    )
    box = [10.0, 20.0, 66.0, 76.0]
    targets = mask_targets(masks, torch.tensor([box] * 4), torch.tensor([2, 0, 1, 0]), 28)
    assert targets.shape == (4, 28, 28)
    assert targets[0].sum() == 0 and targets[1].sum() == 784 and targets[3].sum() == 784
    assert targets[2].mean().item() == pytest.approx(0.5, abs=0.02)
    assert targets[2][27, 0] == 1 and targets[2][0, 27] == 0  # the triangle's inside corner, and its empty one


@pytest.mark.parametrize("size", [14, 28])
def test_no_boxes_give_no_targets(size: int) -> None:
    masks = torch.ones(2, 40, 40, dtype=torch.uint8)
    targets = mask_targets(masks, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), size)
    assert targets.shape == (0, size, size) and targets.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- paste back


def test_a_full_mask_pasted_along_an_integer_box_covers_exactly_the_box() -> None:
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[5.0, 8.0, 20.0, 30.0]]), 40, 32)
    expected = torch.zeros(1, 40, 32)
    expected[0, 8:30, 5:20] = 1
    assert out.shape == (1, 40, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("box", "cols", "rows"),
    [
        ((3.2, 4.7, 10.5, 12.5), (3, 10), (5, 12)),  # a right edge on a pixel centre (10.5) excludes that pixel
        ((0.5, 0.4, 1.6, 9.99), (0, 2), (0, 10)),  # a left edge on a centre (0.5) includes it
        ((6.9, 2.51, 7.6, 3.49), (7, 8), (3, 3)),  # a box between two row centres draws nothing
    ],
)
def test_a_fractional_box_covers_the_pixels_whose_centres_it_contains(
    box: tuple[float, ...], cols: tuple[int, int], rows: tuple[int, int]
) -> None:
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([box]), 16, 12)[0]
    expected = torch.zeros(16, 12)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = 1
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("box", "region"),
    [
        ((-10.0, -5.0, 15.0, 12.0), (slice(0, 12), slice(0, 15))),
        ((12.0, 14.0, 40.0, 50.0), (slice(14, 20), slice(12, 20))),
        ((-30.0, -30.0, 50.0, 50.0), (slice(0, 20), slice(0, 20))),
        ((25.0, 2.0, 40.0, 10.0), (slice(0, 0), slice(0, 0))),  # entirely right of the image
    ],
)
def test_a_box_reaching_past_the_image_is_clipped(box: tuple[float, ...], region: tuple[slice, slice]) -> None:
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([box]), 20, 20)[0]
    expected = torch.zeros(20, 20)
    expected[region] = 1
    torch.testing.assert_close(out, expected)


def test_a_box_reaching_past_the_image_keeps_its_mask_geometry() -> None:
    # Left half of the mask along a 40-px box starting at x=-20: the drawn part (x in [0, 20)) is the right half.
    left_half = torch.zeros(1, 28, 28)
    left_half[:, :, :14] = 1
    out = paste_masks(left_half, torch.tensor([[-20.0, 0.0, 20.0, 10.0]]), 10, 30)[0]
    assert (out >= 0.5).sum() == 0  # the left half lies entirely left of the image
    out = paste_masks(1 - left_half, torch.tensor([[-20.0, 0.0, 20.0, 10.0]]), 10, 30)[0]
    expected = torch.zeros(10, 30, dtype=torch.bool)
    expected[:, :20] = True
    assert torch.equal(out >= 0.5, expected)


@pytest.mark.parametrize("size", [14, 28])
def test_no_masks_paste_to_an_empty_stack(size: int) -> None:
    out = paste_masks(torch.zeros(0, size, size), torch.zeros(0, 4), 30, 40)
    assert out.shape == (0, 30, 40)


@pytest.mark.parametrize("box", [(4, 6, 24, 26), (0, 0, 8, 10), (10, 3, 66, 40), (31, 17, 33, 19)])
def test_a_left_half_mask_fills_the_left_half_of_an_even_box(box: tuple[int, int, int, int]) -> None:
    left_half = torch.zeros(1, 28, 28)
    left_half[:, :, :14] = 1
    out = paste_masks(left_half, torch.tensor([box], dtype=torch.float32), 48, 72)[0]
    x1, y1, x2, y2 = box
    expected = torch.zeros(48, 72, dtype=torch.bool)
    expected[y1:y2, x1 : (x1 + x2) // 2] = True
    assert torch.equal(out >= 0.5, expected)


def test_several_masks_are_pasted_each_along_its_own_box() -> None:
    masks = torch.stack([torch.ones(28, 28), torch.zeros(28, 28), torch.ones(28, 28)])
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 10.0, 10.0], [6.0, 2.0, 10.0, 3.0]])
    out = paste_masks(masks, boxes, 10, 10)
    assert out.shape == (3, 10, 10)
    assert out[0].sum().item() == pytest.approx(16) and out[0, :4, :4].min() > 0.999
    assert out[1].abs().sum() == 0
    assert out[2].sum().item() == pytest.approx(4) and out[2, 2, 6:10].min() > 0.999


@pytest.mark.parametrize(
    "make",
    [
        lambda: _rectangle(13, 9, 61, 70, 80, 96),
        lambda: _ellipse(48.0, 40.0, 30.0, 18.0, 80, 96),
        lambda: _ellipse(20.3, 55.7, 9.0, 14.0, 80, 96),
        lambda: _polygon([5, 5, 5, 60, 70, 60], 80, 96),
    ],
    ids=["rectangle", "ellipse", "small-ellipse", "triangle"],
)
@pytest.mark.parametrize("margin", [0.0, 3.5])
def test_target_then_paste_back_reproduces_the_mask(make, margin: float) -> None:
    mask = make()
    box = _tight_box(mask) + torch.tensor([-margin, -margin, margin, margin])
    target = mask_targets(mask[None], box[None], torch.tensor([0]), 28)
    pasted = paste_masks(target, box[None], 80, 96)[0] >= 0.5
    assert _iou(pasted, mask) > 0.95
    outside = torch.ones_like(pasted)
    x1, y1, x2, y2 = box.tolist()
    outside[max(0, math.floor(y1)) : math.ceil(y2), max(0, math.floor(x1)) : math.ceil(x2)] = False
    assert not pasted[outside].any()  # nothing is drawn outside the box
