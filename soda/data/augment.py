"""Augmentation of a batch of uint8 images into one view, with per-image random parameters.

The reference's per-image PIL pipeline: RandomApply([RandomResizedCrop, RandomHorizontalFlip],
p=crop_prob), RandomApply([RandAugment], p=randaugment_prob). Here the whole batch goes through
a fixed sequence of tensor operations on whatever device holds it: crop and flip are one batched
bilinear resampling (an affine grid per image), RandAugment is `BatchRandAugment` (torchvision's
operations, drawn per image). No host syncs and no data-dependent shapes, so it compiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from soda.data.randaugment import BatchRandAugment


def sample_crop_boxes(
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
    device=None,
) -> torch.Tensor:
    """RandomResizedCrop's boxes (top, left, h, w), float [count, 4], by torchvision's rule: up to
    `attempts` tries of area ~ U(scale) and log-ratio ~ U(log ratio), else a centred crop with the
    ratio clamped into range."""
    area = height * width
    target_area = area * torch.empty(count, attempts, device=device).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(count, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((count,), -1, device=device))

    # Fallback (no attempt fits): the whole image cropped to the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    rows = torch.arange(count, device=device)
    chosen = first.clamp(min=0)
    w = torch.where(first >= 0, w[rows, chosen], torch.full((count,), float(fallback_w), device=device))
    h = torch.where(first >= 0, h[rows, chosen], torch.full((count,), float(fallback_h), device=device))
    # Integer offsets uniform over the valid range, as torch.randint(0, H - h + 1) does.
    top = (torch.rand(count, device=device) * (height - h + 1)).floor()
    left = (torch.rand(count, device=device) * (width - w + 1)).floor()
    centred = first < 0
    top = torch.where(centred, ((height - h) / 2).round(), top)
    left = torch.where(centred, ((width - w) / 2).round(), left)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crop of each box to size x size, mirrored where `flip`; float images in, float out.
    Crops are axis-aligned, so the sampling grid is built by broadcasting a row of x and a column
    of y per image (`affine_grid`'s batched matmul costs more than the resampling on a CPU)."""
    count, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    # Output pixel centres in [-1, 1], mapped into each box (align_corners=False convention).
    centres = (torch.arange(size, device=images.device, dtype=torch.float32) + 0.5) / size * 2 - 1
    grid_x = (
        torch.where(flip[:, None], -centres, centres) * (w / width)[:, None] + ((2 * left + w) / width - 1)[:, None]
    )
    grid_y = centres * (h / height)[:, None] + ((2 * top + h) / height - 1)[:, None]
    grid = torch.stack([grid_x[:, None, :].expand(count, size, size), grid_y[:, :, None].expand(count, size, size)], -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ViewAugmentation:
    """uint8 [batch, 3, H, W] -> float [batch, 3, size, size] in [0, 1]."""

    def __init__(
        self,
        size: int,
        *,
        crop_prob: float,  # the settings of conf/augmentation/view/ (the reference: reference.yaml)
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        flip_prob: float,
        randaugment_prob: float,
        randaugment_ops: int,
        randaugment_magnitude: int,
    ):
        self.size = size
        self.crop_prob = crop_prob
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.flip_prob = flip_prob
        self.randaugment_prob = randaugment_prob
        self.randaugment = BatchRandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude)

    @property
    def is_identity(self) -> bool:
        return self.crop_prob == 0 and self.randaugment_prob == 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count, _, height, width = images.shape
        device = images.device
        images = images.to(torch.float32, copy=True)  # ours to change in place
        if self.crop_prob > 0:
            cropped = torch.rand(count, device=device) < self.crop_prob
            boxes = sample_crop_boxes(count, height, width, self.crop_scale, self.crop_ratio, device=device)
            # The whole image, built by fills: a tensor from a Python list would be a blocking copy.
            whole = torch.zeros(count, 4, device=device)
            whole[:, 2], whole[:, 3] = height, width
            boxes = torch.where(cropped[:, None], boxes, whole)
            flip = cropped & (torch.rand(count, device=device) < self.flip_prob)
            # Rounded to whole levels, as the reference's crop produces a uint8 image.
            # (bilinear weights are convex, so the result stays in [0, 255] without a clamp)
            images = resized_crop_flip(images, boxes, flip, self.size).add_(0.5).floor_()  # round half up, as PIL
        elif (height, width) != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255)
        if self.randaugment_prob > 0 and self.randaugment.num_ops > 0:
            apply = torch.rand(count, device=device) < self.randaugment_prob
            images = self.randaugment(images, apply=apply, in_place=True)  # `images` is ours here
        return images.div_(255)
