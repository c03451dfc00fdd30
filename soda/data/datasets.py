"""Labelled image sets decoded once into uint8 tensors [N, 3, H, W] and cached on disk.

Training then indexes one tensor (no per-epoch JPEG/PNG decoding, no loader workers).

The cache lives in `<root>/.soda-cache/`, one file per data set, split and image size, written
atomically and named after what it was built from: a hash of its files' paths, sizes and
modification times, found by stat alone (no file is read to list it). A file added, removed or
replaced changes the name, so the split is decoded again and the stale file deleted.

Processes that load the same folder at once (the ranks of a run, on one node or on several
sharing the folder) decode it once: the one that takes `<stem>.lock` (soda.files.OwnerLock, atomic
on local disks and on NFS) decodes and writes the cache while the others wait for the lock to go,
then read the cache. The holder keeps touching the lock; a lock whose holder is gone (an ended
process on this host, or no touch for LOCK_STALE_SECONDS) is taken over. Where no lock can be
created (a read-only folder, a full disk) or the holder leaves without a cache (it failed, or
could not write), each process decodes for itself, so nobody waits for a cache that will not come.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from soda.data.cache import Source, cache_key, load_cached
from soda.data.images import LabelledImages
from soda.data.shapes import CLASSES as SHAPE_CLASSES
from soda.data.shapes import make_shapes_with_factors
from soda.errors import DataError, first_line

log = logging.getLogger(__name__)

# Data sets read by a loader of their own (and from an image folder when root holds train/ or
# test/); shapes is generated. Any other name is an image folder: root/{train,test}/<class>/*.
OWN_LOADERS = ("cifar10", "cifar100", "tiny_imagenet")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test")
DECODE_CHUNK = 2048  # files per decoding task


def load_splits(
    name: str,
    root: str | os.PathLike,
    image_size: int,
    num_classes: int,
    download: bool = False,
    seed: int = 0,
    train_size: int = 0,
    test_size: int = 0,
) -> tuple[LabelledImages, LabelledImages]:
    """Train and test of a data set, with the same classes; `seed` and the sizes are used by
    `shapes` only. An image folder's class ids are its sorted folder names, so train/ and test/
    must hold the same class folders or the test labels would mean other classes. That and the
    class count are checked from the folder names, before anything is decoded."""
    if name == "shapes":
        return (
            load_split(name, root, "train", image_size, num_classes, seed=seed, size=train_size),
            load_split(name, root, "test", image_size, num_classes, seed=seed, size=test_size),
        )
    root = Path(root)
    train_source = _source(name, root, "train", image_size, download)
    test_source = _source(name, root, "test", image_size, download)
    _check_same_classes(root, train_source.classes, test_source.classes)
    if train_source.classes is not None:
        _check_class_count(root, train_source.classes, num_classes)
    train, test = load_cached(train_source), load_cached(test_source)
    _check_same_classes(root, train.classes, test.classes)
    _check_class_count(root, train.classes, num_classes)
    return train, test


def load_split(
    name: str,
    root: str | os.PathLike,
    split: str,
    image_size: int,
    num_classes: int,
    download: bool = False,
    seed: int = 0,
    size: int = 0,
) -> LabelledImages:
    """One split of a data set; `seed` and `size` are used by `shapes` only. A run loads both
    with `load_splits`, which also checks that they hold the same classes."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    if name == "shapes":
        # Train and test are drawn from disjoint seeds of the same generator.
        images, labels, factors = make_shapes_with_factors(
            size, image_size, seed=2 * seed + (split == "test"), num_classes=num_classes
        )
        return LabelledImages(images, labels, list(SHAPE_CLASSES[:num_classes]), factors)
    root = Path(root)
    source = _source(name, root, split, image_size, download)
    if source.classes is not None:
        _check_class_count(root, source.classes, num_classes)
    data = load_cached(source)
    _check_class_count(root, data.classes, num_classes)
    return data


def _check_class_count(root: Path, classes: list[str], num_classes: int) -> None:
    if len(classes) < 2:  # dataset.num_classes=1 is refused by the config: do not advise it
        raise DataError(
            f"{root} holds only 1 class ({', '.join(classes)}); the probes need at least 2 classes: "
            f"add class folders, train/<class>/ and test/<class>/"
        )
    if len(classes) != num_classes:
        raise DataError(
            f"{root} holds {len(classes)} classes but dataset.num_classes={num_classes}; "
            f"set dataset.num_classes={len(classes)}"
        )


