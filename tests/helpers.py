"""Shared pieces for tests that compose the real config."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from soda.config import register

register()  # the schema, with Hydra, for compose()


REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# Device parameter of tests that also run on a GPU (marker `cuda`: deselected by make test, run
# by make gpu-check).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# A run that finishes in seconds on a CPU: tiny data, tiny model, one short epoch.
SMOKE = [
    "dataset=shapes",
    "model=tiny",
    "schedule=short",
    "dataset.train_size=96",
    "dataset.test_size=48",
    "dataset.image_size=16",
    "schedule.epochs=1",
    "schedule.batch_size=32",
    "schedule.log_every=1",
    "eval.every=1",
    "eval.batch_size=48",
    "eval.probe_epochs=2",
    "eval.num_reconstructions=4",
    "eval.sample_steps=2",
    "tracking.system_metrics=false",
]


def reference_view(size: int, **overrides):
    """The reference view augmentation (conf/augmentation/view/reference.yaml), or a variant."""
    from omegaconf import OmegaConf

    from soda.data import ViewAugmentation

    values = OmegaConf.to_container(OmegaConf.load(CONF / "augmentation" / "view" / "reference.yaml"))
    values.pop("name")
    return ViewAugmentation(size, **{**values, **overrides})


def compose_config(overrides: list[str], tmp_path: Path | None = None):
    extra = []
    if tmp_path is not None:
        extra = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/artifacts"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *extra])


def launch(
    args: list[str], cwd: Path = REPO, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@contextlib.contextmanager
def file_size_limit(size: int):
    """The operating system refuses writes past `size` bytes, as a full disk or a quota does
    (CPython ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process).
    The limit holds for every file this process writes, pytest's own output included: keep the
    block to the one call."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(module: str, world: int, *args: str, timeout: int = 180) -> None:
    """`python -m <module> RANK <args>` for each rank at once (the repository on PYTHONPATH);
    each must exit 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(rank), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    for rank in ranks:
        output, _ = rank.communicate(timeout=timeout)
        assert rank.returncode == 0, output[-3000:]
