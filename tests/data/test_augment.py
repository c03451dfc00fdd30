"""The batched augmentation (soda/data) against torchvision's per-image definition, on the CPU,
and on CUDA where a GPU is visible (the `cuda` parameters, which `make gpu-check` runs)."""

import pytest
import torch
from scipy import stats
from torchvision.transforms import v2

from soda.data.randaugment import OP, OPERATIONS, SIGNED, BatchRandAugment, magnitudes
from soda.data.shapes import make_shapes
from tests.helpers import DEVICES, reference_view

# On CUDA, fused multiply-adds move a few float results across a rounding boundary: a pixel may
# land one level off torchvision's CPU kernel, and a geometric operation may pick a neighbouring
# source pixel now and then. The GPU path must agree with the CPU on all but this many pixels.
CUDA_PIXELS_OFF_BY_MORE_THAN_ONE_LEVEL = 0.005


def _test_images(count: int = 48, size: int = 32) -> torch.Tensor:
    """Noise, smooth gradients and the synthetic shapes: edges, flat areas and full-range pixels."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (count // 3, 3, size, size), generator=generator, dtype=torch.uint8)
    coarse = torch.randint(0, 256, (count // 3, 3, 4, 4), generator=generator).float()
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear").round().to(torch.uint8)
    shapes, _ = make_shapes(count - 2 * (count // 3), size, seed=0)
    return torch.cat([noise, smooth, shapes])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPERATIONS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("static_shapes", [False, True])
def test_each_operation_equals_torchvisions_uint8_kernel(name, sign, static_shapes, device):
    images = _test_images()
    strength = magnitudes(9, 32, 32).get(name, 0.0)
    magnitude = sign * strength if name in SIGNED else strength
    torchvision_randaugment = v2.RandAugment(num_ops=1, magnitude=9)
    expected = torch.stack(
        [
            torchvision_randaugment._apply_image_or_video_transform(
                image, name, magnitude, v2.InterpolationMode.NEAREST, {type(image): None}
            )
            for image in images
        ]
    )
    ours = BatchRandAugment(num_ops=1, magnitude=9, static_shapes=static_shapes)
    count = images.shape[0]
    ops, signs = torch.full((1, count), OP[name], device=device), torch.full((1, count), sign, device=device)
    got = ours.apply_ops(images.float().to(device), ops, signs).cpu()
    if device == "cpu":
        assert torch.equal(got.to(torch.uint8), expected)
    else:
        off = (got.to(torch.uint8).int() - expected.int()).abs()
        assert (off > 1).float().mean().item() <= CUDA_PIXELS_OFF_BY_MORE_THAN_ONE_LEVEL, off.max()


def test_images_keep_their_own_operations_in_a_mixed_batch():
    """Each image of a batch gets the operation it drew, the same as alone; static and gathered
    execution agree."""
    images = _test_images().float()
    augment = BatchRandAugment(num_ops=2, magnitude=9)
    torch.manual_seed(1)
    ops, signs = augment.sample(images.shape[0])
    gathered = BatchRandAugment(2, 9, static_shapes=False).apply_ops(images, ops, signs)
    static = BatchRandAugment(2, 9, static_shapes=True).apply_ops(images, ops, signs)
    assert torch.equal(gathered, static)
    for index in (0, 17, 40):
        alone = augment.apply_ops(images[index : index + 1], ops[:, index : index + 1], signs[:, index : index + 1])
        assert torch.equal(alone[0], gathered[index])


def test_operations_and_signs_are_drawn_per_image_uniformly():
    augment = BatchRandAugment(num_ops=2, magnitude=9)
    torch.manual_seed(0)
    ops, signs = augment.sample(14_000)
    counts = torch.bincount(ops.flatten(), minlength=len(OPERATIONS))
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3  # uniform over the 14 operations
    assert abs((signs > 0).float().mean().item() - 0.5) < 0.01
    # The two slots are independent draws (torchvision draws each slot afresh, repeats allowed).
    same = (ops[0] == ops[1]).float().mean().item()
    assert abs(same - 1 / len(OPERATIONS)) < 0.01


def _torchvision_view(size: int) -> v2.Compose:
    """The reference view, per image, on uint8 tensors (the reference's PIL pipeline, same kernels)."""
    return v2.Compose(
        [
            v2.RandomApply([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()], p=0.95),
            v2.RandomApply([v2.RandAugment(num_ops=2, magnitude=9)], p=0.65),
        ]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_batched_view_samples_the_reference_distribution(device):
    """Image statistics of many views of the same images, batched (on `device`) vs torchvision per
    image: the two samples must be indistinguishable (two-sample Kolmogorov-Smirnov)."""
    base, _ = make_shapes(16, 32, seed=3)
    images = base.repeat(150, 1, 1, 1)  # 2,400 views
    torch.manual_seed(0)
    batched = (reference_view(32)(images.to(device)) * 255).round().cpu()
    torchvision_view = _torchvision_view(32)
    reference = torch.stack([torchvision_view(image) for image in images]).float()

    def statistics(views):
        return {
            "mean": views.mean(dim=(1, 2, 3)),
            "contrast": views.std(dim=(1, 2, 3)),
            "black": (views.amax(1) == 0).float().mean(dim=(1, 2)),  # filled by geometry
            "left_right": (views[..., :16].mean(dim=(1, 2, 3)) - views[..., 16:].mean(dim=(1, 2, 3))),
        }

    ours, theirs = statistics(batched), statistics(reference)
    for name in ours:
        result = stats.ks_2samp(ours[name].numpy(), theirs[name].numpy())
        assert result.pvalue > 1e-3, f"{name}: KS statistic {result.statistic:.3f}, p={result.pvalue:.2g}"
