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

import hashlib
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from soda.data.shapes import CLASSES as SHAPE_CLASSES
from soda.data.shapes import make_shapes_with_factors
from soda.errors import DataError, first_line
from soda.files import LockContended, OwnerLock, describe, write_atomically

log = logging.getLogger(__name__)

# Data sets read by a loader of their own (and from an image folder when root holds train/ or
# test/); shapes is generated. Any other name is an image folder: root/{train,test}/<class>/*.
OWN_LOADERS = ("cifar10", "cifar100", "tiny_imagenet")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test")
CACHE_FOLDER = ".soda-cache"
CACHE_VERSION = 2  # part of every cache key: a new layout is a new name
DECODE_CHUNK = 2048  # files per decoding task
LOCK_REFRESH_SECONDS = 10.0  # how often the decoding process touches its lock
# A lock untouched this long has lost its holder (killed on another node). Generous, because an
# NFS client may show another client's mtime up to a minute late (attribute caching).
LOCK_STALE_SECONDS = 180.0
LOCK_POLL_SECONDS = 0.25


@dataclass
class LabelledImages:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    # How each image was made, where the data set knows (`shapes`): name -> [N] int64 (discrete)
    # or [N, k] float (continuous); the factor probes read them (soda.eval.factor_probes).
    factors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, limit: int | None) -> LabelledImages:
        """`limit` images drawn by a fixed permutation (the same for every run, whatever its
        seed), so a limited run sees every class and runs of one study see the same images."""
        if limit is None or limit >= len(self):
            return self
        chosen = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        factors = {name: values[chosen] for name, values in self.factors.items()}
        return LabelledImages(self.images[chosen], self.labels[chosen], self.classes, factors)


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
    train, test = _load(train_source), _load(test_source)
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
    data = _load(source)
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


@dataclass
class _Source:
    root: Path
    stem: str  # the cache file's name before its key: "<name>-<split>-<size>px"
    key: str | None  # hash of the files it is built from; None until they are downloaded
    classes: list[str] | None  # known before decoding for image folders
    decode: Callable[[], LabelledImages] | None = None
    download: Callable[[], _Source] | None = None  # fetches the files, then lists them

    @property
    def cache(self) -> Path:
        return self.root / CACHE_FOLDER / f"{self.stem}-{self.key}.pt"


def _source(name: str, root: Path, split: str, image_size: int, download: bool) -> _Source:
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


