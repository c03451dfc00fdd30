"""Parameter counts and training-step FLOPs of a SODA model.

    python -m soda.models.summary                      # the reference CIFAR-10 settings
    python -m soda.models.summary --arch resnet50      # other settings

FLOPs are one training step per image, forward + backward, counted by torch.utils.flop_counter
on a batch of two. Attention is counted through SDPA's math backend, because the counter does
not see the fused CPU kernel's FLOPs (which would under-count by about 1 GFLOP here).
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from soda.models.encoder import ARCHITECTURES
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
    parser.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--large-image-stem",
        action="store_true",
        help="use ResNet's 7x7 stride-2 stem and max-pool (for 64x64 and larger images)",
    )
    parser.add_argument("--base-channels", type=int, default=128)
    parser.add_argument("--channel-mults", type=int, nargs="+", default=[1, 2, 2, 2])
    parser.add_argument(
        "--attention-levels",
        type=int,
        nargs="+",
        default=None,
        help="0/1 per level (default: attention at the second level only)",
    )
    parser.add_argument("--layer-groups", type=int, default=1)
    parser.add_argument("--no-flops", action="store_true", help="skip the (slower) FLOP count")
    args = parser.parse_args(argv)
    attention = args.attention_levels or [i == 1 for i in range(len(args.channel_mults))]
    try:
        model = build_soda(
            arch=args.arch,
            latent_dim=args.latent_dim,
            small_images=not args.large_image_stem,
            image_size=args.image_size,
            base_channels=args.base_channels,
            channel_mults=tuple(args.channel_mults),
            attention_levels=tuple(bool(a) for a in attention),
            layer_groups=args.layer_groups,
        )
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"encoder   {args.arch}, latent {args.latent_dim}")
    print(f"encoder parameters  {count_parameters(model.encoder) / 1e6:.1f} M")
    print(f"decoder parameters  {count_parameters(model.decoder) / 1e6:.1f} M")
    if not args.no_flops:
        flops = training_step_flops_per_image(model)
        print(
            f"training step FLOPs {flops / 1e9:.1f} GFLOP per image (forward + backward, "
            f"{args.image_size}x{args.image_size})"
        )


if __name__ == "__main__":
    main()
