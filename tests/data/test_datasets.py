import json
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from soda.config import DatasetConfig
from soda.data import cache, datasets, load_split, load_splits
from soda.data.augment import sample_crop_boxes
from soda.data.shapes import CLASSES, FACTORS, make_shapes, make_shapes_with_factors
from soda.errors import DataError
from tests.helpers import REPO, file_size_limit, reference_view


def _write_tree(root: Path, split: str, classes: dict[str, int], size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def _cache_files(root: Path) -> list[str]:
    return sorted(path.name for path in (root / ".soda-cache").glob("*.pt"))


def _no_decoding(monkeypatch):
    """From here on, decoding an image fails the test: what is loaded must come from the cache."""

    def refuse(path, image_size):
        raise AssertionError(f"{path} was decoded again")

    monkeypatch.setattr(datasets, "_decode_one", refuse)


def test_image_folder_is_decoded_with_sorted_class_ids_and_cached(tmp_path, monkeypatch):
    _write_tree(tmp_path, "train", {"zebra": 3, "ant": 2})
    data = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    assert data.images.shape == (5, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.classes == ["ant", "zebra"] and data.labels.tolist() == [0, 0, 1, 1, 1]
    expected = np.array(Image.open(tmp_path / "train" / "ant" / "000.png"))
    assert torch.equal(data.images[0].permute(1, 2, 0), torch.from_numpy(expected))
    [cache] = _cache_files(tmp_path)
    assert re.fullmatch(r"imagefolder-train-8px-[0-9a-f]{16}\.pt", cache)
    _no_decoding(monkeypatch)
    again = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)


def test_cache_is_rebuilt_when_a_class_folder_is_added(tmp_path):
    # The class count error must name the folder as it is now, not as it was cached.
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    _write_tree(tmp_path, "train", {"c": 2}, seed=1)
    with pytest.raises(DataError, match=r"holds 3 classes but dataset.num_classes=2"):
        load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    data = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=3)
    assert data.classes == ["a", "b", "c"] and data.labels.tolist() == [0, 1, 2, 2]


def test_cache_is_rebuilt_when_an_image_is_replaced_or_removed(tmp_path):
    _write_tree(tmp_path, "train", {"a": 2, "b": 2})
    first = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    replaced = tmp_path / "train" / "b" / "000.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(replaced)
    os.utime(replaced, ns=(0, 1_000_000_000))  # a replaced file can have any mtime, even an older one
    second = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    assert torch.equal(second.images[:2], first.images[:2])
    assert (second.images[2] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()
    (tmp_path / "train" / "a" / "001.png").unlink()
    third = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    assert third.labels.tolist() == [0, 1, 1]
    # One cache file per data set, split and size: the stale ones are gone.
    assert len(_cache_files(tmp_path)) == 1


def test_cache_is_per_image_size(tmp_path, monkeypatch):
    _write_tree(tmp_path, "train", {"a": 1, "b": 1}, size=16)
    small = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    large = load_split("imagefolder", tmp_path, "train", image_size=16, num_classes=2)
    assert len(_cache_files(tmp_path)) == 2
    _no_decoding(monkeypatch)
    assert torch.equal(load_split("imagefolder", tmp_path, "train", 8, 2).images, small.images)
    assert torch.equal(load_split("imagefolder", tmp_path, "train", 16, 2).images, large.images)


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


def test_corrupt_cache_is_decoded_again_with_a_warning(tmp_path, caplog):
    # The cache's name says what it was built from; an unreadable one is rebuilt from the same
    # files, which gives the same tensors.
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    first = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    [name] = _cache_files(tmp_path)
    cache = tmp_path / ".soda-cache" / name
    cache.write_bytes(cache.read_bytes()[:100])
    again = load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)
    assert torch.equal(again.images, first.images)
    warnings = [record.getMessage() for record in caplog.records if "is unreadable" in record.getMessage()]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "decoding again" in warnings[0]
    assert torch.load(cache, weights_only=True)["images"].shape == (2, 3, 8, 8)  # rewritten


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


