"""Parameter counts and training-step FLOPs of a SODA model, built from the run config (conf/).

    python -m soda.models.summary                                  # the reference (the defaults)
    python -m soda.models.summary model=soda_r50_ddpm              # any override launch.py takes
    python -m soda.models.summary model=tiny dataset=shapes model.layer_groups=2 --no-flops

FLOPs are one training step per image, forward + backward, counted by torch.utils.flop_counter
on a batch of two. Attention is counted through SDPA's math backend, because the counter does
not see the fused CPU kernel's FLOPs (which would under-count by about 1 GFLOP here).
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soda import config
from soda.errors import ConfigError
from soda.models.soda import SODA, build_soda


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def training_step_flops_per_image(model: SODA, batch: int = 2) -> float:
    size = model.decoder.image_size
    images = torch.rand(batch, model.decoder.image_channels, size, size)
    model.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.loss(images, images).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for launch.py (model=tiny, model.arch=...)")
    parser.add_argument("--no-flops", action="store_true", help="skip the (slower) FLOP count")
    args = parser.parse_args(argv)
    try:
        settings = config.compose(args.overrides)
        model = build_soda(**settings.model_arguments())
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    except ValueError as error:
        parser.exit(2, f"error: model: {error}\n")
    m, size = settings.model, settings.dataset.image_size
    print(f"model     {m.name}: encoder {m.arch}, latent {m.latent_dim}")
    print(f"encoder parameters  {count_parameters(model.encoder) / 1e6:.1f} M")
    print(f"decoder parameters  {count_parameters(model.decoder) / 1e6:.1f} M")
    if not args.no_flops:
        flops = training_step_flops_per_image(model)
        print(f"training step FLOPs {flops / 1e9:.1f} GFLOP per image (forward + backward, {size}x{size})")


if __name__ == "__main__":
    main()
