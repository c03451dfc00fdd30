"""One of two gloo ranks on cuda:0: SyncBatchNorm on this rank's half of a batch (see
tests/test_cuda.py). Rank 0 also saves plain BatchNorm on the whole batch, for comparison.

python -m tests.support.syncbn_worker RANK PORT OUT_DIR
"""

import copy
import sys

import torch
import torch.distributed as dist


def _step(norm: torch.nn.Module, images: torch.Tensor) -> dict:
    output = norm(images)
    output.square().sum().backward()
    return {"output": output.detach(), "running_mean": norm.running_mean, "weight_grad": norm.weight.grad}


def main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    images = (torch.randn(16, 8, 4, 4) * 3 + 1).cuda()  # the same on both ranks: the seed is shared
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(norm)).cuda()
    result = _step(synced, images[rank * 8 : (rank + 1) * 8])
    torch.save({k: v.cpu() for k, v in result.items()}, f"{out}/rank{rank}.pt")
    if rank == 0:
        whole = _step(norm.cuda(), images)
        torch.save({k: v.cpu() for k, v in whole.items()}, f"{out}/whole.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