def test_shapes_factors_describe_the_images_they_made():
    images, labels, factors = make_shapes_with_factors(600, 32, seed=1)
    assert torch.equal(images, make_shapes(600, 32, seed=1)[0])  # drawing the factors changes nothing
    assert set(factors) == set(FACTORS) and torch.equal(factors["shape"], labels)
    assert all(values.shape[0] == 600 for values in factors.values())
    # Rotation is undefined exactly for the classes that look the same at every angle.
    symmetric = torch.isin(labels, torch.tensor([CLASSES.index("disk"), CLASSES.index("ring")]))
    assert torch.equal(factors["rotation"].isnan().any(1), symmetric)
    # The bright (shape) pixels' centroid follows the position factor, their count the size.
    bright = (images.float().mean(1) > 255 * 0.5).float()  # shapes are >= 0.6, backgrounds <= 0.4
    axis = (torch.arange(32) + 0.5) / 32 * 2 - 1
    area = bright.sum((1, 2))
    centroid_x = (bright * axis[None, None, :]).sum((1, 2)) / area
    assert torch.corrcoef(torch.stack([centroid_x, factors["position"][:, 0]]))[0, 1] > 0.9
    disks = labels == CLASSES.index("disk")
    assert torch.corrcoef(torch.stack([area[disks], factors["size"][disks, 0]]))[0, 1] > 0.9
    # A subset keeps each image's factors with it.
    split = load_split("shapes", "none", "train", 16, 6, seed=0, size=60).subset(25)
    assert all(values.shape[0] == 25 for values in split.factors.values())
    assert torch.equal(split.factors["shape"], split.labels)


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
    _tiny_imagenet(tmp_path)
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


