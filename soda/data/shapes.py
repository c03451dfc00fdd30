"""`shapes`: a synthetic labelled image set that needs no download.

The class is the shape (disk, square, triangle, ring, cross, bar). Everything else is nuisance
drawn independently of the class: position, size, rotation, shape colour, a two-colour gradient
background and pixel noise. An encoder that keys on colour or position is at chance; one that
sees shape separates the classes. Deterministic for a seed.

The generator also returns how each image was made (`make_shapes_with_factors`): the factors that
`soda.eval.factor_probes` decodes from a latent, the way representation-learning papers on
dSprites or 3D Shapes say what a latent encodes. Integer factors are discrete, float ones
continuous (one row per image, one column per dimension; NaN where a factor is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

CLASSES = ("disk", "square", "triangle", "ring", "cross", "bar")
# Rotational symmetry order of each class: a rotation by 2 pi / order leaves it unchanged, so its
# rotation is defined modulo that; 0 = none (a disk or a ring looks the same at every angle).
SYMMETRY = {"disk": 0, "square": 4, "triangle": 3, "ring": 0, "cross": 4, "bar": 2}
FACTORS = {
    "shape": "the class (discrete)",
    "position": "the centre, x and y",
    "size": "the radius",
    "rotation": "cos and sin of order x angle (the class's symmetry order); undefined for disks and rings",
    "shape_colour": "the shape's RGB tint",
    "background_colour": "the background's mean RGB (the two gradient colours averaged)",
}


def _signed_distance(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) in the shape's own unit frame."""
    if shape == "disk":
        return torch.sqrt(u**2 + v**2) - 0.9
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.75
    if shape == "triangle":  # equilateral, pointing up, inscribed in the unit circle
        return torch.maximum(-v - 0.5, u.abs() * math.sqrt(3) / 2 + v * 0.5 - 0.5)
    if shape == "ring":
        return (torch.sqrt(u**2 + v**2) - 0.7).abs() - 0.22
    if shape == "cross":
        horizontal = torch.maximum(u.abs() - 0.95, v.abs() - 0.28)
        vertical = torch.maximum(u.abs() - 0.28, v.abs() - 0.95)
        return torch.minimum(horizontal, vertical)
    if shape == "bar":
        return torch.maximum(u.abs() - 0.95, v.abs() - 0.3)
    raise ValueError(f"unknown shape {shape!r}")


def check_class_count(num_classes: int, name: Callable[[str], str] = str) -> None:
    """A ValueError when the set cannot have `num_classes` classes (`name` gives the argument the
    name a message uses for it: the config's `dataset.num_classes`)."""
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(
            f"{name('num_classes')}={num_classes} but shapes has {len(CLASSES)} classes ({', '.join(CLASSES)}); "
            f"choose 2 to {len(CLASSES)} (the first that many are used)"
        )


def make_shapes(
    count: int, image_size: int, seed: int, num_classes: int = len(CLASSES)
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images as uint8 [count, 3, size, size] and their labels, balanced over classes."""
    images, labels, _ = make_shapes_with_factors(count, image_size, seed, num_classes)
    return images, labels


def make_shapes_with_factors(
    count: int, image_size: int, seed: int, num_classes: int = len(CLASSES)
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`make_shapes`' images and labels, and the factors each image was drawn from (`FACTORS`):
    {"shape": int64 [count], "position": float [count, 2], ...}."""
    check_class_count(num_classes)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    labels = labels[torch.randperm(count, generator=g)]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=g)

    center = uniform(-0.15, 0.15, count, 2)
    radius = uniform(0.6, 0.85, count)
    angle = uniform(0, 2 * math.pi, count)
    # Light shape on a dark background, each with a random tint: the shape carries most of an
    # image's variance, so it is what a reconstruction objective has to capture first, while
    # colour still varies and tells nothing about the class.
    foreground = uniform(0.6, 1.0, count, 3)
    background_a, background_b = uniform(0.0, 0.4, count, 3), uniform(0.0, 0.4, count, 3)
    gradient_angle = uniform(0, 2 * math.pi, count)

    axis = (torch.arange(image_size) + 0.5) / image_size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")  # [size, size], y down
    dx = x[None] - center[:, 0, None, None]
    dy = y[None] - center[:, 1, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u = (cos * dx + sin * dy) / radius[:, None, None]
    v = (-sin * dx + cos * dy) / radius[:, None, None]

    distance = torch.empty(count, image_size, image_size)
    for index, shape in enumerate(CLASSES[:num_classes]):
        chosen = labels == index
        distance[chosen] = _signed_distance(shape, u[chosen], v[chosen])
    # Anti-aliased coverage: one pixel of soft edge.
    pixel = 2 / image_size
    coverage = (0.5 - distance * radius[:, None, None] / pixel).clamp(0, 1)[:, None]

    ramp = (x[None] * gradient_angle.cos()[:, None, None] + y[None] * gradient_angle.sin()[:, None, None]) / 2 + 0.5
    background = background_a[:, :, None, None] * (1 - ramp[:, None]) + background_b[:, :, None, None] * ramp[:, None]
    images = coverage * foreground[:, :, None, None] + (1 - coverage) * background
    images = images + 0.04 * torch.randn(images.shape, generator=g)

    order = torch.tensor([SYMMETRY[shape] for shape in CLASSES[:num_classes]], dtype=torch.float32)[labels]
    rotation = torch.stack([(order * angle).cos(), (order * angle).sin()], dim=1)
    rotation[order == 0] = math.nan
    factors = {
        "shape": labels.clone(),
        "position": center,
        "size": radius[:, None],
        "rotation": rotation,
        "shape_colour": foreground,
        "background_colour": (background_a + background_b) / 2,
    }
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels, factors
