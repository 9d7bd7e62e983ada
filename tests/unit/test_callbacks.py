"""The SIGTERM escape hatches of LastCheckpoint, in a real process: a second SIGTERM, or the grace period, exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# A process with LastCheckpoint's SIGTERM handler that never reaches the end of its batch: it would otherwise never
# stop (a training stuck in a dead loader, say). The trainer is reduced to what the handler touches.
_STUCK = textwrap.dedent("""
    import sys, time
    from types import SimpleNamespace
    from pipeline.callbacks import LastCheckpoint
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
