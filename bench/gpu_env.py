"""What a GPU check ran on and with: the card, its driver, the torch stack and every package used
(carried or the machine's own), the commit of the tree that was sent, and whether this torch is
one the project supports (bench/gpu_check.py's preflight).

The device machine gets the working tree without `.git`, so the commit cannot be asked of git
there: `make gpu-carry` writes into .carry/source.json the commit it saw and the blob id of every
file of that commit, and this module hashes the files that arrived the way git does. Equal blobs:
the tree sent is that commit; the files that differ are named.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The oldest torch the project supports: the device image's (torch 2.11.0, torchvision 0.26.0),
# which `make gpu-rehearsal` runs the check on. The pinned 2.14.1 is what development machines have.
MIN_TORCH = (2, 11)
# Torch APIs the training, the bench and the tests call that are not in every torch 2.x: a torch
# that lacks one stops the check in one line naming it, before any stage.
TORCH_APIS = (
    "compile",
    "autocast",
    "amp.GradScaler",
    "nn.attention.sdpa_kernel",
    "nn.attention.SDPBackend",
    "nn.functional.scaled_dot_product_attention",
    "utils.flop_counter.FlopCounterMode",
    "_foreach_lerp_",  # ema-pytorch's foreach update
    "cuda.set_sync_debug_mode",
    "_dynamo.exc.TorchDynamoException",
)
# The packages a check imports: the project's stack, resolved to distributions below.
PROJECT_IMPORTS = ("torch", "torchvision", "hydra", "omegaconf", "mlflow", "optuna", "submitit", "ema_pytorch")
PROJECT_PACKAGES = ("soda", "analysis", "hydra_plugins")


def torch_problem() -> str | None:
    """None if this torch is one the project supports, else one line saying what is missing."""
    import torch

    found = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    minimum = ".".join(map(str, MIN_TORCH))
    if found < MIN_TORCH:
        return f"torch {torch.__version__} is older than {minimum}, the oldest the project supports"
    missing = [name for name in TORCH_APIS if not _has(torch, name)]
    if missing:
        return f"torch {torch.__version__} lacks torch.{', torch.'.join(missing)}, which the project uses"
    return None


def _has(module, dotted: str) -> bool:
    target = module
    for part in dotted.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            try:
                target = importlib.import_module(f"{target.__name__}.{part}")
            except (ImportError, AttributeError):
                return False
    return True


def import_problem() -> str | None:
    """Imports every module of the project under this Python and torch: None, or the first
    failure in one line."""
    for name in PROJECT_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as error:
            return f"import {name} failed: {type(error).__name__}: {error}"
    for package in PROJECT_PACKAGES:
        for module in _modules(package):
            try:
                importlib.import_module(module)
            except Exception as error:
                return f"import {module} failed: {type(error).__name__}: {error}"
    return None


def _modules(package: str) -> list[str]:
    root = importlib.import_module(package)
    names = [package]
    for path in getattr(root, "__path__", []):
        for info in pkgutil.walk_packages([path], prefix=f"{package}."):
            names.append(info.name)
    return sorted(set(names))


def machine(kind: str) -> dict:
    """The card (name, kind: h100, h200, ...), its driver and memory, the torch stack's versions."""
    import torch

    record = {
        "device": torch.cuda.get_device_name(0) if kind == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if kind == "cuda" else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if kind == "cuda":
        properties = torch.cuda.get_device_properties(0)
        record.update(
            card=card(record["device"]),
            driver=driver(),
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            multiprocessors=properties.multi_processor_count,
        )
    else:
        record["card"] = "cpu"
    return record


def card(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the kind of card, as targets and notes name it."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper())
    return match.group(1).lower() if match else name.lower()


def driver() -> str | None:
    try:
        answer = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return answer.stdout.strip().splitlines()[0] if answer.returncode == 0 and answer.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def packages_used(carried: Path | None) -> dict[str, dict[str, str]]:
    """Every distribution a module imported by this process came from, with its version, split
    into those installed from carried wheels (under `carried`) and the machine's own."""
    providers = importlib.metadata.packages_distributions()
    names = {top for module in list(sys.modules) if (top := module.partition(".")[0]) in providers}
    used: dict[str, dict[str, str]] = {"carried": {}, "machine": {}}
    carried = carried.resolve() if carried is not None and carried.is_dir() else None
    for distribution in sorted({d for top in names for d in providers[top]}):
        try:
            found = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        location = Path(str(found.locate_file(""))).resolve()
        where = "carried" if carried is not None and location.is_relative_to(carried) else "machine"
        used[where][found.metadata["Name"]] = found.version
    return used


# ------------------------------------------------------------------------------------------------
def blob_id(path: Path) -> str:
    """The id git gives the file's content (a blob), computed without git."""
    data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def source_state(carry: Path, repo: Path = REPO) -> dict:
    """The commit the tree here is: from git where the checkout has its .git, else from the
    blob ids `make gpu-carry` recorded in <carry>/source.json, checked against the files here."""
    from soda.record import git_state

    state = git_state(repo)
    if state["git_sha"] != "unknown":
        return {**state, "git_source": "git"}
    manifest = carry / "source.json"
    if not manifest.is_file():
        return {**state, "git_source": None, "git_note": f"no .git and no {manifest} (make gpu-carry writes it)"}
    carried = json.loads(manifest.read_text())
    files = carried.get("files", {})
    changed = sorted(path for path, blob in files.items() if not _same(repo / path, blob))
    result = {
        "git_sha": carried.get("git_sha", "unknown"),
        "git_dirty": str(bool(changed)).lower(),
        "git_source": f"{manifest.name} of make gpu-carry ({carried.get('carried')}), checked file by file",
    }
    if not files:
        result.update(git_dirty="unknown", git_note=f"{manifest} lists no files: run make gpu-carry again")
    elif changed:
        result["git_changed"] = changed[:30]
        result["git_note"] = f"{len(changed)} of {len(files)} files differ from commit {result['git_sha'][:7]}"
    return result


def _same(path: Path, blob: str) -> bool:
    try:
        return blob_id(path) == blob
    except OSError:
        return False
