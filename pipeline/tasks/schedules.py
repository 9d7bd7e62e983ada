"""Learning-rate schedules that know the run's length: a linear warm-up, then a cosine that ends at `eta_min` when
the epochs run out or, under `+trainer.max_time`, when the time budget does, whichever comes first.

A cosine over max_epochs alone never anneals when the time budget stops the run first; this one takes the
training time spent from Lightning's Timer (which `trainer.max_time` creates and which keeps its time in every
checkpoint, so a resumed run goes on counting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


@dataclass(frozen=True)
class RunLength:
    """What a schedule knows of its training: optimizer steps per epoch and in all (inf: no limit), the time budget
    in seconds (None: none) and `clock`, which reads the training time spent so far in seconds (a resumed run's
    earlier time included; given with the budget)."""

    steps_per_epoch: int
    total_steps: float
    max_time: float | None = None
    clock: Callable[[], float] | None = None


def run_length(trainer: pl.Trainer) -> RunLength:
    """The trainer's run length: its estimated optimizer steps and, under `max_time`, its Timer's budget and clock.

    The clock reads rank 0's Timer on every rank (a broadcast; nothing under one process): ranks whose own clocks
    differed would step with different rates and their weights would drift apart.
    """
    total = float(trainer.estimated_stepping_batches)  # also sets num_training_batches
    per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        return RunLength(per_epoch, total)

    def clock() -> float:
        return float(trainer.strategy.broadcast(timer.time_elapsed("train"), src=0))

    return RunLength(per_epoch, total, remaining + timer.time_elapsed("train"), clock)


class WarmupCosine(LRScheduler):
    """Stepped after every optimizer step. The rate of each param group for step s (0-based) at progress p:

        lr = eta_min + w(s) * (c(p) - eta_min),   w(s) = min(1, (s + 1) / W),   W = round(warmup_epochs * steps/epoch)
        c(p) = eta_min + (base_lr - eta_min) * (1 + cos(pi * p)) / 2
        p = min(1, max(s / total_steps, elapsed / max_time))   (the time term only under a budget)

    so the rate ramps up from eta_min over W steps and reaches eta_min when either the steps or the time run out.
    A resumed run whose length changed (more epochs, another budget) goes on from the rate it had reached, c0 at
    the progress p0 it now stands at: c(p) = eta_min + (c0 - eta_min) * (1 + cos(pi p)) / (1 + cos(pi p0)), as
    torch's CosineAnnealingLR continues a changed T_max; it never climbs back towards the base rate.
    """

    def __init__(
        self, optimizer: Optimizer, run: RunLength, warmup_epochs: float, eta_min: float, last_epoch: int = -1
    ) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs}: give 0 (no warm-up) or more epochs")
        if run.max_time is not None and run.clock is None:
            raise ValueError("a time budget needs the clock that reads the training time spent")
        self.run, self.warmup_epochs, self.eta_min = run, warmup_epochs, eta_min
        self.planned = self._plan()  # the length the progress is measured against, saved with the state
        self.elapsed = 0.0  # training seconds at the last step, as the clock read them
        self.progress = 0.0  # p at the last step
        self.anchor: tuple[float, list[float] | None] = (0.0, None)  # (p0, c0 per group; None: the base rates)
        self.cosine: list[float] = []  # c(p) per group at the last step
        super().__init__(optimizer, last_epoch)

    def _plan(self) -> dict[str, float | None]:
        return {"total_steps": self.run.total_steps, "max_time": self.run.max_time}

    def _progress(self, step: int) -> float:
        total = self.run.total_steps
        progress = step / total if 0 < total < math.inf else 0.0
        if self.run.max_time is not None:
            self.elapsed = float(self.run.clock())
            progress = max(progress, self.elapsed / self.run.max_time)
        return min(1.0, progress)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        start, values = self.anchor
        self.progress = max(start, self._progress(step))
        left = 1 + math.cos(math.pi * start)
        ratio = (1 + math.cos(math.pi * self.progress)) / left if left > 0 else 0.0
        self.cosine = [self.eta_min + (c0 - self.eta_min) * ratio for c0 in (values or self.base_lrs)]
        steps = round(self.warmup_epochs * self.run.steps_per_epoch)
        warm = min(1.0, (step + 1) / steps) if steps > 0 else 1.0
        return [self.eta_min + warm * (c - self.eta_min) for c in self.cosine]

    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress in primitives (a checkpoint loads weights-only); the run length is the trainer's."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "run")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue a checkpoint's schedule; when this run's length differs, from the rate the checkpoint reached."""
        super().load_state_dict(state_dict)
        if self.planned != self._plan():
            self.anchor = (self._progress(self.last_epoch), list(self.cosine))
            self.planned = self._plan()
