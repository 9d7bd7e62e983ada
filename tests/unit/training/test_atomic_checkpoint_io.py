"""Checkpoints are written beside their target and renamed into place; a failed write keeps the old file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import AtomicCheckpointIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_writes_a_loadable_file_with_the_usual_permissions_and_leaves_nothing_else(tmp_path: Path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    before = (tempfile.tempdir, tempfile.gettempdir())
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "epoch": 1}, target)

    assert torch.load(target, weights_only=True)["state_dict"]["w"].tolist() == [0.0, 1.0, 2.0]
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no staging file left behind
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # as any other file, not mkstemp's 0600
    assert (tempfile.tempdir, tempfile.gettempdir()) == before


def test_a_failed_save_keeps_the_previous_checkpoint_and_removes_its_staging_file(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, target)
    good = target.read_bytes()

    with pytest.raises(Exception, match="pickle"):
        io.save_checkpoint({"epoch": 2, "callback": lambda: None}, target)  # torch.save cannot pickle a lambda

    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_remote_paths_and_storage_options_go_to_lightnings_own_save(tmp_path: Path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1}, tmp_path / "x.ckpt", storage_options={"a": 1})
    AtomicCheckpointIO().save_checkpoint({"epoch": 1}, f"memory://{tmp_path}/x.ckpt")  # fsspec's in-memory store
    assert not (tmp_path / "x.ckpt").exists()


# A process that dies by SIGKILL in the middle of writing a checkpoint: the object after the weights announces
# itself while torch.save pickles it, then waits there for the kill.
_KILLED_IN_SAVE = textwrap.dedent("""
    import sys, time, torch
    from pipeline.training.checkpoint import AtomicCheckpointIO

    class Waits:
        def __reduce__(self):
            print("saving", flush=True)
            time.sleep(600)

    state = {"state_dict": {"w": torch.ones(1 << 20)}, "epoch": 2, "then": Waits()}
    AtomicCheckpointIO().save_checkpoint(state, sys.argv[1])
""")


def test_a_sigkill_inside_the_save_leaves_the_previous_checkpoint_whole(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, target)
    good = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IN_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "saving\n"  # inside torch.save, its staging file open
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert target.read_bytes() == good
    assert torch.load(target, weights_only=True)["epoch"] == 1
    (staging,) = tmp_path.glob(".last.ckpt.*.tmp")  # what the killed process left; nothing can clean it up then
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 3}, target)  # the next save of that file does
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["epoch"] == 3
