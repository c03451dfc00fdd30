from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from soda.data import load_split
from soda.data.augment import sample_crop_boxes
from soda.data.shapes import make_shapes
from soda.errors import DataError
from tests.helpers import file_size_limit, reference_view


def _write_tree(root: Path, split: str, classes: dict[str, int], size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_image_folder_is_decoded_with_sorted_class_ids_and_cached(tmp_path):
    _write_tree(tmp_path, "train", {"zebra": 3, "ant": 2})
    data = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    assert data.images.shape == (5, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.classes == ["ant", "zebra"] and data.labels.tolist() == [0, 0, 1, 1, 1]
    expected = np.array(Image.open(tmp_path / "train" / "ant" / "000.png"))
    assert torch.equal(data.images[0].permute(1, 2, 0), torch.from_numpy(expected))
    cache = tmp_path / ".soda-cache" / "imagefolder-train-8px.pt"
    assert cache.exists()
    # The second load comes from the cache: the images are no longer needed.
    for png in (tmp_path / "train").rglob("*.png"):
        png.unlink()
    again = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    assert torch.equal(again.images, data.images)


def test_cifar10_accepts_the_image_folder_layout_at_its_root(tmp_path):
    _write_tree(tmp_path, "test", {f"c{i}": 1 for i in range(10)})
    data = load_split("cifar10", tmp_path, "test", image_size=8, num_classes=10, download=False)
    assert len(data) == 10 and data.labels.tolist() == list(range(10))


def test_images_of_another_size_are_resized(tmp_path):
    _write_tree(tmp_path, "train", {"a": 1, "b": 1}, size=20)
    assert load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2).images.shape == (2, 3, 8, 8)


def test_missing_cifar_offline_is_a_one_line_error_saying_where(tmp_path):
    with pytest.raises(DataError) as error:
        load_split("cifar10", tmp_path / "nothing", "train", image_size=32, num_classes=10, download=False)
    message = str(error.value)
    assert "\n" not in message and str((tmp_path / "nothing").resolve()) in message and "SODA_DATA" in message


def test_non_image_file_and_empty_class_folder_are_named(tmp_path):
    _write_tree(tmp_path, "train", {"a": 2, "b": 2})
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes.txt is not a readable image"):
        load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    (tmp_path / "train" / "b" / "notes.txt").unlink()
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/c is empty"):
        load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=3)


def test_truncated_image_is_named(tmp_path):
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    path = tmp_path / "train" / "a" / "000.png"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match=r"000.png is not a readable image"):
        load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)


def test_wrong_class_count_is_an_error(tmp_path):
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"holds 2 classes but dataset.num_classes=10"):
        load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=10)


def test_a_folder_that_cannot_take_the_cache_still_loads(tmp_path):
    # A full or read-only data folder only costs the cache (torch.save hides the refused write
    # behind a RuntimeError, which used to escape); no partial cache file is left.
    # 48 KB of pixels: more than the write buffer, so the refusal comes from inside torch.save.
    _write_tree(tmp_path, "train", {"ant": 2, "zebra": 2}, size=64)
    with file_size_limit(1_000):
        data = load_split("imagefolder", tmp_path, "train", image_size=64, num_classes=2)
    assert data.images.shape == (4, 3, 64, 64)
    assert list((tmp_path / ".soda-cache").iterdir()) == []


def test_corrupt_cache_is_an_error_that_says_to_delete_it(tmp_path):
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    cache = tmp_path / ".soda-cache" / "imagefolder-train-8px.pt"
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(DataError, match=r"unreadable .*delete it"):
        load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)


def test_shapes_are_deterministic_for_a_seed_and_balanced():
    first, labels = make_shapes(120, 16, seed=3)
    second, labels_again = make_shapes(120, 16, seed=3)
    other, _ = make_shapes(120, 16, seed=4)
    assert torch.equal(first, second) and torch.equal(labels, labels_again)
    assert not torch.equal(first, other)
    assert torch.bincount(labels).tolist() == [20] * 6
    train = load_split("shapes", "none", "train", 16, 6, seed=0, size=60)
    test = load_split("shapes", "none", "test", 16, 6, seed=0, size=60)
    assert not torch.equal(train.images, test.images)


def test_shapes_colour_tint_says_nothing_about_the_class():
    images, labels = make_shapes(3000, 16, seed=0)
    mean_colour = images.float().mean(dim=(2, 3))
    tint = mean_colour / mean_colour.sum(1, keepdim=True)  # chromaticity, brightness removed
    per_class = torch.stack([tint[labels == c].mean(0) for c in range(6)])
    assert (per_class.max(0).values - per_class.min(0).values).max() < 0.01
    # A nearest-class-mean classifier on the tint is at chance (1/6).
    assert (torch.cdist(tint, per_class).argmin(1) == labels).float().mean() < 0.22


def test_crop_boxes_stay_inside_the_image_and_follow_the_scale_range():
    boxes = sample_crop_boxes(20_000, 32, 32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w / 1024).sort().values
    assert area.min() >= 0.06 and area.max() <= 1.0
    # The same distribution as torchvision's own RandomResizedCrop (its rejection of boxes that
    # do not fit pulls the mean area below U(0.08, 1)'s 0.54): compare quantiles.
    reference = (
        torch.tensor(
            [
                (lambda p: p[2] * p[3] / 1024)(
                    RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                )
                for _ in range(20_000)
            ]
        )
        .sort()
        .values
    )
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert torch.allclose(area.quantile(quantiles), reference.float().quantile(quantiles), atol=0.02)


def test_full_image_crop_with_flip_is_an_exact_mirror():
    images, _ = make_shapes(4, 16, seed=0)
    mirror = reference_view(16, crop_prob=1.0, crop_scale=(1, 1), crop_ratio=(1, 1), flip_prob=1.0, randaugment_prob=0)
    assert torch.equal((mirror(images) * 255).round().to(torch.uint8), images.flip(-1))
    identity = reference_view(16, crop_prob=0.0, randaugment_prob=0.0)
    assert torch.equal(identity(images), images.float() / 255)


def test_reference_view_changes_images_with_per_image_parameters():
    images, _ = make_shapes(64, 16, seed=0)
    views = reference_view(16)(images)
    assert views.shape == (64, 3, 16, 16) and 0 <= views.min() and views.max() <= 1
    changed = ((views * 255).round() != images.float()).flatten(1).any(1)
    assert changed.float().mean() > 0.9


def test_tiny_imagenet_layout_with_val_annotations(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    for wnid in ("n02", "n01"):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(("n02", "n01", "n02")):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train = load_split("tiny_imagenet", tmp_path, "train", image_size=8, num_classes=2, download=False)
    test = load_split("tiny_imagenet", tmp_path, "test", image_size=8, num_classes=2, download=False)
    assert train.classes == ["n01", "n02"] and train.labels.tolist() == [0, 0, 1, 1]
    assert test.labels.tolist() == [1, 0, 1]


def test_limited_split_is_a_fixed_subset_covering_the_classes():
    data = load_split("shapes", "none", "train", 16, 6, seed=0, size=600)
    data.labels = data.labels.sort().values  # class-sorted, like an image folder
    first, again = data.subset(60), data.subset(60)
    assert torch.equal(first.labels, again.labels) and len(first) == 60
    assert set(first.labels.tolist()) == set(range(6))