def _fake_cifar10(root: Path, seed: int = 0) -> None:
    """torchvision's cifar-10-batches-py layout, 2 images per batch file (checksums are patched)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3 * 32 * 32), dtype=np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", *[f"c{i}" for i in range(2, 10)]]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar_batches_are_cached_and_decoded_again_when_a_batch_file_changes(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    _fake_cifar10(tmp_path)
    first = load_split("cifar10", tmp_path, "train", image_size=32, num_classes=10)
    assert first.images.shape == (10, 3, 32, 32) and first.classes[:2] == ["airplane", "automobile"]
    assert re.fullmatch(r"cifar10-train-32px-[0-9a-f]{16}\.pt", _cache_files(tmp_path)[0])
    _fake_cifar10(tmp_path, seed=1)  # the same names and sizes, other contents, a new mtime
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        os.utime(path, ns=(0, 2_000_000_000))
    second = load_split("cifar10", tmp_path, "train", image_size=32, num_classes=10)
    assert not torch.equal(second.images, first.images)
    assert len(_cache_files(tmp_path)) == 1


def test_corrupt_cifar_batches_are_not_called_missing(tmp_path):
    # The real checksums fail on these files: the message must not say that nothing is there.
    _fake_cifar10(tmp_path)
    with pytest.raises(DataError) as error:
        load_split("cifar10", tmp_path, "train", image_size=32, num_classes=10, download=False)
    message = str(error.value)
    assert "checksum" in message and "not found" not in message and "\n" not in message


def _tiny_imagenet(root: Path) -> Path:
    base = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    for wnid in ("n02", "n01"):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{wnid}_{i}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("not an image, and skipped\n")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate(("n02", "n01", "n02")):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t8\t8")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_tiny_imagenet_cache_follows_its_files(tmp_path):
    base = _tiny_imagenet(tmp_path)
    assert len(load_split("tiny_imagenet", tmp_path, "train", image_size=8, num_classes=2)) == 4
    assert len(load_split("tiny_imagenet", tmp_path, "test", image_size=8, num_classes=2)) == 3
    Image.new("RGB", (8, 8)).save(base / "train" / "n01" / "images" / "n01_9.JPEG")
    with (base / "val" / "val_annotations.txt").open("a") as annotations:
        annotations.write("val_0.JPEG\tn01\t0\t0\t8\t8\n")
    train = load_split("tiny_imagenet", tmp_path, "train", image_size=8, num_classes=2)
    test = load_split("tiny_imagenet", tmp_path, "test", image_size=8, num_classes=2)
    assert train.labels.tolist() == [0, 0, 0, 1, 1] and test.labels.tolist() == [1, 0, 1, 0]


def test_tiny_imagenet_is_downloaded_once_for_both_splits(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    downloads = []

    def download_and_extract_archive(url, root):
        downloads.append(url)
        _tiny_imagenet(Path(root))

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", download_and_extract_archive)
    train, test = load_splits("tiny_imagenet", tmp_path / "tiny", image_size=8, num_classes=2, download=True)
    assert len(downloads) == 1 and len(train) == 4 and len(test) == 3
    assert len(_cache_files(tmp_path / "tiny")) == 2


def test_tiny_imagenet_annotation_naming_a_missing_image_is_named(tmp_path):
    base = _tiny_imagenet(tmp_path)
    (base / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DataError, match=r"val_1.JPEG.* is missing"):
        load_split("tiny_imagenet", tmp_path, "test", image_size=8, num_classes=2)


# ------------------------------------------------------------------------------------------------
# Both splits together.


def test_train_and_test_with_other_classes_is_one_line_naming_them(tmp_path, monkeypatch):
    _write_tree(tmp_path, "train", {"cat": 1, "dog": 1, "bird": 1})
    _write_tree(tmp_path, "test", {"cat": 1, "dog": 1, "fish": 1, "ant": 1})
    _no_decoding(monkeypatch)  # found from the folder names, before any image is decoded
    with pytest.raises(DataError) as error:
        # A class count that fits neither split: the mismatch is what must be fixed first.
        load_splits("imagefolder", tmp_path, image_size=8, num_classes=3)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "only in train: bird; only in test: ant, fish" in message and "same class folders" in message


def test_load_splits_gives_both_splits_with_the_same_classes(tmp_path):
    _write_tree(tmp_path, "train", {"cat": 2, "dog": 1})
    _write_tree(tmp_path, "test", {"dog": 1, "cat": 1}, seed=1)
    train, test = load_splits("imagefolder", tmp_path, image_size=8, num_classes=2)
    assert train.classes == test.classes == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [0, 1]
    shapes_train, shapes_test = load_splits("shapes", "none", 16, 6, seed=0, train_size=30, test_size=12)
    assert len(shapes_train) == 30 and len(shapes_test) == 12
    assert torch.equal(shapes_train.images, load_split("shapes", "none", "train", 16, 6, seed=0, size=30).images)


def test_cifar10_root_with_an_image_folder_missing_its_test_split_says_so(tmp_path):
    # Not "cifar-10-batches-py not found": the folder is an image folder lacking test/.
    _write_tree(tmp_path, "train", {f"c{i}": 1 for i in range(10)})
    with pytest.raises(DataError, match=r"no test/ folder"):
        load_splits("cifar10", tmp_path, image_size=8, num_classes=10, download=False)


# ------------------------------------------------------------------------------------------------
# Advice in an error leads to a command that works.


def test_class_count_advice_is_a_count_the_config_accepts(tmp_path):
    _write_tree(tmp_path, "train", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError) as error:
        load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=10)
    count = int(re.search(r"set dataset.num_classes=(\d+)", str(error.value)).group(1))
    DatasetConfig(
        name="imagefolder",
        root=str(tmp_path),
        image_size=8,
        num_classes=count,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        download=False,
    )
    assert len(load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=count)) == 3


def test_one_class_says_to_add_classes_not_to_set_a_count_of_one(tmp_path, monkeypatch):
    _write_tree(tmp_path, "train", {"cat": 2})
    _write_tree(tmp_path, "test", {"cat": 1})
    _no_decoding(monkeypatch)  # known from the folder names
    with pytest.raises(DataError) as error:
        load_splits("imagefolder", tmp_path, image_size=8, num_classes=2)
    message = str(error.value)
    assert "num_classes=1" not in message and "at least 2 classes" in message and "add class folders" in message


@pytest.mark.parametrize("name", ["cifar10", "tiny_imagenet"])
def test_missing_data_offline_names_the_settings_that_find_it(tmp_path, name):
    with pytest.raises(DataError) as error:
        load_split(name, tmp_path / name, "train", image_size=32, num_classes=10, download=False)
    message = str(error.value)
    # dataset.root takes the folder itself, SODA_DATA the one above it (root = $SODA_DATA/<name>).
    assert "dataset.root=" in message and f"SODA_DATA=<dir> reads <dir>/{name}" in message
    assert "dataset.download=true" in message


# ------------------------------------------------------------------------------------------------
# Several processes, one cache.


# One of several processes loading the same folder at once: each decoded image takes 50 ms and
# appends "<pid> <path>" to decoded.txt. Only soda.data is imported, to start fast.
RANK_SCRIPT = """
import os, sys, time
from pathlib import Path
import torch
from soda.data import datasets, load_splits

