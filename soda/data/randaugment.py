"""RandAugment on a whole batch at once, each image with its own operations.

The definition is torchvision's `RandAugment` (its 14 operations, 31 magnitude bins, a random
sign for the signed ones, nearest-neighbour geometry filled with black), applied to uint8 images
the way torchvision's tensor kernels do: every intermediate result is truncated to an integer.
`tests/data/test_augment.py` checks each operation against torchvision's own kernel.

Why not torchvision's or kornia's transform: torchvision's draws one set of operations per call, so
per-image randomness costs one Python call per image; kornia's `auto.RandAugment` draws its
operations once per batch, which changes the augmentation (`python bench/augment_libraries.py`
counts the distinct outputs of a batch of copies of one image, and times both).

How it stays batched without host syncs (no `nonzero`, no data-dependent shapes, so it compiles
and fits a CUDA graph): for each of the `num_ops` slots every image draws an operation and a
sign; one `grid_sample` applies all geometric operations (identity matrices for the others);
the colour operations are computed for the whole batch and each image keeps the one it drew.
That is the GPU's mode. On a CPU the extra passes cost more than the host syncs, so there each
operation gathers its own images instead (`static_shapes`); both modes give the same images.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

OPERATIONS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
OP = {name: index for index, name in enumerate(OPERATIONS)}
NUM_BINS = 31


@functools.lru_cache(maxsize=64)  # called once per augmentation call, in the training step
def magnitudes(magnitude: int, height: int, width: int, num_bins: int = NUM_BINS) -> dict[str, float]:
    """Each operation's unsigned strength at bin `magnitude`, computed as torchvision does (float32
    linspace), so the values agree to the last bit."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"randaugment magnitude={magnitude} must be in [0, {num_bins - 1}]")

    def bin_of(start: float, end: float) -> float:
        return float(torch.linspace(start, end, num_bins)[magnitude])

    posterize_bits = (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int()
    return {
        "ShearX": bin_of(0.0, 0.3),
        "ShearY": bin_of(0.0, 0.3),
        "TranslateX": bin_of(0.0, 150.0 / 331.0 * width),
        "TranslateY": bin_of(0.0, 150.0 / 331.0 * height),
        "Rotate": bin_of(0.0, 30.0),
        "Brightness": bin_of(0.0, 0.9),
        "Color": bin_of(0.0, 0.9),
        "Contrast": bin_of(0.0, 0.9),
        "Sharpness": bin_of(0.0, 0.9),
        "Posterize": int(posterize_bits[magnitude]),
        "Solarize": bin_of(1.0, 0.0),
    }


def inverse_affine(ops: torch.Tensor, signs: torch.Tensor, strength: dict[str, float], height: int, width: int):
    """Per image, the 2x3 matrix that maps an output pixel (centred coordinates) to its source
    pixel, for the geometric operation it drew; identity for every other operation. These are
    torchvision's `_get_inverse_affine_matrix` for its arguments in RandAugment."""
    count = ops.shape[0]
    theta = torch.zeros(count, 2, 3, device=ops.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1

    shear = strength["ShearX"] * signs
    is_shear_x = ops == OP["ShearX"]
    is_shear_y = ops == OP["ShearY"]
    # Shears are about the top-left corner (center=[0, 0]), hence the offsets of half the size.
    theta[:, 0, 1] = torch.where(is_shear_x, shear, theta[:, 0, 1])
    theta[:, 0, 2] = torch.where(is_shear_x, shear * height / 2, theta[:, 0, 2])
    theta[:, 1, 0] = torch.where(is_shear_y, shear, theta[:, 1, 0])
    theta[:, 1, 2] = torch.where(is_shear_y, shear * width / 2, theta[:, 1, 2])

    # Translations move by whole pixels (torchvision passes int(magnitude)).
    shift_x = math.trunc(strength["TranslateX"]) * signs
    shift_y = math.trunc(strength["TranslateY"]) * signs
    theta[:, 0, 2] = torch.where(ops == OP["TranslateX"], -shift_x, theta[:, 0, 2])
    theta[:, 1, 2] = torch.where(ops == OP["TranslateY"], -shift_y, theta[:, 1, 2])

    angle = torch.deg2rad(strength["Rotate"] * signs)
    is_rotate = ops == OP["Rotate"]
    cos, sin = angle.cos(), angle.sin()
    theta[:, 0, 0] = torch.where(is_rotate, cos, theta[:, 0, 0])
    theta[:, 0, 1] = torch.where(is_rotate, -sin, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(is_rotate, sin, theta[:, 1, 0])
    theta[:, 1, 1] = torch.where(is_rotate, cos, theta[:, 1, 1])
    return theta


def warp_nearest(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """torchvision's tensor `affine`: nearest sampling of pixel centres, black outside. The grid
    is built by broadcasting (a batched matmul of [N, H*W, 3] by [N, 3, 2] is slower on a CPU)."""
    count, _, height, width = images.shape
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=images.device).view(1, 1, width)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=images.device).view(1, height, 1)
    a, b, c = (theta[:, 0, k].div(0.5 * width).view(count, 1, 1) for k in range(3))
    d, e, f = (theta[:, 1, k].div(0.5 * height).view(count, 1, 1) for k in range(3))
    grid = torch.stack([xs * a + ys * b + c, xs * d + ys * e + f], dim=-1)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of integer-valued float images, floored as for uint8, [N, 1, H, W]."""
    red, green, blue = images.unbind(1)
    # In torchvision's order (add with alpha), so that the floor lands on the same side.
    return red.mul(0.2989).add(green, alpha=0.587).add(blue, alpha=0.114).floor().unsqueeze(1)


def _with_border(images: torch.Tensor, interior: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    out[..., 1:-1, 1:-1] = interior
    return out


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255.0))
    low = torch.where(flat, 0.0, low)
    return ((images - low) / inv_scale).clamp(0, 255).trunc()


def equalize(images: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation per image and channel (torchvision's tensor rule), batched."""
    count, channels, height, width = images.shape
    pixels = height * width
    flat = images.reshape(count * channels, pixels).long()
    hist = torch.zeros(count * channels, 256, dtype=torch.long, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    cumulative = hist.cumsum(1)
    # The last non-empty bin is the first index where the cumulative count reaches its maximum.
    last = cumulative.argmax(1, keepdim=True)
    step = (pixels - hist.gather(1, last)).div(255, rounding_mode="floor")
    lut = (cumulative[:, :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], dim=1)
    equalized = lut.gather(1, flat).to(images.dtype)
    return torch.where(step != 0, equalized, images.reshape(count * channels, pixels)).view_as(images)


class BatchRandAugment:
    """uint8-valued float images [N, 3, H, W] (0..255) in and out; `apply` selects which images
    are augmented at all (RandomApply's per-image coin).

    `static_shapes`: True computes every operation for the whole batch and keeps each image's own
    (no host syncs, fixed shapes: what a GPU, `torch.compile` and CUDA graphs want); False gathers
    each operation's images and computes only those (less work, more small calls: what a CPU wants). None
    picks by device. Both give the same images for the same draws.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_bins: int = NUM_BINS, static_shapes=None):
        if num_ops < 0:
            raise ValueError(f"randaugment ops={num_ops} must be >= 0")
        magnitudes(magnitude, 32, 32, num_bins)  # validates the bin
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.num_bins = num_bins
        self.static_shapes = static_shapes

    def sample(self, count: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot and image: an operation index (uniform over OPERATIONS) and a sign (+1 or -1,
        each with probability 1/2, as torchvision's `rand() <= 0.5` flip)."""
        ops = torch.randint(len(OPERATIONS), (self.num_ops, count), device=device)
        signs = torch.where(torch.rand(self.num_ops, count, device=device) <= 0.5, -1.0, 1.0)
        return ops, signs

    def __call__(self, images: torch.Tensor, apply: torch.Tensor | None = None, in_place: bool = False) -> torch.Tensor:
        count = images.shape[0]
        ops, signs = self.sample(count, images.device)
        if apply is not None:
            ops = torch.where(apply, ops, OP["Identity"])
        return self.apply_ops(images, ops, signs, in_place)

    def apply_ops(self, images: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, in_place: bool = False):
        """Apply slot after slot the drawn `ops` [num_ops, N] with `signs` [num_ops, N]. With
        `in_place`, `images` may be overwritten (saves a copy when the caller owns it)."""
        _, _, height, width = images.shape
        strength = magnitudes(self.magnitude, height, width, self.num_bins)
        static = self.static_shapes if self.static_shapes is not None else images.device.type != "cpu"
        if not in_place:
            images = images.clone()
        steps = self._steps(strength)
        for slot_ops, slot_signs in zip(ops, signs, strict=True):
            if static:
                images = _slot_static(images, slot_ops, slot_signs, steps)
            else:
                images = _slot_gathered(images, slot_ops, slot_signs, steps)
        return images

    def _steps(self, strength: dict):
        """(first operation, last operation, function) in the order they run; the ranges do not
        overlap, so each image goes through one function at most per slot."""

        def geometry(images, ops, signs):
            return warp_nearest(images, inverse_affine(ops, signs, strength, images.shape[2], images.shape[3]))

        def blend_with(name: str, degenerate):
            def operation(images, ops, signs):
                # Ratio and complement as torchvision gets them (double precision, then float32).
                ratio = {sign: 1.0 + sign * strength[name] for sign in (1.0, -1.0)}
                factor = torch.where(signs > 0, ratio[1.0], ratio[-1.0]).view(-1, 1, 1, 1)
                complement = torch.where(signs > 0, 1.0 - ratio[1.0], 1.0 - ratio[-1.0]).view(-1, 1, 1, 1)
                return blend(images, degenerate(images), factor, complement, sharpness=name == "Sharpness")

            return operation

        def one(name: str, operation):
            return OP[name], OP[name], operation

        quantum = 2 ** (8 - strength["Posterize"])
        threshold = 255.0 * strength["Solarize"]
        return [
            (OP["ShearX"], OP["Rotate"], geometry),
            one("Brightness", blend_with("Brightness", torch.zeros_like)),
            one("Color", blend_with("Color", grayscale)),
            one("Contrast", blend_with("Contrast", lambda x: grayscale(x).mean(dim=(1, 2, 3), keepdim=True))),
            one("Sharpness", blend_with("Sharpness", smooth)),
            one("Posterize", lambda x, o, s: (x / quantum).floor() * quantum),
            one("Solarize", lambda x, o, s: torch.where(x >= threshold, 255 - x, x)),
            one("AutoContrast", lambda x, o, s: autocontrast(x)),
            one("Equalize", lambda x, o, s: equalize(x)),
        ]


def _slot_static(images, ops, signs, steps) -> torch.Tensor:
    """Every function on the whole batch, each image keeping its own result: fixed shapes."""
    for first, last, operation in steps:
        chosen = ((ops >= first) & (ops <= last)).view(-1, 1, 1, 1)
        images = torch.where(chosen, operation(images, ops, signs), images)
    return images


def _slot_gathered(images, ops, signs, steps) -> torch.Tensor:
    """Each function on the images that drew it only, written back in place. The index lists
    need their lengths on the host (a sync per operation), which a CPU does not mind. (Sorting
    the batch by operation once per slot instead measured no faster: the full-batch gather and
    scatter cost what the per-operation ones save.)"""
    for first, last, operation in steps:
        index = ((ops >= first) & (ops <= last)).nonzero().squeeze(1)
        if index.numel() > 0:
            images[index] = operation(images[index], ops[index], signs[index])
    return images


def blend(images, degenerate, factor, complement, sharpness: bool = False) -> torch.Tensor:
    """ratio * image + (1 - ratio) * degenerate, clamped and truncated like uint8, with
    torchvision's order of operations so that the truncation lands the same way."""
    if sharpness:  # torchvision writes this one as x + (1 - f)(smoothed - x)
        blended = images + complement * (degenerate - images)
    else:
        blended = (images * factor).addcmul(degenerate, complement)
    return blended.clamp(0, 255).trunc()


def smooth(images: torch.Tensor) -> torch.Tensor:
    """The 3x3 smoothing (1s around a 5, over 13) that Sharpness blends away from, rounded; the
    one-pixel border keeps the image. A sum of shifted slices: oneDNN's depthwise convolution is
    10x slower on small images on a CPU."""
    height, width = images.shape[-2:]
    total = images[..., 1 : height - 1, 1 : width - 1] * (5.0 / 13.0)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if (dy, dx) != (1, 1):
                total = total + images[..., dy : height - 2 + dy, dx : width - 2 + dx] * (1.0 / 13.0)
    return _with_border(images, total.round())
