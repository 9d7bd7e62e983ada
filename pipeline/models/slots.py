"""The anchor slots of our detector, in one place: the anchors, the slot grid of an input size, decoding to boxes
and scores, and detections after NMS. The net, `pipeline-predict` (through the net) and `pipeline-export` all
decode here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.ops.boxes import SlotGrid, decode, flatten_levels
from pipeline.ops.nms import select_detections


class Slots:
    """Anchors [3, A, 2] (w, h pixels at `input_size`, one row per stride 8/16/32; None until given or fitted) and
    the slot grids of the input sizes seen, built once per size, anchors and device.

    A plain attribute of the net, not a module or a buffer: weight averaging (EMA) must not average the anchors,
    and checkpoints carry them as the task's `anchors` hyper-parameter.
    """

    def __init__(self, strides: list[int], num_anchors: int, input_size: int) -> None:
        self.strides, self.num_anchors, self.input_size = list(strides), num_anchors, input_size
        self.anchors: Tensor | None = None
        self._grids: dict[tuple, tuple[Tensor, SlotGrid]] = {}

    def set_anchors(self, anchors: list[list[float]]) -> None:
        """[3A] [w, h] pairs -> [3, A, 2] sorted by area: the smallest go to stride 8, the largest to stride 32."""
        given = torch.tensor(anchors, dtype=torch.float32)
        count = 3 * self.num_anchors
        if given.shape != (count, 2) or not bool((given > 0).all()):
            raise ValueError(f"model.anchors needs {count} positive [w, h] pairs, got {anchors}")
        self.anchors = given[given.prod(1).argsort()].reshape(3, -1, 2)

    def level_anchors(self, size: tuple[int, int]) -> Tensor:
        """Anchors [3, A, 2] (w, h) in pixels of an input of `size` (H, W): widths scale with W, heights with H."""
        if self.anchors is None:
            raise RuntimeError("the detector has no anchors yet: set model.anchors or fit it (k-means runs then)")
        height, width = size
        scale = torch.tensor([width, height], dtype=torch.float32) / self.input_size
        return self.anchors * scale

    def grid(self, outputs: list[Tensor], size: tuple[int, int]) -> SlotGrid:
        """The slots of per stride outputs [B, A, H_s, W_s, 5 + K] for an input of `size` (H, W)."""
        shapes = tuple(tuple(o.shape[2:4]) for o in outputs)
        device = outputs[0].device
        # Grids made under inference_mode hold inference tensors, which a later training step cannot save for backward.
        key = (shapes, size, device, torch.is_inference_mode_enabled())
        cached = self._grids.get(key)
        if cached is None or cached[0] is not self.anchors:  # built once per size, anchors and device
            if len(self._grids) >= 32:  # predict at many sizes: keep the cache bounded
                self._grids.clear()
            anchors = self.level_anchors(size).to(device)
            cached = self._grids[key] = (self.anchors, SlotGrid.build(list(shapes), self.strides, anchors))
        return cached[1]

    def traceable_grid(self, outputs: list[Tensor], images: Tensor) -> SlotGrid:
        """As `grid`, built from the outputs' shapes with tensor ops, for an export: `SlotGrid.build` reads them as
        Python ints, which an export would fix at the example's size. Only the fields `decode` reads are filled."""
        height, width = images.shape[-2:]
        one = images.new_ones(())
        scale = torch.stack([one * width, one * height]) / self.input_size
        anchors = self.anchors.to(images.device)
        cells, strides, slot_anchors = [], [], []
        for level, (out, stride) in enumerate(zip(outputs, self.strides, strict=True)):
            count, rows, cols = out.shape[1:4]
            ys, xs = torch.meshgrid(torch.arange(rows, device=out.device), torch.arange(cols, device=out.device),
                                    indexing="ij")  # fmt: skip
            cell = torch.stack([xs, ys], dim=-1).reshape(1, -1, 2).expand(count, -1, -1).reshape(-1, 2)
            cells.append(cell)
            strides.append(torch.full_like(cell[:, 0], stride))
            level_anchors = anchors[level] * scale  # [A, 2] at this input's size
            slot_anchors.append(level_anchors[:, None, :].expand(-1, rows * cols, -1).reshape(-1, 2))
        return SlotGrid(
            cells=torch.cat(cells).float(),
            strides=torch.cat(strides).float(),
            anchors=torch.cat(slot_anchors),
            offsets=(),
            shapes=(),
            level_strides=tuple(self.strides),
            level_anchors=anchors,
        )


def boxes_and_scores(outputs: list[Tensor], grid: SlotGrid) -> tuple[Tensor, Tensor]:
    """Per stride outputs [B, A, H_s, W_s, 5 + K] -> every slot's box [B, P, 4] (x1, y1, x2, y2 input pixels) and
    scores [B, P, K] (objectness probability x class probability): what an export outputs, before NMS."""
    pred = flatten_levels(outputs)
    return decode(pred[..., :4], grid), torch.sigmoid(pred[..., 4:5]) * torch.sigmoid(pred[..., 5:])


def detections(pred: Tensor, grid: SlotGrid, postprocess: dict) -> list[dict[str, Tensor]]:
    """Slot predictions [B, P, 5 + K] -> per image {"boxes" [D, 4], "scores" [D], "labels" [D] 1..K} after the score
    threshold and class-aware NMS of `ops.nms.select_detections` (its keyword arguments in `postprocess`)."""
    boxes = decode(pred[..., :4], grid)
    found = []
    for b in range(len(pred)):
        kept, scores, labels = select_detections(boxes[b], pred[b, :, 4], pred[b, :, 5:], **postprocess)
        found.append({"boxes": kept, "scores": scores, "labels": labels + 1})
    return found
