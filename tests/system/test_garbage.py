"""Garbage in: bad config overrides, sweep settings, data folders, checkpoints, tracking URIs and
launcher settings, and a disk that fills during a checkpoint write. Each must exit non-zero with
one `error:` line naming the problem, without a traceback, and leave the store's earlier record as
it was.

`make test` runs one case of each kind (the fast ones); `make faults` runs them all. Bad overrides
that tests/test_config.py already sends through launch.py (an unknown key, a value of the wrong
type) are not repeated here."""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soda.record import ERROR
from tests.support.services import needs_slurm
from tests.system.campaign import REPO, TINY, Store, environment, launch_command, store_snapshot, tracking_overrides

EXPERIMENT = "faults-garbage"
# A tiny image folder of a case's own.
FOLDER = ["dataset=imagefolder", "dataset.num_classes=2", "dataset.image_size=16", "dataset.root={case}/images"]


@pytest.fixture(scope="module")
def earlier(work: Path) -> Path:
    """The store with an earlier run in it, which no bad input may touch."""
    result = subprocess.run(
        launch_command(
            *TINY, "schedule.epochs=1", *tracking_overrides(work, EXPERIMENT), f"hydra.run.dir={work}/earlier"
        ),
        cwd=REPO,
        env=environment(work),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"the earlier run failed:\n{result.stderr[-3000:]}"
    return work


# ------------------------------------------------------------------------------------------------
# What a case prepares before its run: called with (the case's own folder, the campaign's folder).


def image_folder(root: Path) -> Path:
    """A valid folder train/<class>/*.png, test/<class>/*.png: 2 classes of 16x16 noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def spoilt_folder(spoil: Callable[[Path], object]):
    """A valid image folder in the case's folder, then `spoil(root)`."""
    return lambda case_dir, _work: spoil(image_folder(case_dir / "images"))


def truncated_jpeg(root: Path) -> None:
    path = root / "train" / "cat" / "bad.jpg"
    Image.new("RGB", (16, 16), "red").save(path, quality=90)
    path.write_bytes(path.read_bytes()[:60])


def added_class_after_caching(root: Path) -> None:
    """The folder decoded and cached with 2 classes, then given a third."""
    from soda.data import load_splits

    load_splits("imagefolder", root, 16, 2)
    for split in ("train", "test"):
        (root / split / "bird").mkdir()
        Image.new("RGB", (16, 16), "blue").save(root / split / "bird" / "0.png")


def one_class(root: Path) -> None:
    for split in ("train", "test"):
        shutil.rmtree(root / split / "dog")


def copy_of_earlier_run(case_dir: Path, work: Path) -> None:
    """The earlier run's directory (settings, checkpoint, MLflow run id), to re-run with changes."""
    shutil.copytree(work / "earlier", case_dir / "run", ignore=shutil.ignore_patterns(".soda-lock"))


def file_in_the_way(case_dir: Path, _work: Path) -> None:
    (case_dir / "file").write_text("a file where the run directory's parent should be")


def checkpoint(content: bytes):
    """A last.pt with `content` where the case's run will look for one to resume."""

    def make(case_dir: Path, _work: Path) -> None:
        path = case_dir / "run" / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)

    return make


