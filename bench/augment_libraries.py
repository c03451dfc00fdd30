"""Batched augmentation: ours (soda.data) against kornia's, for speed and per-image randomness.

    python bench/augment_libraries.py [--device cuda] [--batch 512]

Why it exists: the throughput issue asked to prefer a well-kept library for on-device
augmentation if it does the job. Two questions decide it:
  1. per-image randomness: a batch of copies of ONE image goes through RandAugment (ops 2,
     magnitude 9, applied to every image); with operations drawn per image nearly every output
     differs, with operations drawn per batch only a handful do. torchvision applied image by
     image is the reference.
  2. speed, images/s: RandAugment alone, and random-resized-crop + flip alone.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.transforms import v2

from soda.data.augment import resized_crop_flip, sample_crop_boxes
from soda.data.randaugment import BatchRandAugment
from soda.data.shapes import make_shapes


def distinct(images: torch.Tensor) -> int:
    return len({bytes(image.to(torch.uint8).cpu().numpy().tobytes()) for image in images})


def rate(function, count: int, repeats: int = 5) -> float:
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return repeats * count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    import kornia
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment as KorniaRandAugment

    device = torch.device(args.device)
    torch.manual_seed(0)
    one, _ = make_shapes(1, 32, seed=0)
    copies = one.expand(256, -1, -1, -1).contiguous().to(device)
    ours = BatchRandAugment(num_ops=2, magnitude=9)
    theirs = KorniaRandAugment(n=2, m=9).to(device)
    reference = v2.RandAugment(num_ops=2, magnitude=9)
    print(f"# kornia {kornia.__version__}, torch {torch.__version__}, {device}, batch {args.batch}")
    print("distinct outputs of RandAugment on 256 copies of one image (3 batches):")
    print(
        f"  torchvision, per image:      {[distinct(torch.stack([reference(x) for x in copies.cpu()])) for _ in range(3)]}"
    )
    print(f"  soda BatchRandAugment:       {[distinct(ours(copies.float())) for _ in range(3)]}")
    print(
        f"  kornia auto.RandAugment:     {[distinct((theirs(copies.float() / 255) * 255).round()) for _ in range(3)]}"
    )

    images = make_shapes(args.batch, 32, seed=1)[0].to(device)
    floats = images.float()
    crop_flip = K.AugmentationSequential(
        K.RandomResizedCrop((32, 32), scale=(0.08, 1.0), ratio=(0.75, 1.3333333)), K.RandomHorizontalFlip()
    ).to(device)

    def our_crop_flip():
        boxes = sample_crop_boxes(args.batch, 32, 32, (0.08, 1.0), (0.75, 1.3333333), device=device)
        return resized_crop_flip(floats, boxes, torch.rand(args.batch, device=device) < 0.5, 32)

    print("images/s:")
    print(
        f"  RandAugment      soda {rate(lambda: ours(floats), args.batch):9,.0f}   "
        f"kornia {rate(lambda: theirs(floats / 255), args.batch):9,.0f}"
    )
    print(
        f"  crop + flip      soda {rate(our_crop_flip, args.batch):9,.0f}   "
        f"kornia {rate(lambda: crop_flip(floats / 255), args.batch):9,.0f}"
    )


if __name__ == "__main__":
    main()
