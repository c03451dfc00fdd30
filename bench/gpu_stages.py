"""The GPU check's first three stages (bench/gpu_check.py runs them in this order):

data        a CIFAR-10 image folder in the work folder (the archive unpacked once, or --data, or a
            tiny CIFAR-shaped folder with --smoke), decoded into the cache the later stages read;
cuda_tests  pytest -m cuda, its JUnit report read back (without a GPU the tests are collected);
throughput  bench/throughput.py, its record's fast-path figures copied into the stage's entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the sibling modules below
from gpu_process import last_line, run_logged
from gpu_record import Check, StageError

REPO = Path(__file__).resolve().parents[1]
# The files that hold cuda tests: naming them keeps pytest from importing the other test modules,
# whose dev-only imports (jupytext, scikit-learn, psycopg) a GPU machine may lack.
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/data/test_augment.py", "tests/test_ema.py")


# The data stage's decode, in a process of its own so that the stage's budget can end it.
DECODE = (
    "import json, sys\n"
    "from soda.data import load_split\n"
    "sizes = {s: len(load_split('cifar10', sys.argv[1], s, 32, 10, download=False)) for s in ('train', 'test')}\n"
    "print('decoded ' + json.dumps(sizes))\n"
)


def stage_data(check: Check, data: Path | None, archive: Path | None, carried_archive: Path | None) -> Path:
    """A CIFAR-10 image folder in the work folder, decoded into its cache (the later stages and
    calls read the cache). An archive already unpacked there is not unpacked again. The data:
    --data, else --archive, else (on a GPU) the carried archive, else (--smoke) a tiny folder."""
    entry = check.record["stages"]["data"]
    archive = archive or (carried_archive if check.kind == "cuda" else None)
    if data:
        root, entry["source"] = data, str(data)
    elif archive:
        if not archive.is_file():
            raise StageError(
                f"{archive} does not exist; give --archive the CIFAR-10 JPEG archive (docs/performance.md)"
            )
        root, entry["source"] = unpack(check, archive), str(archive)
    elif check.kind == "cpu":
        root, entry["source"] = write_tiny_cifar(check.work / "data" / "tiny-cifar10"), "a tiny CIFAR-shaped folder"
    elif (REPO / os.environ.get("SODA_DATA", "data") / "cifar10").is_dir():  # where launch.py looks
        root = REPO / os.environ.get("SODA_DATA", "data") / "cifar10"
        entry["source"] = str(root)
    else:
        raise StageError(
            "no CIFAR-10: pass --archive or --data, or put it under $SODA_DATA/cifar10 "
            "(make gpu-carry copies cifar10-jpeg.tar.gz into .carry/, which gpu-check.sh passes on)"
        )
    entry["decode_cache"] = "reused" if any((Path(root) / ".soda-cache").glob("*")) else "written"
    began = time.perf_counter()
    returncode = run_logged(check, "data", [sys.executable, "-c", DECODE, str(root)], f"(decode both splits of {root})")
    decoded = [line for line in entry["log_tail"] if line.startswith("decoded ")]
    if returncode != 0 or not decoded:
        raise StageError(f"decoding {root} failed: {last_line(check, 'data')}")
    entry.update(root=str(root), decode_seconds=round(time.perf_counter() - began, 1))
    entry["images"] = json.loads(decoded[-1].removeprefix("decoded "))
    return Path(root)


def unpack(check: Check, archive: Path) -> Path:
    """The archive's cifar10/ folder under <work>/data, unpacked once per archive file."""
    target = check.work / "data"
    stamp = target / "unpacked.json"
    this = {"archive": archive.name, "bytes": archive.stat().st_size, "mtime": int(archive.stat().st_mtime)}
    entry = check.record["stages"]["data"]
    try:
        if json.loads(stamp.read_text()) == this and (target / "cifar10").is_dir():
            entry["unpack"] = "reused"
            return target / "cifar10"
    except (OSError, ValueError):
        pass
    shutil.rmtree(target / "cifar10", ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with tarfile.open(archive) as opened:
        opened.extractall(target, filter="data")
    stamp.write_text(json.dumps(this) + "\n")
    entry.update(unpack="unpacked", unpack_seconds=round(time.perf_counter() - began, 1))
    return target / "cifar10"


def write_tiny_cifar(root: Path, train_per_class: int = 40, test_per_class: int = 20) -> Path:
    """A CIFAR-10-shaped JPEG folder (10 classes, 32x32): class k is the synthetic shape k % 6 on
    a background tinted by k, so a k-NN on pixels separates the classes well above chance.
    Written once: a folder with its `complete` mark is reused."""
    from PIL import Image

    from soda.data.shapes import make_shapes

    if (root / "complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for split, count, seed in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            shapes, _ = make_shapes(count, 32, seed=seed * 100 + label, num_classes=6)
            tint = torch.tensor([(label * 53) % 256, (label * 97) % 256, (label * 151) % 256], dtype=torch.float32)
            images = (0.6 * shapes.float() + 0.4 * tint.view(1, 3, 1, 1)).round().to(torch.uint8)
            for index, image in enumerate(images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.jpg", quality=90)
    (root / "complete").write_text("")
    return root


def stage_cuda_tests(check: Check) -> dict:
    entry = check.record["stages"]["cuda_tests"]
    if check.kind != "cuda":
        # Nothing can run without a GPU; collecting them keeps their imports and parameters honest.
        command = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda", *CUDA_TEST_FILES]
        returncode = run_logged(check, "cuda_tests", command)
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", "\n".join(entry["log_tail"]))
        if returncode != 0 or not collected:
            raise StageError("pytest could not collect the cuda tests (see the log tail)")
        entry.update(collected=int(collected.group(1)), ran=False, note="no GPU: collected, not run")
        return entry
    report = check.work / "cuda-tests.xml"
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}"]
    command += CUDA_TEST_FILES
    try:
        returncode = run_logged(check, "cuda_tests", command)
    except BaseException:
        entry.update(_outcomes_so_far(check.log_path("cuda_tests")))  # pytest's report comes at its end
        raise
    check.send(report, "gpu-check-cuda-tests.xml")
    if not report.exists():
        raise StageError(f"pytest wrote no report (exit {returncode})")
    counts, failures = read_junit(report)
    entry.update(counts)
    entry["failures"] = failures
    if counts["failed"] or counts["errors"] or not counts["passed"]:
        first = failures[0] if failures else f"exit {returncode}"
        raise StageError(
            f"{counts['failed'] + counts['errors']} of {counts['tests']} cuda tests failed; first: {first}"
        )
    return entry


def _outcomes_so_far(log: Path) -> dict:
    """From pytest -v's lines, what had run when the stage was cut short."""
    outcomes = re.findall(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", log.read_text(errors="replace"))
    return {
        "outcomes_before_cut": {state: sum(1 for _, s in outcomes if s == state) for _, state in outcomes},
        "failures": [name for name, state in outcomes if state in ("FAILED", "ERROR")],
    }


def read_junit(path: Path) -> tuple[dict, list[str]]:
    """The counts of a pytest JUnit report, and each failure's test and first line."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = counts.pop("failures")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    failures = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[0][:300] if problem.get("message") else ""
            failures.append(f"{case.get('name')}: {message}")
    return counts, failures


def stage_throughput(check: Check, size: dict, data_root: Path | None) -> dict:
    record_path = check.work / "throughput.json"
    record_path.unlink(missing_ok=True)
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    command = [sys.executable, "bench/throughput.py", *size["bench"], "--workers", str(workers)]
    if data_root is not None:
        command += ["--dataset-root", str(data_root)]
    command += ["--json", str(record_path)]
    returncode = run_logged(check, "throughput", command)
    if returncode != 0 or not record_path.exists():
        raise StageError(f"bench/throughput.py exited {returncode}: {last_line(check, 'throughput')}")
    bench = json.loads(record_path.read_text())
    entry = check.record["stages"]["throughput"]
    entry["record"] = bench
    fast_step, fast_e2e = bench["step"]["fast"], bench["end_to_end"]["fast"]
    entry.update(
        end_to_end_images_per_s=fast_e2e["images_per_s"],
        step_images_per_s=fast_step["images_per_s"],
        tflops=fast_e2e.get("tflops"),
        fraction_of_peak=fast_e2e.get("fraction_of_peak"),
        host_syncs_per_step=fast_step.get("host_syncs_per_step"),
        compile_seconds=fast_e2e.get("seconds_before_timing"),
        compile=fast_e2e.get("compile"),
        peak_memory_mib=bench.get("peak_memory_mib"),
        speedup=bench.get("speedup"),
    )
    return entry
