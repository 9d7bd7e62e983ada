"""The warm-up cosine: warm-up rates as computed by hand, torch's cosine without a budget, eta_min exactly when the
time budget is spent, a checkpointed state that continues (and reschedules a longer run without climbing back),
and a real Trainer run under a 3-second max_time that ends annealed."""

from __future__ import annotations

import io
import math
import time
from itertools import pairwise

import pytest
import pytorch_lightning as pl
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from pipeline.tasks.common import build_optimizers
from pipeline.tasks.schedules import RunLength, WarmupCosine

BASE, ETA_MIN = 0.1, 0.001


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE)


def _rates(scheduler: WarmupCosine, steps: int) -> list[float]:
    """The rate of the next `steps` optimizer steps (the current one first)."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_warm_up_rates_are_the_formula_computed_by_hand() -> None:
    # 4 steps an epoch, 1.5 epochs of warm-up: 6 steps, ramping from eta_min towards the cosine of 40 steps
    scheduler = WarmupCosine(_optimizer(), RunLength(steps_per_epoch=4, total_steps=40), warmup_epochs=1.5,
                             eta_min=ETA_MIN)  # fmt: skip
    rates = _rates(scheduler, 8)
    assert rates[0] == pytest.approx(0.0175)  # 0.001 + 1/6 * (0.1 - 0.001)
    assert rates[1] == pytest.approx(0.001 + 2 / 6 * (0.001 + 0.099 * (1 + math.cos(math.pi / 40)) / 2 - 0.001))
    for s, rate in enumerate(rates):
        cosine = ETA_MIN + (BASE - ETA_MIN) * (1 + math.cos(math.pi * s / 40)) / 2
        assert rate == pytest.approx(ETA_MIN + min(1, (s + 1) / 6) * (cosine - ETA_MIN), rel=1e-12)


def test_without_a_budget_it_is_torchs_cosine_over_the_steps() -> None:
    ours = WarmupCosine(_optimizer(), RunLength(steps_per_epoch=5, total_steps=20), warmup_epochs=0, eta_min=ETA_MIN)
    reference = CosineAnnealingLR(_optimizer(), T_max=20, eta_min=ETA_MIN)
    rates, expected = _rates(ours, 24), []
    for _ in range(24):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert rates[:21] == pytest.approx(expected[:21], rel=1e-9)  # torch's climbs again after T_max, ours stays
    assert rates[20:] == [ETA_MIN] * 4


def test_with_a_budget_the_rate_reaches_eta_min_when_the_time_is_spent_and_stays() -> None:
    now = [0.0]
    run = RunLength(steps_per_epoch=10, total_steps=1000, max_time=8.0, clock=lambda: now[0])
    scheduler = WarmupCosine(_optimizer(), run, warmup_epochs=0, eta_min=ETA_MIN)
    for elapsed, progress in [(2.0, 0.25), (4.0, 0.5), (7.9, 7.9 / 8)]:
        now[0] = elapsed
        scheduler.optimizer.step()
        scheduler.step()
        expected = ETA_MIN + (BASE - ETA_MIN) * (1 + math.cos(math.pi * progress)) / 2
        assert scheduler.get_last_lr() == [pytest.approx(expected, rel=1e-12)]
    for elapsed in (8.0, 9.0, 30.0):  # the budget is spent: eta_min exactly, from then on
        now[0] = elapsed
        scheduler.optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr() == [ETA_MIN] and scheduler.optimizer.param_groups[0]["lr"] == ETA_MIN
    assert scheduler.last_epoch == 6 and scheduler.elapsed == 30.0  # the steps alone were at 0.6%


def _round_trip(scheduler: WarmupCosine, run: RunLength) -> WarmupCosine:
    """A new optimizer and schedule for `run` restored from `scheduler`'s state, as a checkpoint restores them:
    saved with torch.save and loaded weights-only."""
    buffer = io.BytesIO()
    torch.save({"optimizer": scheduler.optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    optimizer = _optimizer()
    restored = WarmupCosine(optimizer, run, warmup_epochs=1, eta_min=ETA_MIN)
    optimizer.load_state_dict(state["optimizer"])
    restored.load_state_dict(state["scheduler"])
    return restored


def test_a_restored_state_continues_the_same_rates() -> None:
    now = [0.0]
    run = RunLength(steps_per_epoch=4, total_steps=100, max_time=50.0, clock=lambda: now[0])
    first = WarmupCosine(_optimizer(), run, warmup_epochs=1, eta_min=ETA_MIN)
    for _ in range(7):
        now[0] += 1.5
        first.optimizer.step()
        first.step()
    second = _round_trip(first, run)
    assert second.elapsed == first.elapsed == 10.5
    for _ in range(30):
        now[0] += 1.5
        assert second.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
        for scheduler in (first, second):
            scheduler.optimizer.step()
            scheduler.step()
    assert second.get_last_lr() == first.get_last_lr() == [ETA_MIN]  # 55 s of a 50 s budget


def test_a_longer_run_goes_on_from_the_rate_it_reached_without_climbing_back() -> None:
    first = WarmupCosine(_optimizer(), RunLength(4, total_steps=10), warmup_epochs=0, eta_min=ETA_MIN)
    _rates(first, 5)
    reached = first.optimizer.param_groups[0]["lr"]  # halfway down the 10-step cosine
    assert reached == pytest.approx(ETA_MIN + (BASE - ETA_MIN) / 2)
    longer = _round_trip(first, RunLength(4, total_steps=20))  # max_epochs doubled
    rates = _rates(longer, 16)
    # torch's chainable form: the distance to eta_min shrinks as the 20-step cosine's does from step 5 on
    expected = [ETA_MIN + (reached - ETA_MIN) * (1 + math.cos(math.pi * s / 20)) / (1 + math.cos(math.pi * 5 / 20))
                for s in range(5, 21)]  # fmt: skip
    assert rates == pytest.approx(expected, rel=1e-12) and rates[0] == reached
    assert all(b <= a for a, b in zip(rates, rates[1:], strict=False)) and rates[-1] == pytest.approx(ETA_MIN)


class _Tiny(pl.LightningModule):
    """A linear model whose steps take ~50 ms, configured as the tasks are (build_optimizers)."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({
            "optimizer": {"_target_": "torch.optim.SGD", "lr": BASE},
            "scheduler": {"_target_": "pipeline.tasks.schedules.WarmupCosine", "warmup_epochs": 1, "eta_min": ETA_MIN},
            "scheduler_interval": "epoch",  # a WarmupCosine steps per optimizer step all the same
        })  # fmt: skip
        self.layer = torch.nn.Linear(2, 1)
        self.rates: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.rates.append(self.optimizers().param_groups[0]["lr"])
        time.sleep(0.05)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return build_optimizers(self)


