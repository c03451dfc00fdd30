"""One command that settles the GPU questions in one device call: are the CUDA paths right, how
fast is training, and does the latent start to carry information? (`make gpu-check`)

    bash bench/gpu-check.sh                  # installs carried wheels if needed, then this script
    python bench/gpu_check.py                # a GPU: the reference model on CIFAR-10, ~9 minutes
    python bench/gpu_check.py --smoke        # any machine: tiny model, tiny data, ~2 minutes

Stages, each timed, each recorded even when an earlier one failed:
  data        unpack the CIFAR-10 archive (--archive) and decode both splits into the decode cache
              that the later stages read; --smoke writes a tiny 10-class JPEG folder instead.
  cuda_tests  pytest -m cuda (tests/test_cuda.py, the cuda cases of tests/data/test_augment.py and tests/test_ema.py). The
              first test compiles the reference training graph; the later stages load it from
              inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, shared), so compile is paid once.
              Without a GPU the tests are only collected.
  throughput  bench/throughput.py: data path, model step and end to end, fast against the
              straightforward baseline, TFLOP/s and fraction of peak, host syncs, memory, compile.
  training    python launch.py on the reference model and augmentation for a time budget
              (schedule.train_seconds: --train-seconds, cut to what the deadline leaves), with
              k-NN and eval/latent_gap at the start and every --eval-seconds, the linear probe
              at the end; read back from its MLflow store.
One JSON record (GPU, torch, CUDA, git sha, each stage's seconds and figures, the targets) goes to
$OUT/gpu-check.json when OUT is set (the device tool brings $OUT back), else to --out (default
bench/results/gpu-check-<cuda|cpu>.json); it is rewritten after every stage, so a run cut short
still leaves what it measured. The last line is
    gpu-check ok e2e=<img/s> step=<img/s> mfu=<fraction> knn_start=<a> knn_end=<b> images=<n> latent_gap=<g>
or `gpu-check failed <stage>: <reason>` naming the first stage that failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "cuda_tests", "throughput", "training")
# The files that hold cuda tests: naming them keeps pytest from importing the other test modules,
# whose dev-only imports (jupytext, scikit-learn, psycopg) a GPU machine may lack.
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/data/test_augment.py", "tests/test_ema.py")
# The targets on one H200: about 10x the reference implementation's end-to-end throughput, and a
# model step as fast as bf16 + SDPA + compile make the reference's own step.
TARGETS = {"end_to_end_images_per_s": 6_000, "step_images_per_s": 5_400, "host_syncs_per_step": 0}
# What the training stage costs besides its budget: process start, data from the cache, the
# evaluations (k-NN at the start and every --eval-seconds, the linear probe at the end), the final
# checkpoint; on a GPU also its first step, which loads the compiled graph from inductor's cache
# (as long as the bench's did) or, if nothing filled the cache, compiles it (COLD_COMPILE_S).
# The record keeps the estimate and what it really was (training.overhead_seconds).
TRAINING_OVERHEAD_S = {"cuda": 70.0, "cpu": 45.0}
COLD_COMPILE_S = 165.0
WARM_COMPILE_S = 30.0
SIZES = {
    # The reference CIFAR-10 model and augmentation at the reference's global batch on one GPU.
    "cuda": {
        # 30 timed steps after 5 (the compiled graph comes from the cache the CUDA tests filled);
        # the probes are timed by the training stage (eval/seconds), not here.
        "bench": ["--preset", "reference", "--steps", "30", "--warmup", "5", "--skip-eval"],
        "train": ["model=soda_r18_ddpm", "augmentation=seed", "schedule=reference_800ep"],
        "deadline": 540.0,
        "train_seconds": 240.0,
        "eval_seconds": 60.0,
    },
    # Seconds to two minutes on a CPU, through the same code: the tiny model, a tiny folder.
    "cpu": {
        "bench": ["--preset", "smoke", "--skip-eval"],
        "train": [
            "model=tiny",
            "augmentation=seed",
            "schedule=short",
            "schedule.batch_size=64",
            "schedule.log_every=2",
            "dataset.train_limit=2000",  # bites only on the real archive: the tiny folder has 400
            "dataset.test_limit=500",
            "eval.batch_size=250",
            "eval.probe_epochs=5",
            "eval.num_reconstructions=4",
            "eval.sample_steps=2",
            "eval.latent_gap_images=64",
        ],
        "deadline": 240.0,
        "train_seconds": 8.0,
        "eval_seconds": 3.0,
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU-sized check (the default without a GPU)")
    parser.add_argument("--archive", type=Path, help="cifar10-jpeg.tar.gz to unpack (cifar10/{train,test}/<class>/)")
    parser.add_argument(
        "--data",
        type=Path,
        help="CIFAR-10 as an image folder or torchvision's batches (default on a GPU: $SODA_DATA/cifar10)",
    )
    parser.add_argument("--work", type=Path, help="scratch folder (default: a fresh one under the temp dir)")
    parser.add_argument("--out", type=Path, help="record path (default: $OUT/gpu-check.json or bench/results/)")
    parser.add_argument("--deadline", type=float, help="seconds for the whole check, from --started (GPU 540)")
    parser.add_argument("--train-seconds", type=float, help="training budget after warm-up (GPU 240)")
    parser.add_argument("--eval-seconds", type=float, help="k-NN every this many training seconds (GPU 60)")
    parser.add_argument("--started", type=float, help="epoch seconds when the check began (set by gpu-check.sh)")
    parser.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages to leave out")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, run, caches)")
    args = parser.parse_args()

    started = args.started or time.time()
    kind = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    size = SIZES[kind]
    deadline = started + (args.deadline or size["deadline"])
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"soda-gpu-check-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (
        Path(os.environ["OUT"]) / "gpu-check.json"
        if os.environ.get("OUT")
        else REPO / "bench" / "results" / f"gpu-check-{kind}.json"
    )
    # One inductor cache for every process of the check: the graph compiled by the CUDA tests is
    # loaded, not compiled again, by the bench and the training run.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    check = Check(out, work, deadline, kind)
    check.record.update(environment(kind, started))
    print(f"# gpu-check ({kind}): {check.record['device']}, torch {torch.__version__}, record {out}", flush=True)

    data_root = check.stage("data", lambda: stage_data(check, args), skip="data" in args.skip)
    check.stage("cuda_tests", lambda: stage_cuda_tests(check), skip="cuda_tests" in args.skip)
    check.stage("throughput", lambda: stage_throughput(check, size, data_root), skip="throughput" in args.skip)
    check.stage(
        "training",
        lambda: stage_training(check, size, data_root, args.train_seconds, args.eval_seconds),
        skip="training" in args.skip,
    )
    line = check.finish()
    if os.environ.get("OUT"):  # the device tool brings back what is under $OUT: the stages' whole logs too
        for log in sorted(work.glob("*.log")):
            shutil.copy2(log, Path(os.environ["OUT"]) / f"gpu-check-{log.name}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)  # decoded data, checkpoint, caches: hundreds of MB
    print(line, flush=True)
    return 0 if line.startswith("gpu-check ok") else 1


class Check:
    """The record, rewritten after every stage, and the clock the stages share."""

    def __init__(self, out: Path, work: Path, deadline: float, kind: str):
        self.out, self.work, self.deadline, self.kind = out, work, deadline, kind
        self.record: dict = {"stages": {}, "work": str(work)}
        self.failed: list[tuple[str, str]] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def stage(self, name: str, run, skip: bool = False):
        if skip:
            self.record["stages"][name] = {"status": "skipped", "seconds": 0.0}
            self.save()
            return None
        print(f"## {name} ({self.left():.0f} s left)", flush=True)
        began = time.perf_counter()
        try:
            result = run()
            status, reason = "ok", None
        except StageError as error:
            result, status, reason = None, "failed", str(error)
        except Exception as error:  # a stage's own bug must not cost the other stages
            result, status, reason = None, "failed", f"{type(error).__name__}: {error}"
        entry = self.record["stages"].setdefault(name, {})
        entry.update(status=status, seconds=round(time.perf_counter() - began, 1))
        if reason:
            entry["reason"] = reason
            self.failed.append((name, reason))
            print(f"   {name} failed: {reason}", flush=True)
        else:
            print(f"   {name} ok in {entry['seconds']:.0f} s", flush=True)
        self.save()
        return result

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.out.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        temporary.replace(self.out)

    def finish(self) -> str:
        self.record["targets"] = targets(self.record)
        self.record["seconds_total"] = round(time.time() - self.record["started_epoch"], 1)
        if self.failed:
            name, reason = self.failed[0]
            line = f"gpu-check failed {name}: {reason}"
        else:
            line = summary_line(self.record)
        self.record["summary"] = line
        self.save()
        return line


class StageError(Exception):
    """A stage failed for a reason worth one line."""


def environment(kind: str, started: float) -> dict:
    record = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "started_epoch": started,
        "kind": kind,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        **source_state(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        record["gpu_count"] = torch.cuda.device_count()
    return record


def source_state() -> dict:
    """The commit checked: from git, or, where the checkout travelled without its .git (a device
    machine), from what `make gpu-carry` wrote beside the wheels."""
    from soda.tracking import git_state

    state = git_state(REPO)
    if state["git_sha"] != "unknown":
        return {**state, "git_source": "git"}
    carried = REPO / os.environ.get("SODA_CARRY", ".carry") / "source.json"
    if carried.is_file():
        return {**json.loads(carried.read_text()), "git_source": "make gpu-carry"}
    return {**state, "git_source": None}


def run_logged(check: Check, name: str, command: list[str], reserve: float = 0.0) -> subprocess.CompletedProcess:
    """Run a stage's process with what is left of the deadline (less `reserve` for later stages);
    its whole output goes to <work>/<name>.log and its tail into the record."""
    timeout = check.left() - reserve
    if timeout < 5:
        raise StageError(f"no time left ({check.left():.0f} s before the deadline)")
    log_path = check.work / f"{name}.log"
    print(f"   $ {' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        try:
            result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            check.record["stages"].setdefault(name, {})["log_tail"] = _tail(log_path)
            raise StageError(f"timed out after {timeout:.0f} s (the check's deadline)") from None
    check.record["stages"].setdefault(name, {})["log_tail"] = _tail(log_path)
    return result


def _tail(path: Path, lines: int = 25) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:]


# ------------------------------------------------------------------------------------------------
def stage_data(check: Check, args) -> Path:
    """A CIFAR-10 image folder, decoded once into its cache (the later stages read the cache)."""
    from soda.data import load_split

    entry = check.record["stages"].setdefault("data", {})
    if args.data:
        root = args.data
    elif args.archive:
        if not args.archive.is_file():
            raise StageError(
                f"{args.archive} does not exist; give --archive the CIFAR-10 JPEG archive (docs/performance.md)"
            )
        began = time.perf_counter()
        with tarfile.open(args.archive) as archive:
            archive.extractall(check.work / "data", filter="data")
        entry["unpack_seconds"] = round(time.perf_counter() - began, 1)
        root = check.work / "data" / "cifar10"
    elif check.kind == "cpu":
        root = write_tiny_cifar(check.work / "data" / "cifar10")
    elif (REPO / os.environ.get("SODA_DATA", "data") / "cifar10").is_dir():  # where launch.py looks
        root = REPO / os.environ.get("SODA_DATA", "data") / "cifar10"
    else:
        raise StageError(
            "no CIFAR-10: pass --archive or --data, or put it under $SODA_DATA/cifar10 "
            "(make gpu-carry copies cifar10-jpeg.tar.gz into .carry/, which gpu-check.sh passes on)"
        )
    began = time.perf_counter()
    sizes = {}
    for split in ("train", "test"):
        try:
            sizes[split] = len(load_split("cifar10", root, split, 32, 10, download=False))
        except Exception as error:
            raise StageError(f"{split} split of {root}: {error}") from None
    entry.update(root=str(root), decode_seconds=round(time.perf_counter() - began, 1), images=sizes)
    return root


def write_tiny_cifar(root: Path, train_per_class: int = 40, test_per_class: int = 20) -> Path:
    """A CIFAR-10-shaped JPEG folder (10 classes, 32x32): class k is the synthetic shape k % 6 on
    a background tinted by k, so a k-NN on pixels separates the classes well above chance."""
    from PIL import Image

    from soda.data.shapes import make_shapes

    for split, count, seed in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            shapes, _ = make_shapes(count, 32, seed=seed * 100 + label, num_classes=6)
            tint = torch.tensor([(label * 53) % 256, (label * 97) % 256, (label * 151) % 256], dtype=torch.float32)
            images = (0.6 * shapes.float() + 0.4 * tint.view(1, 3, 1, 1)).round().to(torch.uint8)
            for index, image in enumerate(images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.jpg", quality=90)
    return root


def stage_cuda_tests(check: Check) -> dict:
    entry = check.record["stages"].setdefault("cuda_tests", {})
    if check.kind != "cuda":
        # Nothing can run without a GPU; collecting them keeps their imports and parameters honest.
        command = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda", *CUDA_TEST_FILES]
        result = run_logged(check, "cuda_tests", command)
        collected = re.search(r"(\d+)(?:/\d+)? tests? collected", "\n".join(entry["log_tail"]))
        if result.returncode != 0 or not collected:
            raise StageError("pytest could not collect the cuda tests (see the log tail)")
        entry.update(collected=int(collected.group(1)), ran=False, note="no GPU: collected, not run")
        return entry
    report = check.work / "cuda-tests.xml"
    command = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}"]
    command += CUDA_TEST_FILES
    try:
        result = run_logged(check, "cuda_tests", command, reserve=200)
    except StageError:
        entry.update(_outcomes_so_far(check.work / "cuda_tests.log"))  # pytest's report comes at its end
        raise
    if not report.exists():
        raise StageError(f"pytest wrote no report (exit {result.returncode})")
    counts, failures = _junit(report)
    entry.update(counts)
    entry["failures"] = failures
    if counts["failed"] or counts["errors"] or not counts["passed"]:
        first = failures[0] if failures else f"exit {result.returncode}"
        raise StageError(
            f"{counts['failed'] + counts['errors']} of {counts['tests']} cuda tests failed; first: {first}"
        )
    return entry


def _outcomes_so_far(log: Path) -> dict:
    """From pytest -v's lines, what had run when the stage was cut short."""
    outcomes = re.findall(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", log.read_text(errors="replace"))
    return {
        "outcomes_before_timeout": {state: sum(1 for _, s in outcomes if s == state) for _, state in outcomes},
        "failures": [name for name, state in outcomes if state in ("FAILED", "ERROR")],
    }


def _junit(path: Path) -> tuple[dict, list[str]]:
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
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    command = [sys.executable, "bench/throughput.py", *size["bench"], "--workers", str(workers)]
    if data_root is not None:
        command += ["--dataset-root", str(data_root)]
    command += ["--json", str(record_path)]
    result = run_logged(check, "throughput", command, reserve=150 if check.kind == "cuda" else 30)
    if result.returncode != 0 or not record_path.exists():
        raise StageError(f"bench/throughput.py exited {result.returncode}: {_last_line(check, 'throughput')}")
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


def stage_training(
    check: Check, size: dict, data_root: Path | None, train_seconds: float | None, eval_seconds: float | None
) -> dict:
    if data_root is None:
        raise StageError("no data (the data stage failed)")
    entry = check.record["stages"].setdefault("training", {})
    asked = train_seconds or size["train_seconds"]
    overhead = training_overhead(check)
    budget = min(asked, check.left() - overhead)
    if budget < min(30.0, asked):
        raise StageError(f"only {check.left():.0f} s left: not enough for a {asked:.0f} s training budget")
    every = eval_seconds or size["eval_seconds"]
    run_dir = check.work / "run"
    store = check.work / "mlflow.db"
    overrides = [
        *size["train"],
        "dataset=cifar10",
        f"dataset.root={data_root}",
        "dataset.download=false",
        f"schedule.train_seconds={budget:.0f}",
        "eval.at_start=true",
        f"eval.every_seconds={every:g}",
        "eval.linear_probe=last",
        "schedule.checkpoint_every=100000",  # one checkpoint, at the end
        f"tracking.uri=sqlite:///{store}",
        f"tracking.artifact_location={check.work / 'mlartifacts'}",
        "tracking.experiment=gpu-check",
        "tracking.system_metrics=false",
        f"hydra.run.dir={run_dir}",
    ]
    entry.update(
        train_seconds_asked=asked, train_seconds_budget=round(budget), overhead_estimate=overhead, overrides=overrides
    )
    began = time.perf_counter()
    try:
        result = run_logged(check, "training", [sys.executable, "launch.py", *overrides], reserve=5)
    except StageError:
        try:  # cut short: keep the evaluations it had recorded
            entry.update(read_training_record(store))
        except Exception as error:
            entry["unread"] = f"{type(error).__name__}: {error}"
        raise
    entry["process_seconds"] = round(time.perf_counter() - began, 1)
    if result.returncode != 0:
        raise StageError(f"launch.py exited {result.returncode}: {_last_line(check, 'training')}")
    entry.update(read_training_record(store))
    entry["overhead_seconds"] = round(entry["process_seconds"] - entry.get("train_seconds", 0.0), 1)
    return entry


def training_overhead(check: Check) -> float:
    """Seconds the training stage needs besides its budget, given what the earlier stages saw of
    the compile: the bench's time to its first timed step, or a warm cache if the CUDA tests
    passed, or a cold compile."""
    overhead = TRAINING_OVERHEAD_S[check.kind]
    if check.kind != "cuda":
        return overhead
    stages = check.record["stages"]
    seen = stages.get("throughput", {}).get("compile_seconds")
    if seen is not None:
        return overhead + seen
    return overhead + (WARM_COMPILE_S if stages.get("cuda_tests", {}).get("status") == "ok" else COLD_COMPILE_S)


def read_training_record(store: Path) -> dict:
    """The run's evaluations and progress, from its MLflow store (through analysis/, which reads
    every table's records)."""
    from analysis import load_history, load_runs
    from soda import tracking

    uri = f"sqlite:///{store}"
    (run,) = load_runs(uri, ["gpu-check"]).to_dict("records")
    # The timesteps the run measured the gap at, as its config said (a list param: "[500, 700]").
    timesteps = run.get("params.eval.latent_gap_timesteps")
    timesteps = json.loads(timesteps) if isinstance(timesteps, str) else []
    keys = (
        tracking.KNN_ACC,
        tracking.LINEAR_ACC,
        tracking.LATENT_GAP,
        *(tracking.latent_gap_at(timestep) for timestep in timesteps),
        tracking.RECON_MSE,
        tracking.EVAL_SECONDS,
        tracking.IMAGES_SEEN,
        tracking.TRAIN_SECONDS,
        tracking.IMAGES_PER_SECOND,
        tracking.FIRST_STEP_SECONDS,
        tracking.TRAIN_LOSS,
    )
    history = load_history(uri, [run["run_id"]], keys)
    curves = {key: history.loc[history["key"] == key, ["step", "value"]].values.tolist() for key in keys}
    knn, linear, gap = curves[tracking.KNN_ACC], curves[tracking.LINEAR_ACC], curves[tracking.LATENT_GAP]
    images, seconds = curves[tracking.IMAGES_SEEN], curves[tracking.TRAIN_SECONDS]
    first_step = curves[tracking.FIRST_STEP_SECONDS]
    rates = [value for _, value in curves[tracking.IMAGES_PER_SECOND]]
    result = {
        "mlflow_run_id": run["run_id"],
        "status": run["status"],
        "compile": run.get(f"tags.{tracking.COMPILE}"),
        "epochs": int(knn[-1][0]) if knn else 0,
        "knn_start": knn[0][1] if knn else None,
        "knn_end": knn[-1][1] if knn else None,
        "linear_end": linear[-1][1] if linear else None,
        "latent_gap_start": gap[0][1] if gap else None,
        "latent_gap_end": gap[-1][1] if gap else None,
        "images_seen": int(images[-1][1]) if images else 0,
        "train_seconds": seconds[-1][1] if seconds else 0.0,
        "first_step_seconds": first_step[0][1] if first_step else None,
        # Epochs after the first (which includes the warm-up step), as the run logged them.
        "images_per_s_median": sorted(rates[1:])[len(rates[1:]) // 2] if len(rates) > 1 else None,
        "curves": {key: value for key, value in curves.items() if key != tracking.TRAIN_LOSS},
        "loss_points": len(curves[tracking.TRAIN_LOSS]),
    }
    return result


def _last_line(check: Check, name: str) -> str:
    tail = [line for line in check.record["stages"].get(name, {}).get("log_tail", []) if line.strip()]
    return tail[-1][:300] if tail else "no output"


# ------------------------------------------------------------------------------------------------
def targets(record: dict) -> dict:
    """Each target of one H200 against what this check measured (None where it did not measure)."""
    bench = record["stages"].get("throughput", {})
    training = record["stages"].get("training", {})

    def at_least(value, floor):
        return None if value is None else value >= floor

    learning = {
        "knn_end_above_start": None if training.get("knn_end") is None else training["knn_end"] > training["knn_start"],
        "latent_gap_grew": None
        if training.get("latent_gap_end") is None
        else training["latent_gap_end"] > training["latent_gap_start"],
    }
    if record["kind"] != "cuda":  # the throughput targets are an H200's; a CPU says nothing about them
        return {"note": "throughput targets apply to one H200; not judged on a CPU", **learning}
    syncs = bench.get("host_syncs_per_step")
    return {
        "end_to_end_at_least_6000": at_least(bench.get("end_to_end_images_per_s"), TARGETS["end_to_end_images_per_s"]),
        "step_at_least_5400": at_least(bench.get("step_images_per_s"), TARGETS["step_images_per_s"]),
        "zero_host_syncs_per_step": None if syncs is None else syncs == 0,
        # A compile that fell back to eager would make every figure above an eager one.
        "compiled": None if bench.get("compile") is None else bench["compile"] == "compiled",
        **learning,
    }


def summary_line(record: dict) -> str:
    bench = record["stages"].get("throughput", {})
    training = record["stages"].get("training", {})

    def shown(value, digits: int) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.{digits}f}"

    return (
        f"gpu-check ok e2e={shown(bench.get('end_to_end_images_per_s'), 0)} "
        f"step={shown(bench.get('step_images_per_s'), 0)} mfu={shown(bench.get('fraction_of_peak'), 3)} "
        f"knn_start={shown(training.get('knn_start'), 4)} knn_end={shown(training.get('knn_end'), 4)} "
        f"images={training.get('images_seen', '-')} latent_gap={shown(training.get('latent_gap_end'), 4)}"
    )


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
