"""Rank, world size and process-group set-up, the same way under every launcher.

- torchrun (or anything that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
- submitit, on SLURM or its local executor (one task per GPU): the job environment is exported
  as the variables above;
- plain `python`: one process, no process group.

Seeds derive from the *global* rank so they never collide across nodes. NCCL on GPUs, gloo on
CPUs. Besides the training group, a gloo group serves barriers at which ranks wait for rank 0
(evaluation, checkpoints): a gloo barrier blocks in a socket read, using no GPU and no CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 evaluates while the others wait at a barrier; give that wait room.
WAIT_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_wait_group = None


def _export_submitit_environment() -> None:
    """Inside a multi-task submitit job, expose its ranks as torch.distributed's variables."""
    if "RANK" in os.environ:
        return
    try:
        import submitit

        environment = submitit.JobEnvironment()
    except Exception:
        return  # not a submitit job
    if environment.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(use_cuda: bool) -> Distributed:
    """Initialise the process group if this process is one of several; idempotent."""
    global _wait_group
    _export_submitit_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size)


def wait_for_all() -> None:
    """A barrier that costs nothing while it waits (gloo); no-op in one process."""
    if dist.is_initialized():
        dist.barrier(group=_wait_group)


def all_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:
            value /= dist.get_world_size()  # gloo has no AVG
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_to_main(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0; None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def teardown() -> None:
    global _wait_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None