rank, folder = int(sys.argv[1]), Path(sys.argv[2])
decode = datasets._decode_one

def counted(path, image_size):
    with (folder / "decoded.txt").open("a") as lines:
        lines.write(f"{os.getpid()} {path}\\n")
    time.sleep(0.05)
    return decode(path, image_size)

datasets._decode_one = counted
(folder / f"ready{rank}").touch()
while not all((folder / f"ready{other}").exists() for other in range(2)):
    time.sleep(0.01)  # start together, so that they contend for the cache
train, test = load_splits("imagefolder", folder / "images", image_size=8, num_classes=2)
torch.save({"train": train.images, "test": test.images}, folder / f"rank{rank}.pt")
"""


@pytest.mark.integration
def test_processes_sharing_a_cache_decode_it_once(tmp_path):
    _write_tree(tmp_path / "images", "train", {"a": 10, "b": 10})
    _write_tree(tmp_path / "images", "test", {"a": 4, "b": 4}, seed=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank in ranks:
        output, _ = rank.communicate(timeout=180)
        assert rank.returncode == 0, output[-3000:]
    decoded = [line.split(" ", 1) for line in (tmp_path / "decoded.txt").read_text().splitlines()]
    assert sorted(path for _, path in decoded) == sorted(str(p) for p in (tmp_path / "images").rglob("*.png"))
    for split in ("train", "test"):  # each split by one process
        assert len({pid for pid, path in decoded if f"/images/{split}/" in path}) == 1
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2))
    assert torch.equal(first["train"], second["train"]) and torch.equal(first["test"], second["test"])
    assert not list((tmp_path / "images" / ".soda-cache").glob("*.lock"))


def _lock_path(root: Path, stem: str) -> Path:
    return root / ".soda-cache" / f"{stem}.lock"


def test_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = _lock_path(tmp_path, "imagefolder-train-8px")
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(finished.stdout)}))
    started = time.monotonic()
    assert len(load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)) == 2
    assert time.monotonic() - started < 5 and not lock.exists()


def test_lock_that_stops_being_refreshed_is_taken_over(tmp_path, monkeypatch):
    # A holder on another node that died: its lock's mtime stops changing.
    monkeypatch.setattr(cache, "LOCK_STALE_SECONDS", 0.5)
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    lock = _lock_path(tmp_path, "imagefolder-train-8px")
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": "some-other-node", "pid": 12345}))
    assert len(load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)) == 2
    assert not lock.exists()


def test_waiter_decodes_itself_when_the_holder_gives_up_without_a_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="soda.data.datasets")
    # The holder failed (its own error is on its own line) or could not write the cache: the
    # waiter does not wait forever, and reports its own result or error.
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    lock = _lock_path(tmp_path, "imagefolder-train-8px")
    lock.parent.mkdir()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # alive: our parent
    threading.Timer(0.5, lock.unlink).start()
    assert len(load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)) == 2
    assert any("waiting" in record.getMessage() for record in caplog.records)


def test_cache_folder_that_cannot_be_created_costs_only_the_cache(tmp_path):
    # No lock can be taken there either, so nobody waits: each process decodes for itself.
    _write_tree(tmp_path, "train", {"a": 1, "b": 1})
    (tmp_path / ".soda-cache").write_text("a file where the cache folder would go")
    assert len(load_split("imagefolder", tmp_path, "train", image_size=8, num_classes=2)) == 2