def earlier_checkpoint(case_dir: Path, work: Path) -> None:
    """The earlier run's real checkpoint (the case asks for another model)."""
    (case_dir / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(work / "earlier" / "checkpoints" / "last.pt", case_dir / "run" / "checkpoints" / "last.pt")


def readonly_copy(case_dir: Path, work: Path) -> None:
    """A copy of the store, which SQLite itself opens read-only (file permissions do not stop root)."""
    shutil.copy(work / "mlflow.db", case_dir / "mlflow.db")


def failed_with_checkpoint_error(case_dir: Path) -> None:
    """The run that could not checkpoint is one complete FAILED record saying why, and left no
    partial checkpoint or temporary file behind."""
    runs = Store(f"sqlite:///{case_dir}/full-disk.db", EXPERIMENT).runs()
    found = [(run.info.status, run.data.tags.get(ERROR, "")) for run in runs]
    assert len(found) == 1 and found[0][0] == "FAILED" and "cannot write checkpoint" in found[0][1], found
    left = sorted(path.name for path in (case_dir / "run" / "checkpoints").glob("*"))
    assert not left, f"files left in checkpoints/: {left}"


# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    args: tuple[str, ...]  # {case}: the case's own folder; {work}: the campaign's, with the store
    expect: str  # a fragment the error line must contain (case-insensitive)
    prepare: Callable[[Path, Path], object] | None = None
    file_size_limit: int | None = None  # bytes a file may grow to: the disk is "full" beyond
    verify: Callable[[Path], None] | None = None  # asserts what the case left behind


def case(name: str, args: list[str], expect: str, prepare=None, *, quick: bool = False, marks=(), **options):
    """A row of the table; `quick` ones (one of each kind, fast) run in `make test` too."""
    marks = [*marks] if quick else [*marks, pytest.mark.slow]
    return pytest.param(BadInput(tuple(args), expect, prepare, **options), id=name, marks=marks)


CASES = [
    # Config overrides
    case("unknown group option", ["model=resnet9000"], "resnet9000", quick=True),
    case("batch of one", ["schedule.batch_size=1"], "batch_size"),
    case("batch larger than the data", [*TINY, "schedule.batch_size=100000"], "larger than the training set"),
    case("negative learning rate", ["schedule.decoder_lr=-1"], "decoder_lr"),
    case("unknown precision", ["schedule.precision=fp8"], "precision"),
    case("unknown compile mode", ["schedule.compile=turbo"], "compile"),
    case("latent not divisible into layer groups", ["model.layer_groups=3"], "layer_groups"),
    case("unknown augmentation view", ["augmentation/view@augmentation.source=wobble"], "wobble"),
    case("image size zero", ["dataset.image_size=0"], "image_size"),
    # Images of another size in a folder are resized by design (README, Data); a size the model
    # cannot take is the error.
    case("image size the UNet cannot halve", ["dataset.image_size=15"], "cannot be halved"),
    case("unknown device", ["device=tpu"], "device"),
    # What the run checks as it builds the model and the data, refused before any job starts: by
    # --cfg job, the dry run and a multirun's check of its jobs alike.
    case(
        "layer groups beyond the levels, one job of a multirun",
        ["-m", "model.layer_groups=1,7"],
        "layer_groups=7",
        quick=True,
    ),
    case(
        "reference model at a size the UNet cannot halve, one job of a multirun",
        ["-m", "dataset.image_size=32,20"],
        "image_size=20",
    ),
    case(
        "more classes than shapes draws, dry run",
        ["-m", "dataset=shapes", "dataset.num_classes=7", "hydra.launcher.dry_run=true"],
        "dataset.num_classes=7",
    ),
    case(
        "dry run flag neither true nor false",
        ["-m", "seed=1,2", "hydra.launcher.dry_run=maybe"],
        "dry_run=maybe",
        quick=True,
    ),
    case("unknown key added with +", ["+model.foo=1"], "model.foo", quick=True),
    case("sweep file without -m", ["sweep=augment_ablation"], "-m"),
    # Sweep settings
    case("unknown sweep", ["-m", "sweep=nonexistent"], "nonexistent"),
    case("sweep over an unknown key", ["-m", "sweep=lr_search", "schedule.epochz=choice(1,2)"], "epochz", quick=True),
    case("empty interval", ["-m", "sweep=lr_search", "schedule.decoder_lr=interval(1,0)"], "interval"),
    case("grid over an interval", ["-m", "sweep=augment_ablation", "schedule.decoder_lr=interval(0.1,1)"], "grid"),
    # Data folders
    case("empty class folder", FOLDER, "empty", spoilt_folder(lambda root: (root / "train" / "bird").mkdir())),
    case(
        "non-image file",
        FOLDER,
        "notes.txt",
        spoilt_folder(lambda root: (root / "train" / "cat" / "notes.txt").write_text("hi")),
    ),
    case("truncated JPEG", FOLDER, "bad.jpg", spoilt_folder(truncated_jpeg), quick=True),
    case(
        "class count differs from the config",
        [*FOLDER, "dataset.num_classes=10"],
        "num_classes",
        lambda case_dir, _work: image_folder(case_dir / "images"),
    ),
    case(
        "missing data, download off",
        ["dataset=cifar10", "dataset.root={case}/nowhere", "dataset.download=false"],
        "not found",
    ),
    case(
        "train and test hold other classes",
        FOLDER,
        "only in train: dog; only in test: fish",
        spoilt_folder(lambda root: (root / "test" / "dog").rename(root / "test" / "fish")),
        quick=True,
    ),
    case("one class", FOLDER, "at least 2 classes", spoilt_folder(one_class)),
    case("class folder added after caching", FOLDER, "holds 3 classes", spoilt_folder(added_class_after_caching)),
    # Run directories
    case(
        "re-run of a run directory with other settings",
        [*TINY, "schedule.epochs=1", "schedule.decoder_lr=0.002", "augmentation=none"],
        "schedule.decoder_lr: ",
        copy_of_earlier_run,
        quick=True,
    ),
    case("unwritable run directory", [*TINY, "hydra.run.dir={case}/file/run"], "file/run", file_in_the_way),
    # Checkpoints
    case("truncated checkpoint", TINY, "checkpoint", checkpoint(b"PK\x03\x04 truncated"), quick=True),
    case("checkpoint of another model", [*TINY, "model.latent_dim=32"], "other settings", earlier_checkpoint),
    case("not a checkpoint", TINY, "checkpoint", checkpoint(b"just some text\n")),
    case(
        # The operating system refuses the write past 32 MiB (a full disk, a quota, `ulimit -f`).
        "disk full during a checkpoint write",
        [*TINY, "schedule.epochs=1", "tracking.uri=sqlite:///{case}/full-disk.db"],
        "cannot write checkpoint",
        quick=True,
        file_size_limit=32 * 2**20,
        verify=failed_with_checkpoint_error,
    ),
    # Tracking URIs
    case("unreachable tracking server", [*TINY, "tracking.uri=http://127.0.0.1:9"], "127.0.0.1:9"),
    case("unknown tracking scheme", [*TINY, "tracking.uri=gopher://example"], "gopher"),
    case(
        "read-only tracking store",
        [*TINY, "tracking.uri='sqlite:///file:{case}/mlflow.db?mode=ro&uri=true'"],
        "read-only",
        readonly_copy,
        quick=True,
    ),
    # Launcher settings
    case(
        "zero tasks per node",
        ["-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=0", "seed=1,2"],
        "tasks_per_node",
        quick=True,
    ),
    case("GPUs on a CPU machine", ["-m", "hydra/launcher=local", "hydra.launcher.gpus_per_node=2", "seed=1,2"], "gpu"),
    case(
        "unknown SLURM partition",
        ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=nope", "seed=1,2"],
        "nope",
        marks=[needs_slurm, pytest.mark.slurm],
    ),
    case(
        "more nodes than the SLURM partition has",
        ["-m", "hydra/launcher=slurm", "hydra.launcher.nodes=64", "seed=1,2"],
        "nodes=64",
        marks=[needs_slurm, pytest.mark.slurm],
    ),
]


def _limit_file_size(size: int):
    def limit() -> None:  # in the child, before exec; CPython ignores SIGXFSZ, so writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return limit


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_fails_in_one_line(bad: BadInput, earlier: Path, tmp_path, request, record):
    work, case_dir = earlier, tmp_path
    args = [arg.format(case=case_dir, work=work) for arg in bad.args]
    given = {arg.split("=")[0] for arg in args}
    defaults = [
        *tracking_overrides(work, EXPERIMENT),
        f"hydra.run.dir={case_dir}/run",
        f"hydra.sweep.dir={case_dir}/multirun",
    ]
    if bad.prepare is not None:
        bad.prepare(case_dir, work)
    before = store_snapshot(work / "mlflow.db")

    started = time.perf_counter()
    result = subprocess.run(
        launch_command(*args, *(arg for arg in defaults if arg.split("=")[0] not in given)),
        cwd=REPO,
        env=environment(work),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if bad.file_size_limit is None else _limit_file_size(bad.file_size_limit),
    )
    record.seconds.append(time.perf_counter() - started)
    stderr = result.stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    said = errors[0] if len(errors) == 1 else f"{len(errors)} error lines"
    record.details.append(f"{request.node.callspec.id:40s} rc={result.returncode}  {said[:200]}")

    assert result.returncode != 0, f"exit status 0:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, f"{len(errors)} error lines:\n{stderr[-3000:]}"
    assert bad.expect.lower() in errors[0].lower(), f"the error does not name {bad.expect!r}: {errors[0]}"
    if bad.verify is not None:
        bad.verify(case_dir)
    assert store_snapshot(work / "mlflow.db") == before, "the store changed (the earlier record or a half-written run)"
