"""One rank of a 2-process gloo group: one training step, then save what the optimiser saw.

python -m tests.support.gradient_worker RANK WORLD PORT OUT_DIR
"""

import os
import sys
from pathlib import Path

import torch


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from soda import dist
    from soda.config import to_settings
    from soda.train import build_model, build_trainer, load_data
    from tests.helpers import SMOKE, compose_config

    settings = to_settings(compose_config(SMOKE))
    info = dist.setup(use_cuda=False)
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    train_set, _ = load_data(settings)
    trainer = build_trainer(settings, model, train_set, Path(out), torch.device("cpu"), world=info)
    grads = {}

    def capture(optimizer, args, kwargs):
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        grads.update({i: p.grad.clone() for i, p in enumerate(parameters)})

    trainer.optimizer.register_step_pre_hook(capture)
    start = rank * trainer.rank_batch
    trainer.train_step(trainer.train_images[start : start + trainer.rank_batch])
    torch.save({"grads": grads, "params": [p.detach().clone() for p in model.parameters()]}, f"{out}/rank{rank}.pt")
    dist.teardown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
