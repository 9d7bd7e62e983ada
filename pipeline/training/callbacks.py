"""Lightning callbacks that make a training resumable exactly and stop it cleanly: per-step seeding, `last.ckpt`
mid-epoch and on pre-emption, a guard against non-finite losses."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

# The exit status of a training stopped by SIGTERM after writing its checkpoint (128 + SIGTERM, as a shell reports
# a process killed by it): the run is resumable; schedulers and scripts can tell it from a failure (1).
PREEMPTED_EXIT = 143


class StepSeed(pl.Callback):
    """Seed torch, numpy and `random` before every training step from (seed, global step, rank).

    Whatever a training step draws (dropout, the mask branch's RoI sampling, torchvision's box samplers) is then a
    function of where training stands, not of how many draws came before in this process: a run resumed from any
    checkpoint draws what the uninterrupted run drew.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state = np.random.SeedSequence([self.seed, trainer.global_step, trainer.global_rank]).generate_state(2)
        torch.manual_seed(int(state[0]))
        np.random.seed(int(state[1]))
        random.seed(int(state[1]))


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`: after every epoch (validated or not), every `every_n_train_steps` steps within an epoch, and
    on SIGTERM.

    Resuming from any of them continues at the next batch (the DataModule saves its position in the epoch). On
    SIGTERM (a scheduler's kill, a spot instance) Lightning stops at the next batch boundary and this callback
    writes the checkpoint; a second SIGTERM, or `sigterm_grace_s` seconds without reaching a batch boundary (a
    run stuck in a dead loader, say), exits at once with status 143.
    """

    def __init__(
        self, dirpath: str, filename: str = "last", every_n_train_steps: int | None = None, sigterm_grace_s: float = 120
    ) -> None:
        # At every epoch's end, after its validation if it has one: Lightning's default would save only after
        # validations, so `check_val_every_n_epoch=2` would leave every other epoch without a checkpoint.
        super().__init__(dirpath=dirpath, filename=filename, save_top_k=1, every_n_epochs=1,
                         enable_version_counter=False, save_on_train_epoch_end=True)  # fmt: skip
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps}: give a positive number of steps, or null")
        self.step_interval, self.sigterm_grace_s = every_n_train_steps, sigterm_grace_s
        self._sigterm_seen, self._grace_timer = False, None

    @property
    def path(self) -> Path:
        """Where the checkpoint is written."""
        return Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its SIGTERM handler just before training starts. Its flag is checked by each rank on
        # its own after every batch, so under DDP the signalled rank stops alone and the others wait for it in the
        # next collective; its handler's broadcast, sent from inside the signal handler, races the step's own
        # collectives (gloo "Connection reset by peer", Lightning 2.6.6). Ours replaces it and only takes note;
        # after each batch the ranks agree (`reduce_boolean_decision`) and all raise Lightning's flag together.
        # Lightning's teardown restores the handlers it found.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: self._on_sigterm(trainer))

    def _on_sigterm(self, trainer: pl.Trainer) -> None:
        if self._sigterm_seen:
            self._exit_now(trainer, "a second SIGTERM")
        self._sigterm_seen = True
        print(f"SIGTERM: stopping at the next batch and writing {self.path}", file=sys.stderr, flush=True)
        why = f"no clean stop {self.sigterm_grace_s:g} s after SIGTERM"
        self._grace_timer = threading.Timer(self.sigterm_grace_s, self._exit_now, [trainer, why])
        self._grace_timer.daemon = True
        self._grace_timer.start()

    def _exit_now(self, trainer: pl.Trainer, why: str) -> None:
        print(f"{why}: exiting now (status {PREEMPTED_EXIT}); the last checkpoint written is {self.path}",
              file=sys.stderr, flush=True)  # fmt: skip
        kill = getattr(trainer.strategy.launcher, "kill", None)  # DDP ranks Lightning started go too
        if kill is not None:
            kill(signal.SIGKILL)
        os._exit(PREEMPTED_EXIT)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches  # the epoch's own checkpoint follows
        if trainer.strategy.reduce_boolean_decision(self._sigterm_seen, all=False):  # any rank signalled
            # Lightning stops every rank after this batch; after an epoch's last one, only after the next batch, so
            # the epoch's validation and checkpoint are not cut short (Lightning would stop inside validation).
            if not last_of_epoch:
                trainer._signal_connector.received_sigterm = True
            return
        if self.step_interval and trainer.global_step % self.step_interval == 0 and not last_of_epoch:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:  # any checkpoint: the metrics of the steps it holds reach the store first
            flush = getattr(logger, "flush_metrics", None)
            if flush is not None:
                flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # the batch in flight has finished: a consistent state
            trainer.save_checkpoint(self.path, weights_only=False)
            if self._grace_timer is not None:  # stopped cleanly: the logger may take its own time to finish
                self._grace_timer.cancel()


class NonFiniteLossError(RuntimeError):
    """Training stopped because its loss was NaN or infinite; the message names the step and the loss terms."""


class NonFiniteLoss(pl.Callback):
    """Stop at the `patience`-th consecutive non-finite step, before it reaches the weights.

    A step is non-finite when its loss (on any DDP rank) or its gradients are NaN or infinite. Its optimizer step
    is skipped (no gradient reaches the optimizer), so the weights and every checkpoint written stay finite; the
    error names the step and the logged loss terms.
    """

    def __init__(self, patience: int = 1) -> None:
        if patience < 1:
            raise ValueError(f"patience={patience}: stop after at least one non-finite loss")
        self.patience, self._bad, self._skip = patience, 0, False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        # Every rank decides alike: one rank raising alone would leave the others waiting in the gradient all-reduce.
        self._skip = trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if self._skip:
            self._count(trainer, f"loss={float(loss.detach()):g}" if not finite else "loss non-finite on another rank")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not self._skip and grads:  # the same on every rank: DDP has averaged them
            norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
            if not bool(torch.isfinite(norms).all()):
                self._skip = True
                self._count(trainer, "a finite loss with non-finite gradients")
        if not self._skip:
            self._bad = 0
            return
        for param in pl_module.parameters():  # an optimizer steps no parameter without a gradient
            param.grad = None

    def _count(self, trainer: pl.Trainer, what: str) -> None:
        self._bad += 1
        if self._bad < self.patience:
            return
        metrics = trainer.callback_metrics  # this step's logged values carry the suffix "_step"
        terms = {k.removesuffix("_step"): float(v) for k, v in metrics.items() if k.startswith("train/loss")
                 and k.endswith("_step") and v.numel() == 1}  # fmt: skip
        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(terms.items())) or what
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        streak = f" ({self._bad} non-finite steps in a row)" if self._bad > 1 else ""
        raise NonFiniteLossError(
            f"Non-finite training loss at step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{batch}){streak}: {shown}. Training stopped before this step changed the weights; the checkpoints "
            "written so far are kept. Lower model.optimizer.lr, or check this batch's data (pipeline-check-data)."
        )
