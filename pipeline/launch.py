"""Ranks started by an external launcher (torchrun, srun) agree on one run directory before Hydra composes.

Each rank composes its own config, and `hydra.run.dir` holds a timestamp: without agreement every rank would
write to a directory of its own. Rank 0's timestamp is broadcast over the process group that Lightning then
uses as it is (it skips its own initialisation when one exists), and exported as `PIPELINE_RUN_STAMP`, which
`conf/hydra/default.yaml` reads in place of the current time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
