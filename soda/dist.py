"""Rank, world size and process-group set-up, the same way under every launcher.

- torchrun (or anything that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
- submitit, on SLURM or its local executor (one task per GPU): the job environment is exported
  as the variables above;
- plain `python`: one process, no process group.

Seeds derive from the *global* rank so they never collide across nodes. NCCL on GPUs, gloo on
CPUs. Besides the training group, a gloo group serves barriers at which ranks wait for rank 0
(evaluation, checkpoints): a gloo barrier blocks in a socket read, using no GPU and no CPU.

Before joining, rank 0 checks that MASTER_ADDR is its node's, and every other rank that it can
reach rank 0's rendezvous (MASTER_ADDR:MASTER_PORT; on SLURM the job's first node), giving up
after `rendezvous_timeout_s`: either ends the job in one line naming that address and port, not
after the process group's 30 minutes.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from soda.errors import RendezvousError

# Rank 0 evaluates while the others wait at a barrier; give that wait room.
WAIT_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    nodes: tuple[str, ...] = ()  # the host names the ranks run on, each once, rank 0's first

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
        # A MASTER_ADDR the site set (hydra.launcher.setup: an address on the fast network) is kept,
        # as submitit keeps a MASTER_PORT; without overwrite=True, submitit refuses to export at all.
        site_address = os.environ.get("MASTER_ADDR")
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if site_address:
            os.environ["MASTER_ADDR"] = site_address


def setup(use_cuda: bool, rendezvous_timeout_s: float = 300) -> Distributed:
    """Initialise the process group if this process is one of several; idempotent."""
    global _wait_group
    _export_submitit_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(nodes=(socket.gethostname(),))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        _check_network_interface(rank)
        check_rendezvous(rank, rendezvous_timeout_s)
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    hosts = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname(), group=_wait_group)
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size, nodes=tuple(dict.fromkeys(hosts)))


def check_rendezvous(rank: int, timeout_s: float) -> None:
    """Rank 0 hosts the rendezvous (MASTER_ADDR:MASTER_PORT): the address must be one of its node's.
    Every other rank waits until it accepts a connection (rank 0 may start later). RendezvousError,
    naming the address and port and why, when rank 0's node does not have the address or another
    rank cannot reach it within `timeout_s`. (A connection that closes at once is one that rank 0's
    TCPStore drops, as it drops any client that leaves.)"""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not address or not port.isdigit():
        return  # torch's env:// rendezvous says which variable is missing
    where = f"the rendezvous at {address}:{port} (MASTER_ADDR:MASTER_PORT)"
    if rank == 0:
        reason = _not_local(address)
        if reason:
            raise RendezvousError(
                f"rank 0 on {socket.gethostname()} cannot host {where}: {reason}; MASTER_ADDR must name rank 0's "
                "node, the job's first (docs/distributed.md#many-nodes)"
            )
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((address, int(port)), timeout=max(1.0, min(10.0, timeout_s))).close()
            return
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
        if time.monotonic() >= deadline:
            raise RendezvousError(
                f"rank {rank} on {socket.gethostname()} could not reach {where} within {timeout_s:g} s: {reason}; "
                "the job's nodes must reach rank 0's node on that port and each other on the ports gloo/NCCL "
                "open (docs/distributed.md#many-nodes)"
            )
        time.sleep(1)


def _not_local(address: str) -> str | None:
    """Why this node cannot listen on `address` (it does not resolve, or is not one of its
    addresses), or None when it can."""
    try:
        found = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return f"{address} does not resolve ({error.strerror})"
    reason = "no address"
    for family, _, _, _, sockaddr in found:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))
                return None
            except OSError as error:
                reason = error.strerror or str(error)
    return f"{address} is not an address of this node ({reason})"


def _check_network_interface(rank: int) -> None:
    """The interface GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME names (hydra.launcher.network_interface)
    must exist on this node; gloo would otherwise stop with a message naming neither."""
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = os.environ.get(variable, "")
        if not value or value.startswith(("^", "=")):
            continue  # unset, or NCCL's exclusion (^) and exact-match (=) forms, which NCCL checks
        for name in value.split(","):
            try:
                socket.if_nametoindex(name)
            except OSError:
                present = ", ".join(name for _, name in socket.if_nameindex())
                raise RendezvousError(
                    f"rank {rank} on {socket.gethostname()}: {variable}={value} names no network interface of "
                    f"this node (it has {present}); set hydra.launcher.network_interface to one of them"
                ) from None


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
