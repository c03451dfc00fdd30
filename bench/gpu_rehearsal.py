"""Rehearse the GPU check's device calls on this machine (`make gpu-rehearsal`), so that the path
to the rare GPU cannot rot between GPU sessions.

    python bench/gpu_rehearsal.py                  # the device's torch 2.11.0 (downloaded once, cached)
    python bench/gpu_rehearsal.py --torch local    # this .venv's torch, nothing downloaded

It does what a device call meets, at smoke size:
  - a Python environment holding only the torch stack (the device image's versions by default:
    gpu_env.MIN_TORCH is the oldest the project supports) and the packages the device image has
    (those of this .venv whose names gpu_carry.DEVICE_HAS lists), without hydra, MLflow, Optuna;
  - the carried wheels, made by bench/gpu_carry.py for this Python, with its source.json;
  - the tree as the device tool sends it (tracked and untracked-not-ignored files), without .git;
  - no network (`unshare -rn`: a network namespace with loopback only) and a bare environment (env -i);
  - the documented calls, in order: --stages data,cuda_tests,throughput, then --stages
    data,training, each with $OUT set, through bench/gpu-check.sh.
Then it checks what came back: each call's last line, the files in each $OUT, and that the second
record holds both calls, the torch asked for, the carried packages and the commit of the tree.
The last line is `gpu-rehearsal ok ...` or `gpu-rehearsal failed: <reason>`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_carry  # a sibling script, found through the line above

REPO = Path(__file__).resolve().parents[1]
# The device image's torch stack (its package list: torch 2.11.0, torchvision 0.26.0, triton 3.6.0).
DEVICE_TORCH = {"torch": "2.11.0", "torchvision": "0.26.0", "triton": "3.6.0"}
# The torch stack and the CUDA libraries it loads: taken whole (downloaded, or linked from .venv).
STACK = ("torch", "torchvision", "triton", "torchaudio")
CUDA_LIBRARIES = ("nvidia-", "cuda-")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "soda" / "rehearsal-wheels"
# What each call must send back in $OUT (the device tool returns at most 8 files).
SENT = {
    1: {"gpu-check.json", "gpu-check-data.log", "gpu-check-cuda_tests.log", "gpu-check-throughput.log"},
    2: {
        "gpu-check.json",
        "gpu-check-data.log",
        "gpu-check-training.log",
        "gpu-check-mlflow.db",
        "gpu-check-training-run.tar.gz",
    },
}


class RehearsalError(Exception):
    """What went wrong, in one line."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch", default=DEVICE_TORCH["torch"], help="a torch version, or 'local' for .venv's")
    parser.add_argument("--torchvision", default=DEVICE_TORCH["torchvision"])
    parser.add_argument("--triton", default=DEVICE_TORCH["triton"])
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new one under the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="soda-gpu-rehearsal-"))
    try:
        line = rehearse(work, args)
    except RehearsalError as error:
        line = f"gpu-rehearsal failed: {error}"
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(line, flush=True)
    return 0 if line.startswith("gpu-rehearsal ok") else 1


def rehearse(work: Path, args) -> str:
    work.mkdir(parents=True, exist_ok=True)
    python = make_environment(work / "env", args)
    tree = send_tree(work / "tree")
    carry(tree / ".carry")
    records = []
    for number, (stages, timeout) in enumerate(gpu_carry.CALLS, start=1):
        out = work / f"out{number}"
        records.append(device_call(python, tree, out, stages, timeout, number))
    first, second = records
    if [call["stages"] for call in second["calls"]] != [stages.split(",") for stages, _ in gpu_carry.CALLS]:
        raise RehearsalError(f"the second record does not hold both calls: {second['calls']}")
    if second["torch"].split("+")[0] != (args.torch if args.torch != "local" else torch_here()):
        raise RehearsalError(f"the check ran on torch {second['torch']}, not the one asked for")
    if not second["packages"]["carried"] or "hydra-core" not in second["packages"]["carried"]:
        raise RehearsalError(f"no carried packages recorded: {second['packages']}")
    head = git("rev-parse", "HEAD")
    if second["git_sha"] != head:
        raise RehearsalError(f"the record names commit {second['git_sha']}, the tree sent is {head}")
    if (tree / "none").exists():
        raise RehearsalError("the carried packages went into ./none: SODA_SITE was taken for pip's target")
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO).returncode != 0
    if second["git_dirty"] != str(dirty).lower():
        raise RehearsalError(f"the record says git_dirty={second['git_dirty']}; the tree sent has dirty={dirty}")
    return (
        f"gpu-rehearsal ok torch={second['torch']} calls=2 carried={len(second['packages']['carried'])} "
        f"git={head[:7]} dirty={second['git_dirty']} | {second['summary']}"
    )