def _key(image_size: int, classes: list[str], entries: Iterable[tuple[str, int, os.stat_result]]) -> str:
    """Hash of (path, label, size, mtime) of every file: what a decoded split depends on."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size}px {classes!r}\n".encode())
    for path, label, info in entries:
        digest.update(f"{path}\t{label}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


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


def _image_folder(name: str, root: Path, stem: str, split: str, image_size: int) -> _Source:
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
    key = _key(image_size, classes, ((path.relative_to(folder), label, info) for path, label, info in files))
    pairs = [(path, label) for path, label, _ in files]
    return _Source(root, stem, key, classes, decode=lambda: _decode_files(pairs, classes, image_size, folder))


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


def _torchvision_cifar(name: str, root: Path, stem: str, split: str, image_size: int, download: bool) -> _Source:
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    folder = root / dataset_class.base_folder
    batches = dataset_class.train_list if split == "train" else dataset_class.test_list
    names = [file_name for file_name, _ in batches] + [dataset_class.meta["filename"]]
    present = dict(_files(folder / file_name for file_name in names))
    if len(present) == len(names):
        key = _key(image_size, [], ((path.name, 0, info) for path, info in present.items()))
        return _Source(
            root, stem, key, None, decode=lambda: _decode_cifar(dataset_class, folder, split, image_size, download)
        )
    missing = sorted(set(names) - {path.name for path in present})
    what = f"no {folder.name}/" if not folder.is_dir() else f"{folder.name}/ lacks {', '.join(missing)}"
    if not download:
        raise _missing(name, root, f"{what} and dataset.download=false", download=False)

    def fetch() -> _Source:
        try:
            dataset_class(str(root), train=split == "train", download=True)
        except Exception as error:  # URLError, socket errors, HTTP errors: all "could not download"
            raise _missing(name, root, f"download failed: {first_line(error, limit=1000)}") from None
        fetched = _torchvision_cifar(name, root, stem, split, image_size, download)
        if fetched.key is None:
            raise _missing(name, root, f"{what} after the download")
        return fetched

    return _Source(root, stem, None, None, download=fetch)


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


def _tiny_imagenet(root: Path, stem: str, split: str, image_size: int, download: bool) -> _Source:
    base = _tiny_imagenet_base(root)
    if base is None or not (base / "train").is_dir():
        if not download:
            raise _missing("tiny_imagenet", root, "no tiny-imagenet-200/ and dataset.download=false", download=False)

        def fetch() -> _Source:
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

        return _Source(root, stem, None, None, download=fetch)
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
    key = _key(image_size, classes, ((path.relative_to(base), label, info) for path, label, info in files))
    pairs = [(path, label) for path, label, _ in files]
    return _Source(root, stem, key, classes, decode=lambda: _decode_files(pairs, classes, image_size, base))


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


# ---------------------------------------------------------------------------------------------
# The cache, and the lock that lets one process of several build it.


def _load(source: _Source) -> LabelledImages:
    tried = source.key is not None and source.cache.is_file()
    if tried and (data := _read_cache(source)) is not None:
        return data
    with _DecodeLock(source.root / CACHE_FOLDER / f"{source.stem}.lock"):
        # Holding the lock, or after its holder let it go: the cache may be there by now.
        if source.key is None:
            source = source.download()
        data = _read_cache(source, warn=not tried)
        if data is None:
            data = source.decode()
            _write_cache(source, data)
    return data


def _read_cache(source: _Source, warn: bool = True) -> LabelledImages | None:
    """The cached split, or None: absent, of an older layout, or unreadable. The name says what
    it was built from, so an unreadable one (a disk error, a copy cut short) is decoded again
    from the same files, which gives the same tensors."""
    path = source.cache
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != CACHE_VERSION or payload.get("key") != source.key:
            return None
        return LabelledImages(payload["images"], payload["labels"], list(payload["classes"]))
    except Exception as error:
        if warn:
            log.warning("decoded-data cache %s is unreadable (%s); decoding again", path, type(error).__name__)
        return None


def _write_cache(source: _Source, data: LabelledImages) -> None:
    path = source.cache
    cache = {
        "version": CACHE_VERSION,
        "key": source.key,
        "images": data.images,
        "labels": data.labels,
        "classes": data.classes,
    }
    try:
        write_atomically(path, lambda handle: torch.save(cache, handle))
    except OSError as error:
        # A read-only or full data folder still trains; it just decodes again next time.
        log.warning("cannot write decoded-data cache %s (%s); the next run decodes again", path, error.strerror)
        return
    # The caches of this split and size built from earlier files (and those of CACHE_VERSION 1,
    # named without a key) can never be read again.
    stale = re.compile(re.escape(source.stem) + r"(-[0-9a-f]{16})?\.pt")
    for other in path.parent.iterdir():
        if other != path and stale.fullmatch(other.name):
            try:
                other.unlink(missing_ok=True)
            except OSError:
                pass  # it only takes room


class _DecodeLock:
    """`with _DecodeLock(path):` returns once this process holds the lock, or once another
    process that held it let it go (then this one reads that one's cache, or decodes for itself
    if there is none), or at once where no lock can be created."""

    def __init__(self, path: Path):
        # The ranks of one SLURM job on several nodes share this lock: a lock of our own job is a
        # peer's, not one left before a requeue (no requeue_takes_over).
        self.lock = OwnerLock(path, refresh_seconds=LOCK_REFRESH_SECONDS, stale_after_seconds=LOCK_STALE_SECONDS)

    def __enter__(self) -> _DecodeLock:
        try:
            self.lock.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return self  # a read-only folder, or the cache folder's name taken by a file: no cache, no lock
        while True:
            try:
                owner = self.lock.try_acquire()
            except LockContended:
                continue
            except OSError:
                return self  # a read-only folder or a full disk: every process decodes for itself
            if owner is None:
                break
            gone = self._wait(owner)
            if gone is None:
                return self  # released by its owner
            self.lock.take_over(gone)
        if self.lock.previous_owner is not None:
            log.warning("taking over %s from %s, which is gone", self.lock.path, describe(self.lock.previous_owner))
        return self

    def __exit__(self, *exc_info) -> None:
        self.lock.release()

    def _wait(self, owner: dict) -> dict | None:
        """Waits while the lock's owner works: None once it lets go, or the owner once it is
        gone without letting go."""
        log.info("waiting for %s to decode (lock %s)", describe(owner), self.lock.path)
        seen, changed = None, time.monotonic()
        while True:
            try:
                mtime = self.lock.path.stat().st_mtime_ns
            except FileNotFoundError:
                return None
            owner = self.lock.owner()
            if owner is None:
                return None
            if self.lock.stale(owner):
                return owner
            # `stale` judges the lock's age by the clocks, and not on this host. A lock whose touches
            # stop for as long, timed as seen by this machine's clock, has lost its owner too: a hung
            # process, or a node whose clock runs behind (an NFS client may show a touch a minute late).
            if mtime != seen:
                seen, changed = mtime, time.monotonic()
            elif time.monotonic() - changed > self.lock.stale_after_seconds:
                return owner
            time.sleep(LOCK_POLL_SECONDS)