def _check_same_classes(root: Path, train: list[str] | None, test: list[str] | None) -> None:
    if train is None or test is None or train == test:
        return
    sides = [
        f"only in {split}: {_some(sorted(set(mine) - set(theirs)))}"
        for split, mine, theirs in (("train", train, test), ("test", test, train))
        if set(mine) - set(theirs)
    ]
    raise DataError(
        f"image folder {root}: train/ and test/ hold different classes ({'; '.join(sides)}); "
        f"give both splits the same class folders"
    )


def _some(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# ---------------------------------------------------------------------------------------------
# What a split is built from, found by listing (stat only): its cache key, and how to decode it.


def _source(name: str, root: Path, split: str, image_size: int, download: bool) -> Source:
    stem = f"{name}-{split}-{image_size}px"
    if name == "tiny_imagenet" and _tiny_imagenet_base(root) is not None:
        return _tiny_imagenet(root, stem, split, image_size, download)
    # An image folder at the root serves every data set, both splits (a missing one is named); a
    # data set without a loader of its own (imagefolder, or a name of the user's) is only that.
    if name not in OWN_LOADERS or (root / "train").is_dir() or (root / "test").is_dir():
        return _image_folder(name, root, stem, split, image_size)
    if name in ("cifar10", "cifar100"):
        return _torchvision_cifar(name, root, stem, split, image_size, download)
    return _tiny_imagenet(root, stem, split, image_size, download)


def _missing(name: str, root: Path, what: str, download: bool = True) -> DataError:
    online = "" if download else ", set dataset.download=true on a machine that is online"
    return DataError(
        f"{name} not found under {root.resolve()} ({what}); put the files there (an image folder "
        f"train/<class>/*, test/<class>/* works for every data set){online}, or set "
        f"dataset.root=<the folder that holds them> (data_root=<dir> or SODA_DATA=<dir> reads <dir>/{name})"
    )


def _missing_folder(name: str, root: Path, split: str) -> DataError:
    """A data set without a loader of its own lacks a split's folder: say where the images go."""
    where = root.resolve()
    what = f"no {split}/ folder" if where.is_dir() else "the folder does not exist"
    return DataError(
        f"{name} not found under {where} ({name} is read as an image folder; {what}); put its images in "
        f"{where}/train/<class>/* and {where}/test/<class>/*, or set dataset.root=<the folder that holds "
        f"train/ and test/> (data_root=<dir> or SODA_DATA=<dir> reads <dir>/{name})"
    )


def _image_folder(name: str, root: Path, stem: str, split: str, image_size: int) -> Source:
    """root/split/<class>/** (class ids = sorted folder names); every file must be a readable image."""
    folder = root / split
    if not folder.is_dir():
        if name not in OWN_LOADERS:
            raise _missing_folder(name, root, split)
        raise _missing(name, root, f"no {split}/ folder")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class folders; expected {folder}/<class>/<image files>")
    files = []
    for label, class_name in enumerate(classes):
        entries = _files(p for p in (folder / class_name).rglob("*") if not p.name.startswith("."))
        if not entries:
            raise DataError(f"class folder {folder / class_name} is empty; remove it or add its images")
        files.extend((path, label, info) for path, info in entries)
    key = cache_key(image_size, classes, ((path.relative_to(folder), label, info) for path, label, info in files))
    pairs = [(path, label) for path, label, _ in files]
    return Source(root, stem, key, classes, decode=lambda: _decode_files(pairs, classes, image_size, folder))


def _files(paths: Iterable[Path]) -> list[tuple[Path, os.stat_result]]:
    """The regular files among `paths` (symlinks followed), sorted, with their stat: one
    system call a file, as much as telling a file from a folder costs anyway."""
    found = []
    for path in sorted(paths):
        try:
            info = path.stat()
        except OSError:  # a broken symlink, or gone since it was listed
            continue
        if stat.S_ISREG(info.st_mode):
            found.append((path, info))
    return found


def _torchvision_cifar(name: str, root: Path, stem: str, split: str, image_size: int, download: bool) -> Source:
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    folder = root / dataset_class.base_folder
    batches = dataset_class.train_list if split == "train" else dataset_class.test_list
    names = [file_name for file_name, _ in batches] + [dataset_class.meta["filename"]]
    present = dict(_files(folder / file_name for file_name in names))
    if len(present) == len(names):
        key = cache_key(image_size, [], ((path.name, 0, info) for path, info in present.items()))
        return Source(
            root, stem, key, None, decode=lambda: _decode_cifar(dataset_class, folder, split, image_size, download)
        )
    missing = sorted(set(names) - {path.name for path in present})
    what = f"no {folder.name}/" if not folder.is_dir() else f"{folder.name}/ lacks {', '.join(missing)}"
    if not download:
        raise _missing(name, root, f"{what} and dataset.download=false", download=False)

    def fetch() -> Source:
        try:
            dataset_class(str(root), train=split == "train", download=True)
        except Exception as error:  # URLError, socket errors, HTTP errors: all "could not download"
            raise _missing(name, root, f"download failed: {first_line(error, limit=1000)}") from None
        fetched = _torchvision_cifar(name, root, stem, split, image_size, download)
        if fetched.key is None:
            raise _missing(name, root, f"{what} after the download")
        return fetched

    return Source(root, stem, None, None, download=fetch)


def _decode_cifar(dataset_class, folder: Path, split: str, image_size: int, download: bool) -> LabelledImages:
    try:
        dataset = dataset_class(str(folder.parent), train=split == "train", download=False)
    except RuntimeError:  # every file is there (it was listed), so a checksum failed
        again = "rerun with dataset.download=true" if download else "set dataset.download=true"
        raise DataError(
            f"{folder} fails torchvision's checksum check (a partial or corrupt copy); delete the folder "
            f"and {again} on a machine that is online, or put a good copy there"
        ) from None
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    images = _resize(images, image_size)
    return LabelledImages(images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def _tiny_imagenet_base(root: Path) -> Path | None:
    if (root / "tiny-imagenet-200").is_dir():
        return root / "tiny-imagenet-200"
    if (root / "val" / "val_annotations.txt").is_file():  # the archive's contents at the root
        return root
    return None


def _tiny_imagenet(root: Path, stem: str, split: str, image_size: int, download: bool) -> Source:
    base = _tiny_imagenet_base(root)
    if base is None or not (base / "train").is_dir():
        if not download:
            raise _missing("tiny_imagenet", root, "no tiny-imagenet-200/ and dataset.download=false", download=False)

        def fetch() -> Source:
            from torchvision.datasets.utils import download_and_extract_archive

            fetched = _tiny_imagenet(root, stem, split, image_size, download)
            if fetched.key is not None:
                return fetched  # downloaded since (for the other split, or by another process)
            try:
                download_and_extract_archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(root))
            except Exception as error:
                raise _missing("tiny_imagenet", root, f"download failed: {type(error).__name__}") from None
            fetched = _tiny_imagenet(root, stem, split, image_size, download)
            if fetched.key is None:
                raise _missing("tiny_imagenet", root, "no tiny-imagenet-200/train after the download")
            return fetched

        return Source(root, stem, None, None, download=fetch)
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":
        files = [
            (path, index[c], info)
            for c in classes
            for path, info in _files((base / "train" / c).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise _missing("tiny_imagenet", root, f"{annotations} is missing")
        files = []
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(
                    f"{annotations}: line {line!r} does not name a training class (a folder of "
                    f"{base / 'train'}); correct or delete the line"
                )
            path = base / "val" / "images" / parts[0]
            try:
                files.append((path, index[parts[1]], path.stat()))
            except OSError:
                raise DataError(
                    f"{path}, listed in {annotations}, is missing; put it back or delete its line"
                ) from None
    key = cache_key(image_size, classes, ((path.relative_to(base), label, info) for path, label, info in files))
    pairs = [(path, label) for path, label, _ in files]
    return Source(root, stem, key, classes, decode=lambda: _decode_files(pairs, classes, image_size, base))


# ---------------------------------------------------------------------------------------------
# Decoding.


def _decode_files(files: list[tuple[Path, int]], classes: list[str], image_size: int, where: Path) -> LabelledImages:
    """Decode every file once, in threads (PIL releases the GIL while it decodes): CIFAR-10's
    60,000 JPEGs take about 13 s on one core."""
    if not files:
        raise DataError(f"no images found under {where}; put the images there")
    log.info("decoding %d images under %s", len(files), where)
    images = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)

    def decode(start: int) -> None:
        for i in range(start, min(start + DECODE_CHUNK, len(files))):
            images[i] = _decode_one(files[i][0], image_size)

    workers = min(8, os.cpu_count() or 1, math.ceil(len(files) / DECODE_CHUNK))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done in pool.map(decode, range(0, len(files), DECODE_CHUNK)):
            del done  # map re-raises a chunk's DataError here
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return LabelledImages(images, labels, classes)


def _decode_one(path: Path, image_size: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"{path} is not a readable image ({type(error).__name__}); delete or replace it") from None


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    resized = torch.nn.functional.interpolate(
        images.float(), size=(image_size, image_size), mode="bicubic", antialias=True
    )
    return resized.round().clamp(0, 255).to(torch.uint8)