def torch_here() -> str:
    return importlib.metadata.version("torch").split("+")[0]


# ------------------------------------------------------------------------------------------------
def make_environment(env: Path, args) -> Path:
    """A venv with the torch stack and the device image's packages only."""
    if not env.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    if args.torch == "local":
        wanted = lambda name: name in STACK or name.startswith(CUDA_LIBRARIES)  # noqa: E731
    else:
        install_torch(python, args)
        wanted = lambda name: name.startswith(CUDA_LIBRARIES)  # noqa: E731
    device = {name for name in gpu_carry.DEVICE_HAS if name not in STACK and not name.startswith(CUDA_LIBRARIES)}
    for distribution in importlib.metadata.distributions():
        name = gpu_carry.normalise(distribution.metadata["Name"])
        if wanted(name) or name in device:
            link_distribution(distribution, site)
    return python


def install_torch(python: Path, args) -> None:
    """The asked-for torch, torchvision and triton wheels, downloaded once into a cache."""
    pins = [f"torch=={args.torch}", f"torchvision=={args.torchvision}", f"triton=={args.triton}"]
    cache = CACHE / args.torch
    if not all(any(cache.glob(f"{pin.split('==')[0]}-{pin.split('==')[1]}-*.whl")) for pin in pins):
        cache.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-q",
                "-d",
                str(cache),
                *pins,
            ],
            capture_output=True,
            text=True,
        )
        if fetched.returncode != 0:
            raise RehearsalError(f"pip download {' '.join(pins)} failed: {fetched.stderr.strip()[-300:]}")
    wheels = [str(next(cache.glob(f"{pin.split('==')[0]}-{pin.split('==')[1]}-*.whl"))) for pin in pins]
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", *wheels],
        capture_output=True,
        text=True,
    )
    if installed.returncode != 0:
        raise RehearsalError(f"installing {' '.join(pins)} failed: {installed.stderr.strip()[-300:]}")


def link_distribution(distribution, site: Path) -> None:
    """The distribution's top-level files and folders (and its metadata) linked into `site`."""
    top = {Path(str(path)).parts[0] for path in distribution.files or () if not str(path).startswith("..")}
    for name in top:
        source = Path(str(distribution.locate_file(name)))
        target = site / name
        if source.exists() and not target.exists() and not target.is_symlink():
            target.symlink_to(source)


def send_tree(tree: Path) -> Path:
    """The files the device tool sends (tracked and untracked-not-ignored), without .git."""
    shutil.rmtree(tree, ignore_errors=True)
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listing.split("\0")):
        source, target = REPO / name, tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():  # a link travels as a link
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return tree


def carry(into: Path) -> None:
    """bench/gpu_carry.py for this Python, wheels only: the tiny folder stands in for CIFAR-10."""
    made = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_carry.py"), "--python-version", python_version(), "--no-archive"]
        + ["--into", str(into)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise RehearsalError(f"bench/gpu_carry.py failed: {(made.stderr or made.stdout).strip()[-300:]}")


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def device_call(python: Path, tree: Path, out: Path, stages: str, timeout: int, number: int) -> dict:
    """One call as the device tool makes it: its own $OUT, no network, a bare environment."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    home = out.parent / "home"
    home.mkdir(exist_ok=True)
    environment = [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}", f"HOME={home}", f"OUT={out}"]
    environment += [f"SODA_PYTHON={python}", "SODA_SITE=none", "LANG=C.UTF-8"]
    inner = f"ip link set lo up 2>/dev/null; exec {gpu_carry.call_command(stages, timeout)} --smoke"
    command = ["unshare", "-rn", "env", "-i", *environment, "bash", "-c", inner]
    try:
        result = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=timeout + 120)
    except subprocess.TimeoutExpired:
        raise RehearsalError(f"call {number} (--stages {stages}) ran past {timeout + 120} s") from None
    (out.parent / f"call{number}.log").write_text(result.stdout + result.stderr)
    lines = result.stdout.strip().splitlines()
    last = lines[-1] if lines else (result.stderr.strip().splitlines() or ["no output"])[-1]
    print(f"# call {number} (--stages {stages}): {last}", flush=True)
    if result.returncode != 0 or not last.startswith("gpu-check ok"):
        raise RehearsalError(f"call {number} (--stages {stages}) ended {result.returncode}: {last}")
    sent = {path.name for path in out.iterdir()}
    if not SENT[number] <= sent or len(sent) > 8:
        raise RehearsalError(f"call {number} sent back {sorted(sent)}; expected {sorted(SENT[number])}, at most 8")
    record = json.loads((out / "gpu-check.json").read_text())
    if record["summary"] != last:
        raise RehearsalError(f"call {number}: the record's summary is not the last line: {record['summary']}")
    return record


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
