"""The decoded-data cache of soda.data.datasets: one file per data set, split and image size in
`<root>/.soda-cache/`, named after what it was built from, and the lock that lets one process of
several build it (see soda.data.datasets for the whole story)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from soda.data.images import LabelledImages
from soda.files import LockContended, OwnerLock, describe, write_atomically

log = logging.getLogger("soda.data.datasets")  # the name its lines always had
CACHE_FOLDER = ".soda-cache"
CACHE_VERSION = 2  # part of every cache key: a new layout is a new name
LOCK_REFRESH_SECONDS = 10.0  # how often the decoding process touches its lock
# A lock untouched this long has lost its holder (killed on another node). Generous, because an
# NFS client may show another client's mtime up to a minute late (attribute caching).
LOCK_STALE_SECONDS = 180.0
LOCK_POLL_SECONDS = 0.25


@dataclass
class Source:
    root: Path
    stem: str  # the cache file's name before its key: "<name>-<split>-<size>px"
    key: str | None  # hash of the files it is built from; None until they are downloaded
    classes: list[str] | None  # known before decoding for image folders
    decode: Callable[[], LabelledImages] | None = None
    download: Callable[[], Source] | None = None  # fetches the files, then lists them

    @property
    def cache(self) -> Path:
        return self.root / CACHE_FOLDER / f"{self.stem}-{self.key}.pt"


def cache_key(image_size: int, classes: list[str], entries: Iterable[tuple[str, int, os.stat_result]]) -> str:
    """Hash of (path, label, size, mtime) of every file: what a decoded split depends on."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size}px {classes!r}\n".encode())
    for path, label, info in entries:
        digest.update(f"{path}\t{label}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_cached(source: Source) -> LabelledImages:
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


def _read_cache(source: Source, warn: bool = True) -> LabelledImages | None:
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


def _write_cache(source: Source, data: LabelledImages) -> None:
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
