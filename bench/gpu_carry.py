"""Pack what `make gpu-check` needs on a GPU machine that has no package registry (`make gpu-carry`).

    python bench/gpu_carry.py                       # .carry/: wheels for Python 3.12 + the CIFAR-10 archive
    python bench/gpu_carry.py --python-version 3.11 --into /tmp/carry311   # e.g. to rehearse here

The device machine has PyTorch, pandas, matplotlib, pytest and more, but not hydra-core, omegaconf,
antlr4, MLflow, Optuna, submitit or ema-pytorch. This resolves the project's runtime packages (at
the versions installed in this .venv) for the device's Python and platform, leaves out what the
device already has (DEVICE_HAS, from its package list) and the torch stack, and downloads the rest
as wheels into <into>/wheels (antlr4-python3-runtime 4.9.3 exists as a source archive only: built
here into a wheel). MLflow travels as mlflow-skinny + mlflow-tracing + SQLAlchemy + Alembic, which
hold the tracking client and the embedded SQLite store; the full mlflow adds the server and UI.
The CIFAR-10 JPEG archive (--archive) is copied beside them. bench/gpu-check.sh
installs the wheels with pip --no-index into a folder of their own and passes the archive on.
source.json names the commit and the blob id of each of its files, so that the check can say
whether the tree that reached the device is that commit.

Everything under <into> must stay within the device tool's 64 MiB for a call's files; the size is
printed and checked.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64  # the device tool's limit on the working tree and the carried files of one call
# What the project's code imports on the device, by distribution; their dependencies follow.
NEEDED = (
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "hydra-submitit-launcher",
    "submitit",
    "optuna",
    "ema-pytorch",
    "mlflow-skinny",
    "mlflow-tracing",
    "sqlalchemy",
    "alembic",
)
# Never carried: the device's own torch build and what belongs to it.
TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|numpy|pillow)$")
# The GPU machine's packages, from its image's package list: carried only if missing. Names normalised (lower case, '-').
DEVICE_HAS = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
    opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
    portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
    simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
    threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)
# The two device calls of docs/performance.md, each with its timeout_s: the stages' budgets
# (bench/gpu_check.py SIZES) plus the install and start-up. The check's own --deadline comes
# DEADLINE_MARGIN_S before the tool's limit, so that it cuts a stage and prints its line first.
CALLS = (("data,cuda_tests,throughput", 390), ("data,training", 330))
DEADLINE_MARGIN_S = 20


def call_command(stages: str, timeout: int) -> str:
    return f"bash bench/gpu-check.sh --stages {stages} --deadline {timeout - DEADLINE_MARGIN_S}"


PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--into", type=Path, default=REPO / ".carry", help="default: .carry (git-ignored)")
    parser.add_argument("--python-version", default="3.12", help="the device's Python (default 3.12)")
    parser.add_argument("--archive", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    parser.add_argument("--no-archive", action="store_true", help="wheels only")
    args = parser.parse_args()

    wheels = args.into / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)  # one version of each package: two would stop the install there
    wheels.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in NEEDED]
    platform = [f"--python-version={args.python_version}", "--implementation=cp", "--only-binary=:all:"]
    platform += [f"--platform={p}" for p in PLATFORMS]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

    with tempfile.TemporaryDirectory() as scratch:
        # The one source-only package, built here (pure Python: one wheel fits every Python 3).
        antlr = next(p for p in pins if p.startswith("antlr4-python3-runtime"))
        _run([*pip, "wheel", "--no-deps", "--quiet", "-w", str(wheels), antlr])
        # Resolve the whole closure for the device's Python and platform without installing it.
        report = Path(scratch) / "report.json"
        _run(
            [
                *pip,
                "install",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                f"--target={scratch}/target",
                f"--report={report}",
                f"--find-links={wheels}",
                *platform,
                *pins,
            ]
        )
        resolved = {
            normalise(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
    carried = sorted(
        f"{name}=={version}"
        for name, version in resolved.items()
        if name not in DEVICE_HAS and not TORCH_STACK.match(name) and name != "antlr4-python3-runtime"
    )
    _run([*pip, "download", "--no-deps", "--quiet", "-d", str(wheels), *platform, *carried])
    if args.archive and not args.no_archive:
        if not args.archive.is_file():
            sys.exit(f"error: {args.archive} not found; pass --archive PATH (CIFAR-10 JPEG archive) or --no-archive")
        shutil.copy2(args.archive, args.into / args.archive.name)

    # The device gets the working tree without .git: the commit, and the blob id of each of its
    # files, so that the check there can tell whether the tree it got is that commit.
    (args.into / "source.json").write_text(json.dumps(source_manifest()) + "\n")

    files = sorted(p for p in args.into.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files) / 2**20
    print(f"{args.into}: {len(list(wheels.glob('*.whl')))} wheels for Python {args.python_version}, {total:.1f} MiB")
    for name in carried:
        print(f"  {name}")
    if total > LIMIT_MIB - 8:
        sys.exit(
            f"error: {total:.1f} MiB is too close to the device tool's {LIMIT_MIB} MiB limit (the checkout counts too)"
        )
    into = args.into.resolve()
    if into.is_relative_to(REPO):  # the device has no make: the script is called directly
        carried = into.relative_to(REPO)
        env = "" if str(carried) == ".carry" else f"SODA_CARRY={carried} "
        for stages, timeout in CALLS:
            print(
                f"then: run(command='{env}{call_command(stages, timeout)}', carry=['{carried}'], timeout_s={timeout})"
            )
    else:  # outside the checkout (a rehearsal): point bench/gpu-check.sh at it
        print(f"use it: SODA_CARRY={into} bash bench/gpu-check.sh")


def source_manifest() -> dict:
    """HEAD's commit and the blob id of every file in it (what bench/gpu_env.py checks the tree
    that arrived against), and whether the work tree had uncommitted changes when carried."""
    from soda.record import git_state

    listing = subprocess.run(
        ["git", "ls-tree", "-r", "-z", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    files = {}
    for item in filter(None, listing.split("\0")):
        meta, path = item.split("\t", 1)
        _, kind, blob = meta.split()
        if kind == "blob":
            files[path] = blob
    state = git_state(REPO)
    return {"git_sha": state["git_sha"], "dirty_when_carried": state["git_dirty"], "carried": _now(), "files": files}


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command[:6])} ... failed:\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    main()
