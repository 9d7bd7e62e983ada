"""Ranks started by an external launcher (torchrun, srun) agree on one run directory before Hydra composes, and a
requeued SLURM job finds the run directory of its first attempt.

Each rank composes its own config, and `hydra.run.dir` holds a timestamp: without agreement every rank would
write to a directory of its own. Rank 0's timestamp is broadcast over the process group that Lightning then
uses as it is (it skips its own initialisation when one exists), and exported as `PIPELINE_RUN_STAMP`, which
`conf/hydra/default.yaml` reads in place of the current time.

A SLURM requeue (pre-emption, node failure, `scontrol requeue`) runs the job's script again with the same job id
and `SLURM_RESTART_COUNT` raised: its new timestamp would start a new run. Every training under SLURM records its
run dir in `<paths.log_dir>/slurm/<job id>[.<step id>]-<command digest>`; a requeued one reads it and continues that
run.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment

STAMP_VAR = "PIPELINE_RUN_STAMP"


def external_launcher() -> ClusterEnvironment | None:
    """torchrun's or SLURM's environment when it started several ranks itself, else None (one process, or
    Lightning spawning its own DDP children, which get the run dir on their command line)."""
    for kind in (TorchElasticEnvironment, SLURMEnvironment):
        if kind.detect():
            env = kind()
            if env.world_size() > 1:
                return env
    return None


def is_global_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment, before any Trainer exists.

    Lightning reads RANK / SLURM_PROCID / LOCAL_RANK at import; NODE_RANK covers nodes whose Lightning-spawned
    ranks it would otherwise count from 0 again.
    """
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


@contextmanager
def shared_run_dir() -> Iterator[None]:
    """Under torchrun/srun with several ranks: a process group and rank 0's run timestamp for the block, both
    gone after it (the variable unset, the group destroyed); elsewhere nothing."""
    env = external_launcher()
    if env is None or STAMP_VAR in os.environ:
        yield
        return
    _ = (env.main_address, env.main_port)  # SLURM derives them from the job and exports MASTER_ADDR / MASTER_PORT
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=env.global_rank(), world_size=env.world_size())
    now = time.time()
    stamp = [time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now)) + f"-{int(now % 1 * 1e6):06d}"]
    dist.broadcast_object_list(stamp, src=0)
    os.environ[STAMP_VAR] = stamp[0]
    try:
        yield
    finally:
        os.environ.pop(STAMP_VAR, None)
        if dist.is_initialized():
            dist.destroy_process_group()


def slurm_job_key() -> str | None:
    """`<job id>` (a batch script) or `<job id>.<step id>` (an `srun` step) of this SLURM job, None outside SLURM.

    Both are the same when SLURM requeues the job: its script runs again under the same job id, its steps are
    numbered again from 0.
    """
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID", "")
    if not job:
        return None
    return f"{job}.{step}" if step.isdigit() and int(step) < 0xFFFFFFF0 else job  # larger ids: batch/extern steps


def _command_key(argv: list[str]) -> str:
    """A short digest of a command line without its `ckpt_path`/`resume_mode` (which a requeue rewrites): several
    trainings of one batch script (a loop over seeds, say) each find their own run."""
    kept = [a for a in argv[1:] if a.lstrip("+").split("=", 1)[0] not in ("ckpt_path", "resume_mode")]
    return hashlib.sha1("\0".join(kept).encode()).hexdigest()[:10]


def record_slurm_run(log_dir: str | Path, run_dir: str | Path, argv: list[str]) -> None:
    """Under SLURM: write `run_dir` to `<log_dir>/slurm/<job key>-<command digest>` (atomically), for a requeue of
    this command in this job to read. Nothing without the command line (`train()` called from Python)."""
    key = slurm_job_key()
    if key is None or not argv:
        return
    marker = Path(log_dir) / "slurm" / f"{key}-{_command_key(argv)}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    staging = marker.with_name(f".{marker.name}.{os.getpid()}")
    staging.write_text(f"{Path(run_dir).resolve()}\n")
    staging.replace(marker)


def argv_for_requeue(argv: list[str], conf_dir: str) -> list[str]:
    """A requeued SLURM job's command line: the user's, continuing the run of the job's first attempt.

    Outside a requeue (`SLURM_RESTART_COUNT` unset or 0), in a sweep (`-m`: its jobs resume as a re-run sweep
    does), or when the first attempt left no `last.ckpt`, `argv` as it is. Otherwise its `ckpt_path` and
    `resume_mode` are replaced by `ckpt_path=<that run dir>`: the job continues where it stopped, even if it was
    started as a fork of another checkpoint. `paths.log_dir` is composed from `argv`, as the training composes it.
    """
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    key = slurm_job_key()
    if key is None or not restarts.isdigit() or int(restarts) < 1 or {"-m", "--multirun"} & set(argv):
        return argv
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    try:
        with initialize_config_dir(conf_dir, version_base="1.3"):
            log_dir = Path(compose("train", overrides=overrides).paths.log_dir)
    except Exception:  # a command that does not compose: the training itself says why
        return argv
    marker = log_dir / "slurm" / f"{key}-{_command_key(argv)}"
    run_dir = Path(marker.read_text().strip()) if marker.is_file() else None
    if run_dir is None or not (run_dir / "checkpoints" / "last.ckpt").is_file():
        print(f"SLURM job {key}, restart {restarts}: no checkpoint of an earlier attempt in {marker}; starting anew",
              file=sys.stderr)  # fmt: skip
        return argv
    print(f"SLURM job {key}, restart {restarts}: continuing {run_dir}", file=sys.stderr)
    keep = [a for a in argv[1:] if a.lstrip("+").split("=", 1)[0] not in ("ckpt_path", "resume_mode")]
    return [argv[0], *keep, f"ckpt_path={run_dir}"]
