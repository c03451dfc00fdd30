"""Labelled image sets decoded once into uint8 tensors [N, 3, H, W] and cached on disk.

Training then indexes one tensor (no per-epoch JPEG/PNG decoding, no loader workers). The cache
lives in `<root>/.soda-cache/`, is written atomically and is keyed by split and image size.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from soda.data.shapes import CLASSES as SHAPE_CLASSES
from soda.data.shapes import make_shapes
from soda.errors import DataError, first_line
from soda.files import write_atomically

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test")
CACHE_VERSION = 1
DECODE_CHUNK = 2048  # files per decoding task


@dataclass
class LabelledImages:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, limit: int | None) -> LabelledImages:
        """`limit` images drawn by a fixed permutation (the same for every run, whatever its
        seed), so a limited run sees every class and runs of one study see the same images."""
        if limit is None or limit >= len(self):
            return self
        chosen = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        return LabelledImages(self.images[chosen], self.labels[chosen], self.classes)


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
    """One split of a data set; `seed` and `size` are used by `shapes` only."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    if name == "shapes":
        # Train and test are drawn from disjoint seeds of the same generator.
        images, labels = make_shapes(size, image_size, seed=2 * seed + (split == "test"), num_classes=num_classes)
        return LabelledImages(images, labels, list(SHAPE_CLASSES[:num_classes]))
    root = Path(root)
    cache = root / ".soda-cache" / f"{name}-{split}-{image_size}px.pt"
    data = _read_cache(cache) if cache.exists() else None
    if data is None:
        data = _decode(name, root, split, image_size, download)
        _write_cache(cache, data)
    if len(data.classes) != num_classes:
        raise DataError(
            f"{root} holds {len(data.classes)} classes but dataset.num_classes={num_classes}; "
            f"set dataset.num_classes={len(data.classes)}"
        )
    return data


def _decode(name: str, root: Path, split: str, image_size: int, download: bool) -> LabelledImages:
    if (root / split).is_dir() or (name == "imagefolder"):
        return decode_image_folder(root / split, image_size)
    if name in ("cifar10", "cifar100"):
        return _torchvision_cifar(name, root, split, image_size, download)
    if name == "tiny_imagenet":
        return _tiny_imagenet(root, split, image_size, download)
    raise DataError(f"dataset {name!r} has no loader")


def _missing(name: str, root: Path, what: str) -> DataError:
    return DataError(
        f"{name} not found under {root.resolve()} ({what}); put the files there (an image folder "
        f"train/<class>/*, test/<class>/* works for every data set), or point SODA_DATA or "
        f"dataset.root at where they are"
    )


def _torchvision_cifar(name: str, root: Path, split: str, image_size: int, download: bool) -> LabelledImages:
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        dataset = dataset_class(str(root), train=split == "train", download=False)
    except RuntimeError:
        if not download:
            raise _missing(name, root, "no cifar-*-batches-py and dataset.download=false") from None
        try:
            dataset = dataset_class(str(root), train=split == "train", download=True)
        except Exception as error:  # URLError, socket errors, HTTP errors: all "could not download"
            reason = first_line(error, limit=1000)
            raise _missing(name, root, f"download failed: {reason}") from None
    images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
    images = _resize(images, image_size)
    return LabelledImages(images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def _tiny_imagenet(root: Path, split: str, image_size: int, download: bool) -> LabelledImages:
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    if not (base / "train").is_dir():
        if not download:
            raise _missing("tiny_imagenet", root, "no tiny-imagenet-200/ and dataset.download=false")
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(root))
        except Exception as error:
            raise _missing("tiny_imagenet", root, f"download failed: {type(error).__name__}") from None
        base = root / "tiny-imagenet-200"
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir())
    index = {c: i for i, c in enumerate(classes)}
    if split == "train":
        files = [(p, index[c]) for c in classes for p in sorted((base / "train" / c).rglob("*")) if _is_image(p)]
    else:
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise _missing("tiny_imagenet", root, f"{annotations} is missing")
        files = []
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(f"{annotations}: line {line!r} does not name a training class")
            files.append((base / "val" / "images" / parts[0], index[parts[1]]))
    return _decode_files(files, classes, image_size, base)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def decode_image_folder(folder: Path, image_size: int) -> LabelledImages:
    """folder/<class>/* (class ids = sorted folder names); every file must be a readable image."""
    if not folder.is_dir():
        raise _missing(folder.parent.name, folder.parent, f"no {folder.name}/ folder")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class folders; expected {folder}/<class>/<image files>")
    files = []
    for label, name in enumerate(classes):
        entries = sorted(p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not entries:
            raise DataError(f"class folder {folder / name} is empty; remove it or add its images")
        files.extend((p, label) for p in entries)
    return _decode_files(files, classes, image_size, folder)


def _decode_files(files: list[tuple[Path, int]], classes: list[str], image_size: int, where: Path) -> LabelledImages:
    """Decode every file once, in threads (PIL releases the GIL while it decodes): CIFAR-10's
    60,000 JPEGs take about 13 s on one core."""
    if not files:
        raise DataError(f"no images found under {where}")
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


def _read_cache(path: Path) -> LabelledImages | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != CACHE_VERSION:
            return None
        return LabelledImages(payload["images"], payload["labels"], list(payload["classes"]))
    except Exception as error:
        raise DataError(
            f"decoded-data cache {path} is unreadable ({type(error).__name__}); delete it and rerun"
        ) from None


def _write_cache(path: Path, data: LabelledImages) -> None:
    cache = {"version": CACHE_VERSION, "images": data.images, "labels": data.labels, "classes": data.classes}
    try:
        write_atomically(path, lambda handle: torch.save(cache, handle))
    except OSError:
        pass  # a read-only or full data folder still trains; it just decodes again next time