def test_a_trainer_under_max_time_ends_annealed(tmp_path) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)
    task = _Tiny()
    trainer = pl.Trainer(max_epochs=1000, max_time={"seconds": 3}, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, data)
    (config,) = trainer.lr_scheduler_configs
    scheduler = config.scheduler
    assert config.interval == "step" and scheduler.run.max_time == 3.0
    assert trainer.current_epoch < 999 and scheduler.last_epoch == trainer.global_step  # the time ended it
    # The rate after the last step is eta_min; the last step trained within one step of it.
    assert trainer.optimizers[0].param_groups[0]["lr"] == ETA_MIN and scheduler.progress == 1.0
    step = (BASE - ETA_MIN) * math.pi / 2 / len(task.rates)  # the cosine's steepest fall per step, roughly
    assert ETA_MIN <= task.rates[-1] <= ETA_MIN + 3 * step
    # Warm-up (4 steps): the rates rise, at most the warm-up line (the cosine factor is <= 1 and depends on how long
    # the steps took on this machine; the rates themselves are tested with an injected clock above).
    warmup = [ETA_MIN + (s + 1) / 4 * (BASE - ETA_MIN) for s in range(4)]
    assert all(a < b for a, b in pairwise(task.rates[:4]))
    assert all(rate <= line * (1 + 1e-9) for rate, line in zip(task.rates[:4], warmup, strict=True))
