"""Box coder round trip, target assignment, NMS and the letterbox mapping back to original pixels (boxes, maps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.transforms import apply_boxes, letterbox
from pipeline.ops.assign import assign, assign_batch, ignored
from pipeline.ops.boxes import (
    SlotGrid,
    decode,
    encode,
    flatten_levels,
    letterbox_scale,
    unletterbox,
    unletterbox_map,
)
from pipeline.ops.nms import select_detections

STRIDES = [8, 16, 32]
# [3, A=2, 2]: small anchors at stride 8, large at 32.
ANCHORS = torch.tensor([[[8.0, 8.0], [16.0, 8.0]], [[24.0, 24.0], [16.0, 40.0]], [[48.0, 48.0], [80.0, 60.0]]])


def _grid(size: int = 128) -> SlotGrid:
    return SlotGrid.build([(size // s, size // s) for s in STRIDES], STRIDES, ANCHORS)


def test_slot_grid_follows_the_flattened_head_layout() -> None:
    grid = _grid(64)  # levels 8x8, 4x4, 2x2 with 2 anchors each
    assert grid.offsets == (0, 128, 160) and len(grid.cells) == 168
    # A head output whose channel 0 holds (level, anchor, row, col) codes lands at the slot `index` computes.
    outputs = []
    for level, n in enumerate((8, 4, 2)):
        a, y, x = torch.meshgrid(torch.arange(2), torch.arange(n), torch.arange(n), indexing="ij")
        outputs.append(torch.stack([level * 1000 + a * 100 + y * 10 + x], -1).float()[None])
    flat = flatten_levels(outputs)[0, :, 0]
    level, anchor, row, col = (
        torch.tensor([1, 2, 0]),
        torch.tensor([1, 0, 1]),
        torch.tensor([3, 1, 7]),
        torch.tensor([2, 0, 5]),
    )
    slots = grid.index(level, anchor, row, col)
    assert flat[slots].tolist() == [1000 + 100 + 32, 2000 + 10, 100 + 75]
    assert grid.cells[slots].tolist() == [[2, 3], [0, 1], [5, 7]]
    assert grid.strides[slots].tolist() == [16, 32, 8]
    assert grid.anchors[slots].tolist() == [[16, 40], [48, 48], [16, 8]]


def test_encode_then_decode_is_identity() -> None:
    grid = _grid()
    generator = torch.Generator().manual_seed(0)
    slots = torch.randint(len(grid.cells), (200,), generator=generator)
    cells, strides, anchors = grid.cells[slots], grid.strides[slots], grid.anchors[slots]
    centre = (cells + torch.rand(200, 2, generator=generator) * 0.98 + 0.01) * strides[:, None]
    size = anchors * torch.exp(torch.randn(200, 2, generator=generator))
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    t = encode(boxes, cells, strides, anchors)
    full = torch.zeros(len(grid.cells), 4)
    full[slots] = t  # decode works on every slot; the random slots may repeat, the last write wins
    decoded = decode(full, grid)[slots]
    last = {int(s): i for i, s in enumerate(slots)}
    rows = torch.tensor(sorted(last.values()))
    torch.testing.assert_close(decoded[rows], boxes[rows], atol=1e-3, rtol=1e-5)


def test_decode_is_yolov3_parametrisation_and_clamps_sizes() -> None:
    grid = _grid()
    t = torch.zeros(len(grid.cells), 4)
    t[:, 2:] = 1e4  # an untrained head's wild size offsets stay finite
    boxes = decode(t, grid)
    assert torch.isfinite(boxes).all()
    slot = int(grid.index(torch.tensor([1]), torch.tensor([0]), torch.tensor([2]), torch.tensor([5]))[0])
    t = torch.zeros(len(grid.cells), 4)
    t[slot] = torch.tensor([0.0, 0.0, float(np.log(2.0)), 0.0])
    # centre = (sigmoid(0) + cell) * stride = (0.5 + (5, 2)) * 16; size = anchor (24, 24) * (2, 1)
    torch.testing.assert_close(decode(t, grid)[slot], torch.tensor([88 - 24, 40 - 12, 88 + 24, 40 + 12.0]))


def test_assignment_picks_the_cell_of_the_centre_at_the_best_shaped_anchor() -> None:
    grid = _grid()
    boxes = torch.tensor(
        [
            [10.0, 20.0, 26.0, 28.0],  # 16x8: stride 8 anchor 1, centre (18, 24) -> cell (2, 3)
            [60.0, 10.0, 76.0, 50.0],  # 16x40: stride 16 anchor 1, centre (68, 30) -> cell (4, 1)
            [0.0, 64.0, 80.0, 124.0],  # 80x60: stride 32 anchor 1, centre (40, 94) -> cell (1, 2)
            [120.0, 120.0, 128.0, 128.0],  # 8x8 at the border: stride 8 anchor 0, cell (15, 15)
        ]
    )
    slots, index = assign(boxes, grid)
    expected = grid.index(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 1, 0]), torch.tensor([3, 1, 2, 15]),
                          torch.tensor([2, 4, 1, 15]))  # fmt: skip
    assert dict(zip(index.tolist(), slots.tolist(), strict=True)) == dict(enumerate(expected.tolist()))


def test_two_boxes_in_one_slot_keep_the_first_and_empty_images_assign_nothing() -> None:
    grid = _grid()
    boxes = torch.tensor([[10.0, 10.0, 18.0, 18.0], [11.0, 11.0, 19.0, 19.0], [50.0, 50.0, 58.0, 58.0]])
    slots, index = assign(boxes, grid)
    assert sorted(index.tolist()) == [0, 2] and len(slots) == 2
    slots, index = assign(torch.zeros(0, 4), grid)
    assert slots.numel() == index.numel() == 0


def test_ignore_marks_slots_overlapping_a_ground_truth() -> None:
    preds = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12], [20, 20, 30, 30]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    assert ignored(preds, gt, 0.7).tolist() == [True, True, False]
    assert ignored(preds, torch.zeros(0, 4), 0.7).tolist() == [False, False, False]


def test_nms_keeps_the_best_of_overlapping_boxes_per_class() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]])
    objectness = torch.tensor([3.0, 1.0, 2.0, 2.0])
    # slot 0 and 1 (same class 0) overlap: the weaker goes; slot 2 is class 1, so it stays despite the overlap.
    classes = torch.tensor([[5.0, -5.0], [5.0, -5.0], [-5.0, 5.0], [5.0, -5.0]])
    kept, scores, labels = select_detections(boxes, objectness, classes, score_threshold=0.05, iou_threshold=0.5)
    assert kept.tolist() == [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    assert labels.tolist() == [0, 1, 0]
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    kept, scores, labels = select_detections(boxes, objectness, classes, score_threshold=0.05, max_detections=1)
    assert kept.tolist() == [[0, 0, 10, 10]] and labels.tolist() == [0]
    kept, _, _ = select_detections(boxes, objectness - 20, classes, score_threshold=0.05)
    assert len(kept) == 0


@pytest.mark.parametrize(("height", "width", "size"), [(100, 150, 96), (333, 77, 128), (64, 64, 160), (97, 211, 64)])
def test_letterboxed_boxes_map_back_to_original_pixels(height: int, width: int, size: int) -> None:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    boxes = np.array([[3.0, 5.0, width * 0.5, height * 0.75], [width * 0.25, 0.0, float(width), float(height)]])
    out = apply_boxes(letterbox(size, 0, boxes=True), image, boxes, labels=np.array([1, 2]), iscrowd=np.array([0, 0]))
    assert out["image"].shape == (size, size, 3)
    scale = letterbox_scale(height, width, size)
    back = unletterbox(torch.from_numpy(out["boxes"]).double(), scale, height, width)
    torch.testing.assert_close(back, torch.from_numpy(boxes), atol=1e-3, rtol=1e-5)
    # Boxes reaching past the image (a prediction into the padding) are clipped to it.
    outside = unletterbox(torch.tensor([[-4.0, -4.0, size + 10.0, size + 10.0]]), scale, height, width)
    assert outside.tolist() == [[0, 0, width, height]]


@pytest.mark.parametrize(("height", "width"), [(30, 50), (64, 20), (48, 48)])
def test_unletterbox_map_undoes_the_letterbox_albumentations_applies(height: int, width: int):
    # A label map with vertical and horizontal bands (10 px wide), letterboxed to 64 by the pipeline's own
    # albumentations transform; its one-hot maps mapped back must give the original labels away from band edges.
    ys, xs = np.mgrid[:height, :width]
    labels = ((xs // 10) % 2 + 2 * ((ys // 10) % 2)).astype(np.uint8)
    boxed = letterbox(64, 255)(image=np.zeros((height, width, 3), np.uint8), mask=labels)["mask"]
    one_hot = F.one_hot(torch.from_numpy(boxed).long().clamp(max=3), 4).permute(2, 0, 1).float()
    one_hot[:, torch.from_numpy(boxed == 255)] = 0  # the padding belongs to no class

    back = unletterbox_map(one_hot, height, width)

    assert back.shape == (4, height, width)
    far = (np.abs((xs % 10) - 4.5) < 3) & (np.abs((ys % 10) - 4.5) < 3)  # pixels >= 2 px from a band edge
    assert np.array_equal(back.argmax(0).numpy()[far], labels[far])
    assert back.sum(0).min() > 0.99  # no padding read into the image


def test_paired_box_iou_equals_the_diagonal_of_torchvisions_box_iou_bit_for_bit() -> None:
    from torchvision.ops import box_iou

    from pipeline.ops.boxes import paired_box_iou

    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=generator) * 100
    a = torch.cat([xy, xy + torch.rand(200, 2, generator=generator) * 50], 1)
    b = a + (torch.rand(200, 4, generator=generator) - 0.5) * 40  # overlapping, disjoint and inverted pairs
    b[:5] = a[:5]  # identical: IoU 1
    b[5:10] = a[5:10] + 1000  # far apart: IoU 0
    ours = paired_box_iou(a, b)
    assert torch.equal(ours, box_iou(a, b).diagonal())
    assert ours[:5].tolist() == [1.0] * 5 and ours[5:10].tolist() == [0.0] * 5
    assert paired_box_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)


def test_batch_assignment_equals_assigning_each_image_on_its_own() -> None:
    grid = _grid()
    generator = torch.Generator().manual_seed(0)
    per_image = []
    for count in (5, 0, 9, 3):  # an image without boxes among them; centres crowd into few cells
        xy = torch.rand(count, 2, generator=generator) * 100
        wh = 4 + torch.rand(count, 2, generator=generator) * 60
        per_image.append(torch.cat([xy, xy + wh], 1))
    per_image[2] = torch.cat([per_image[2], per_image[2][:3] + 0.5])  # boxes sharing a slot with an earlier one
    boxes = torch.cat(per_image)
    image = torch.repeat_interleave(torch.arange(len(per_image)), torch.tensor([len(b) for b in per_image]))
    found = assign_batch(boxes, image, grid, anchor_iou=0.3)
    start = 0
    for b, gt in enumerate(per_image):
        slots, index = assign(gt, grid, anchor_iou=0.3)
        mine = found.image == b
        assert found.slot[mine].tolist() == slots.tolist()
        assert (found.box[mine] - start).tolist() == index.tolist()
        start += len(gt)
    assert found.image.tolist() == sorted(found.image.tolist())
