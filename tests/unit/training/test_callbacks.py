"""LastCheckpoint's SIGTERM escape hatches in a real process (a second SIGTERM, the grace period) and its epoch
checkpoints; NonFiniteLoss's patience in a real (tiny) Lightning training."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from pipeline.training.callbacks import LastCheckpoint, NonFiniteLoss, NonFiniteLossError

# A process with LastCheckpoint's SIGTERM handler that never reaches the end of its batch: it would otherwise never
# stop (a training stuck in a dead loader, say). The trainer is reduced to what the handler touches.
_STUCK = textwrap.dedent("""
    import sys, time
    from types import SimpleNamespace
    from pipeline.training.callbacks import LastCheckpoint
    callback = LastCheckpoint(dirpath="ckpts", sigterm_grace_s=float(sys.argv[1]))
    callback.on_train_start(SimpleNamespace(strategy=SimpleNamespace(launcher=None)), None)
    print("ready", flush=True)
    while not callback._sigterm_seen:
        time.sleep(0.01)
    print("noted", flush=True)
    while True:
        time.sleep(0.01)
""")


def _stuck(grace_s: float, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _STUCK, str(grace_s)], text=True, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_second_sigterm_exits_at_once_with_status_143(tmp_path: Path):
    proc = _stuck(grace_s=600, cwd=tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline() == "noted\n"  # the first one asks for a stop at the next batch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert (
        f"a second SIGTERM: exiting now (status 143); the last checkpoint written is {tmp_path}/ckpts/last.ckpt" in err
    )


def test_a_run_that_does_not_stop_within_the_grace_period_is_ended(tmp_path: Path):
    proc = _stuck(grace_s=0.5, cwd=tmp_path)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - start >= 0.5
    assert f"SIGTERM: stopping at the next batch and writing {tmp_path}/ckpts/last.ckpt" in err
    assert "no clean stop 0.5 s after SIGTERM: exiting now" in err


class _NaNAt(pl.LightningModule):
    """A linear regression whose loss is NaN at the given batch indices; records its weight after every batch."""

    def __init__(self, nan_batches: set[int]) -> None:
        super().__init__()
        self.layer, self.nan_batches, self.weights = torch.nn.Linear(2, 1), nan_batches, []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        return loss * float("nan") if batch_idx in self.nan_batches else loss

    def on_train_batch_end(self, *args: object) -> None:
        self.weights.append(self.layer.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: pl.LightningModule, patience: int) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(12, 2), torch.randn(12, 1))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[NonFiniteLoss(patience=patience)])  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))


def test_non_finite_steps_below_the_patience_are_skipped_without_touching_the_weights():
    module = _NaNAt({1, 2})
    _fit(module, patience=3)
    w = module.weights
    assert len(w) == 6  # the training went on
    assert torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])  # batches 1 and 2 did not step
    assert not torch.equal(w[2], w[3]) and all(torch.isfinite(x).all() for x in w)


def test_the_patience_th_non_finite_step_in_a_row_stops_the_training():
    module = _NaNAt({1, 2})
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(epoch 0, batch 2\) \(2 non-finite steps in a row\)"):
        _fit(module, patience=2)
    assert len(module.weights) == 2 and torch.equal(module.weights[0], module.weights[1])


class _Validated(_NaNAt):
    """The regression with a validation pass; records the epochs it validated."""

    def __init__(self) -> None:
        super().__init__(set())
        self.validated: list[int] = []

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.validated.append(self.current_epoch)


def test_last_ckpt_is_written_after_every_epoch_also_those_without_validation(tmp_path: Path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2), torch.randn(4, 1)))
    module, saved = _Validated(), []
    callback = LastCheckpoint(dirpath=str(tmp_path))
    callback.on_save_checkpoint = lambda trainer, *_: saved.append(trainer.current_epoch)
    trainer = pl.Trainer(max_epochs=3, check_val_every_n_epoch=2, accelerator="cpu", logger=False,
                         num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])  # fmt: skip
    trainer.fit(module, data, data)
    assert sorted(set(module.validated)) == [1]  # only the second epoch was validated
    assert saved == [0, 1, 2]
    assert torch.load(callback.path, weights_only=True)["epoch"] == 2
