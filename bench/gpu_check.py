"""The GPU questions in one or two short device calls: are the CUDA paths right, how fast is
training, and does the latent start to carry information? (`make gpu-check`, docs/performance.md)

    bash bench/gpu-check.sh --stages data,cuda_tests,throughput   # call 1 (budgets: 330 s)
    bash bench/gpu-check.sh --stages data,training                # call 2, at once (budgets: 300 s)
    bash bench/gpu-check.sh                                       # all stages in one call (570 s)
    python bench/gpu_check.py --smoke                             # any machine: tiny model, tiny data

Stages, in this order, each cut to a fixed budget of its own (SIZES; --budget STAGE=SECONDS) and
run as a process group that is ended whole when cut:
  data        unpack the CIFAR-10 archive and decode both splits into the decode cache the later
              stages read (--smoke: a tiny 10-class JPEG folder). Both are kept in the work folder,
              so a second call finds them decoded.
  cuda_tests  pytest -m cuda. The first test compiles the reference training graph into inductor's
              on-disk cache, in the work folder; the later stages and calls load it from there.
              Without a GPU the tests are only collected.
  throughput  bench/throughput.py: data path, model step and end to end, fast against the
              straightforward baseline, TFLOP/s and fraction of peak, host syncs, memory, compile.
  training    python launch.py on the reference model and augmentation, time-boxed: its training
              budget is the stage's budget less its overhead (more when the compile cache is cold;
              a cold cache that leaves too little trains eager), with k-NN and eval/latent_gap at
              the start and every --eval-seconds, the linear probe at the end; read back from its
              MLflow store.
Before any stage a preflight checks this torch (the oldest supported: gpu_env.MIN_TORCH) and
imports every project module; it stops the check in one line if either fails.

The work folder (default .gpu-check/, git-ignored) keeps the decoded data, the compile cache and
the record of earlier calls: a call continues the record of the same commit and device, so the
second call's record and summary hold both calls' stages. The record goes to $OUT/gpu-check.json
when OUT is set (the device tool brings $OUT back; stage logs, the JUnit XML, the training run's
MLflow store and run folder are written or copied there as each stage ends), else to --out
(default bench/results/gpu-check-<cuda|cpu>.json). It is written when each stage starts and ends
and when the call is ended by a signal. The last line, printed before anything is cleaned up, is
    gpu-check ok e2e=<img/s> step=<img/s> mfu=<fraction> knn_start=<a> knn_end=<b> images=<n> latent_gap=<g>
with ` not_run=<stages>` while stages are still to run, or `gpu-check failed <stage>: <reason>`
naming the first stage that failed or was cut.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_env  # a sibling script's module, found through the line above

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "cuda_tests", "throughput", "training")
WORK = REPO / ".gpu-check"
# The files that hold cuda tests: naming them keeps pytest from importing the other test modules,
# whose dev-only imports (jupytext, scikit-learn, psycopg) a GPU machine may lack.
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/data/test_augment.py", "tests/test_ema.py")
# The targets, on one H100 or H200 alike: about 10x the reference implementation's end-to-end
# throughput, and a model step as fast as bf16 + SDPA + compile make the reference's own step.
TARGETS = {"end_to_end_images_per_s": 6_000, "step_images_per_s": 5_400, "host_syncs_per_step": 0}
# What the training stage costs besides its training budget: process start, data from the cache,
# the evaluations (k-NN at the start and every --eval-seconds, the linear probe at the end), the
# final checkpoint; on a GPU also its first step, which loads the compiled graph from the cache
# (WARM_COMPILE_S) or compiles it (COLD_COMPILE_S). The record keeps the estimate and the truth.
TRAINING_OVERHEAD_S = {"cuda": 70.0, "cpu": 45.0}
COLD_COMPILE_S = 165.0
WARM_COMPILE_S = 30.0
MIN_TRAIN_S = 30.0  # a shorter run says nothing about learning
SIZES = {
    # The reference CIFAR-10 model and augmentation at the reference's global batch on one GPU.
    # Budgets: call 1 (data, cuda_tests, throughput) <= 330 s, call 2 (data, training) <= 300 s.
    "cuda": {
        # 30 timed steps after 5 (the compiled graph comes from the cache the CUDA tests filled);
        # the probes are timed by the training stage (eval/seconds), not here.
        "bench": ["--preset", "reference", "--steps", "30", "--warmup", "5", "--skip-eval"],
        "train": ["model=soda_r18_ddpm", "augmentation=seed", "schedule=reference_800ep"],
        "budgets": {"data": 60.0, "cuda_tests": 180.0, "throughput": 90.0, "training": 240.0},
        "train_seconds": None,  # what the training budget leaves
        "eval_seconds": 45.0,
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
        "budgets": {"data": 120.0, "cuda_tests": 120.0, "throughput": 300.0, "training": 300.0},
        "train_seconds": 8.0,
        "eval_seconds": 3.0,
    },
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU-sized check (the default without a GPU)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="a stage's budget")
    parser.add_argument("--archive", type=Path, help="cifar10-jpeg.tar.gz to unpack (cifar10/{train,test}/<class>/)")
    parser.add_argument(
        "--carried-archive", type=Path, help="the archive make gpu-carry carried: used on a GPU, not with --smoke"
    )
    parser.add_argument("--data", type=Path, help="CIFAR-10 as an image folder or torchvision's batches")
    parser.add_argument("--work", type=Path, help=f"work folder, kept between calls (default {WORK.name}/)")
    parser.add_argument("--fresh", action="store_true", help="empty the work folder first: a new record")
    parser.add_argument("--clean", action="store_true", help="remove the work folder after the last line")
    parser.add_argument("--out", type=Path, help="record path (default: $OUT/gpu-check.json or bench/results/)")
    parser.add_argument("--deadline", type=float, help="seconds for this call from --started: no stage runs past it")
    parser.add_argument("--train-seconds", type=float, help="at most this training budget")
    parser.add_argument("--eval-seconds", type=float, help="k-NN every this many training seconds (GPU 45)")
    parser.add_argument("--started", type=float, help="epoch seconds when the call began (set by gpu-check.sh)")
    args = parser.parse_args()

    # No telemetry: the device machine has no network, and a check measures only the project.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    started = args.started or time.time()
    kind = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    size = SIZES[kind]
    try:
        stages = parse_stages(args.stages)
        budgets = {**size["budgets"], **parse_budgets(args.budget)}
    except ValueError as error:
        print(f"gpu-check failed arguments: {error}", flush=True)
        return 2
    work = (args.work or WORK).resolve()
    if args.fresh and work.is_dir():  # all but the carried packages gpu-check.sh just installed there
        for child in work.iterdir():
            if child.name != "packages":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    export = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    out = args.out or (
        export / "gpu-check.json" if export is not None else REPO / "bench" / "results" / f"gpu-check-{kind}.json"
    )
    # One inductor cache for every process and call of the check: the graph compiled by the CUDA
    # tests is loaded, not compiled again, by the bench and the training run.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    deadline = started + args.deadline if args.deadline else None

    check = Check(out, work, kind, budgets, deadline, export)
    check.begin(started, stages)
    print(f"# gpu-check ({kind}): {check.record['device']}, torch {torch.__version__}, record {out}", flush=True)
    if check.call_index > 1:
        print(f"# call {check.call_index} of this record: stages done before are kept", flush=True)
    signal.signal(signal.SIGTERM, _ended_by_signal)
    signal.signal(signal.SIGHUP, _ended_by_signal)

    try:
        if check.preflight():
            data_root = check.stage("data", lambda: stage_data(check, args), run_it="data" in stages)
            if "data" not in stages:
                data_root = check.earlier_data()
            check.stage("cuda_tests", lambda: stage_cuda_tests(check), run_it="cuda_tests" in stages)
            check.stage("throughput", lambda: stage_throughput(check, size, data_root), run_it="throughput" in stages)
            check.stage(
                "training",
                lambda: stage_training(check, size, data_root, args.train_seconds, args.eval_seconds),
                run_it="training" in stages,
            )
    except Ended as ended:  # between stages, or in the preflight
        check.ended_by = ended.number
    line = check.finish()
    print(line, flush=True)  # the summary first: whatever comes after may be cut
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)  # decoded data, checkpoint, caches: hundreds of MB
    if check.ended_by:
        return 128 + check.ended_by
    return 0 if line.startswith("gpu-check ok") else 1


def parse_stages(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(f"unknown stage {', '.join(unknown) or '(none given)'}; the stages are {','.join(STAGES)}")
    return names


def parse_budgets(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in STAGES:
            raise ValueError(f"--budget {item}: unknown stage {name!r}; the stages are {','.join(STAGES)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise ValueError(f"--budget {item}: give seconds, e.g. --budget {name}=120") from None
    return budgets


class Ended(BaseException):
    """The call was ended by a signal (the device tool's limit, a Ctrl-C of the terminal)."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


def _ended_by_signal(number, frame):
    raise Ended(number)


class StageError(Exception):
    """A stage failed for a reason worth one line."""


class Cut(StageError):
    """A stage ran past its budget and was ended."""


class Check:
    """The record (kept in the work folder across calls, written to `out` too), the stages'
    budgets and the files sent back (`export`: $OUT) as each stage ends."""

    def __init__(self, out: Path, work: Path, kind: str, budgets: dict, deadline: float | None, export: Path | None):
        self.out, self.work, self.kind, self.budgets = out, work, kind, budgets
        self.deadline, self.export = deadline, export
        self.record: dict = {}
        self.call_index = 1
        self.ended_by: int | None = None
        if export is not None:
            export.mkdir(parents=True, exist_ok=True)

    # -- the record ---------------------------------------------------------------------------
    def begin(self, started: float, stages: list[str]) -> None:
        """The environment, and the record of earlier calls of the same commit and machine."""
        carry = REPO / os.environ.get("SODA_CARRY", ".carry")
        current = {
            "kind": self.kind,
            **gpu_env.machine(self.kind),
            **gpu_env.source_state(carry),
            "work": str(self.work),
        }
        earlier = self._earlier()
        if earlier is not None and all(earlier.get(key) == current.get(key) for key in IDENTITY):
            self.record = earlier
            self.call_index = len(earlier.get("calls", [])) + 1
            for entry in self.record.get("stages", {}).values():
                if entry.get("status") == "running":  # that call was killed before it could say so
                    entry.update(status="cut", reason="the call was killed during this stage (no end recorded)")
        else:
            self.record = {"stages": {}, "calls": []}
        self.record.update(current)
        self.record.setdefault("started_epoch", started)
        self.record["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.call = {"call": self.call_index, "when": self.record["when"], "started_epoch": started, "stages": stages}
        self.record["calls"].append(self.call)
        self.save()

    def _earlier(self) -> dict | None:
        try:
            record = json.loads((self.work / "record.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("stages"), dict) else None

    def save(self) -> None:
        text = json.dumps(self.record, indent=2, default=str) + "\n"
        for path in {self.work / "record.json", self.out}:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(text)
            temporary.replace(path)

    def earlier_data(self) -> Path | None:
        """The folder an earlier call's data stage decoded, if it is still there."""
        entry = self.record["stages"].get("data", {})
        root = Path(entry["root"]) if entry.get("status") == "ok" and entry.get("root") else None
        return root if root is not None and root.is_dir() else None

    def send(self, path: Path, name: str) -> None:
        """Copy a file into $OUT (when set), where the device tool brings it back."""
        if self.export is not None and path.is_file():
            shutil.copy2(path, self.export / name)

    def log_path(self, name: str) -> Path:
        """Where a stage's process writes: straight into $OUT when set, so a killed call keeps it."""
        return (self.export if self.export is not None else self.work) / f"gpu-check-{name}.log"

    # -- time -----------------------------------------------------------------------------------
    def timeout(self, name: str) -> tuple[float, str]:
        """A stage's limit and what sets it: its own budget, or the call's deadline if nearer."""
        budget = self.budgets[name]
        if self.deadline is not None and self.deadline - time.time() - 10 < budget:
            return max(0.0, self.deadline - time.time() - 10), "the call's --deadline"
        return budget, f"its {budget:.0f} s budget"

    # -- stages ---------------------------------------------------------------------------------
    def preflight(self) -> bool:
        """This torch is supported and every project module imports: else one line, no stage."""
        began = time.perf_counter()
        problem = gpu_env.torch_problem() or gpu_env.import_problem()
        carried = os.environ.get("SODA_CHECK_PACKAGES")
        self.record["packages"] = gpu_env.packages_used(Path(carried) if carried else None)
        entry = {"status": "ok", "seconds": round(time.perf_counter() - began, 1), "call": self.call_index}
        entry["min_torch"] = ".".join(map(str, gpu_env.MIN_TORCH))
        if problem:
            entry.update(status="failed", reason=problem)
            print(f"   preflight failed: {problem}", flush=True)
        self.record["preflight"] = entry
        self.save()
        return not problem

    def stage(self, name: str, run, run_it: bool = True):
        stages = self.record["stages"]
        if not run_it:  # not asked for in this call: what an earlier call recorded stays
            stages.setdefault(name, {"status": "not run"})
            self.save()
            return None
        if self.ended_by or self.record["preflight"]["status"] != "ok":
            why = "the call was ended" if self.ended_by else "the preflight failed"
            stages[name] = {"status": "not run", "reason": why, "call": self.call_index}
            self.save()
            return None
        limit, _ = self.timeout(name)
        print(f"## {name} (at most {limit:.0f} s)", flush=True)
        entry = stages[name] = {"status": "running", "budget_seconds": self.budgets[name], "call": self.call_index}
        self.save()
        began = time.perf_counter()
        result, reason = None, None
        try:
            result = run()
            status = "ok"
        except Ended as ended:
            self.ended_by = ended.number
            status, reason = "cut", f"the call was ended ({ended}) during this stage"
        except Cut as error:
            status, reason = "cut", str(error)
        except StageError as error:
            status, reason = "failed", str(error)
        except Exception as error:  # a stage's own bug must not cost the other stages
            status, reason = "failed", f"{type(error).__name__}: {error}"
        entry.update(status=status, seconds=round(time.perf_counter() - began, 1))
        if reason:
            entry["reason"] = reason
            print(f"   {name} {status}: {reason}", flush=True)
        else:
            print(f"   {name} ok in {entry['seconds']:.0f} s", flush=True)
        self.save()
        return result

    def finish(self) -> str:
        stages = self.record["stages"]
        self.record["targets"] = targets(self.record)
        self.call["seconds"] = round(time.time() - self.call["started_epoch"], 1)
        if self.ended_by:
            self.call["ended_by"] = signal.Signals(self.ended_by).name
        self.record["seconds_total"] = round(sum(call.get("seconds", 0.0) for call in self.record["calls"]), 1)
        if "preflight" not in self.record:  # ended before the preflight could say
            self.record["preflight"] = {"status": "cut", "reason": "the call was ended during the preflight"}
        problems = [("preflight", self.record["preflight"])] + [(name, stages.get(name, {})) for name in STAGES]
        failed = [(name, entry) for name, entry in problems if entry.get("status") in ("failed", "cut")]
        if failed:
            name, entry = failed[0]
            line = f"gpu-check failed {name}: {entry.get('reason', entry['status'])}"
        else:
            line = summary_line(self.record)
            not_run = [name for name in STAGES if stages.get(name, {}).get("status") != "ok"]
            if not_run:
                line += f" not_run={','.join(not_run)}"
        self.record["summary"] = self.call["summary"] = line
        self.save()
        return line


# What must be equal for a call to continue an earlier call's record.
IDENTITY = ("kind", "device", "torch", "git_sha", "git_dirty", "git_changed")


def run_logged(check: Check, name: str, command: list[str], shown: str | None = None) -> int:
    """Run a stage's process in a process group of its own, within the stage's limit: its whole
    output goes to the stage's log (in $OUT when set), its tail into the record. Cut or ended, the
    whole group is ended, grandchildren (DDP ranks, pytest workers) too."""
    limit, by = check.timeout(name)
    if limit < 1:
        raise Cut(f"no time left before {by}")
    entry = check.record["stages"][name]
    log_path = check.log_path(name)
    print(f"   $ {shown or ' '.join(command)}", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            entry["group_ended"] = end_group(process)
            entry["log_tail"] = _tail(log_path)
            raise Cut(f"cut at {by}; its process group was ended") from None
        except BaseException:
            entry["group_ended"] = end_group(process)
            entry["log_tail"] = _tail(log_path)
            raise
    left = end_group(process)  # what a finished stage left behind must not hold the GPU for the next
    if left:
        entry["group_ended"] = left
    entry["log_tail"] = _tail(log_path)
    return returncode


def end_group(process: subprocess.Popen, grace: float = 10.0) -> str | None:
    """End every process of the group the stage's process leads: SIGTERM, then SIGKILL after
    `grace` seconds. Says what it had to do, or None when the group was already gone."""
    group = process.pid

    def alive() -> bool:
        try:
            os.killpg(group, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    if process.poll() is not None and not alive():
        return None
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    until = time.time() + grace
    while time.time() < until:
        process.poll()
        if not alive():
            process.wait()
            return "SIGTERM"
        time.sleep(0.2)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    return "SIGKILL"


def _tail(path: Path, lines: int = 25) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------------
# The data stage's decode, in a process of its own so that the stage's budget can end it.
DECODE = (
    "import json, sys\n"
    "from soda.data import load_split\n"
    "sizes = {s: len(load_split('cifar10', sys.argv[1], s, 32, 10, download=False)) for s in ('train', 'test')}\n"
    "print('decoded ' + json.dumps(sizes))\n"
)


def stage_data(check: Check, args) -> Path:
    """A CIFAR-10 image folder in the work folder, decoded into its cache (the later stages and
    calls read the cache). An archive already unpacked there is not unpacked again."""
    entry = check.record["stages"]["data"]
    archive = args.archive or (args.carried_archive if check.kind == "cuda" else None)
    if args.data:
        root, entry["source"] = args.data, str(args.data)
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
        raise StageError(f"decoding {root} failed: {_last_line(check, 'data')}")
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
    counts, failures = _junit(report)
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
    record_path.unlink(missing_ok=True)
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    command = [sys.executable, "bench/throughput.py", *size["bench"], "--workers", str(workers)]
    if data_root is not None:
        command += ["--dataset-root", str(data_root)]
    command += ["--json", str(record_path)]
    returncode = run_logged(check, "throughput", command)
    if returncode != 0 or not record_path.exists():
        raise StageError(f"bench/throughput.py exited {returncode}: {_last_line(check, 'throughput')}")
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


def compile_cache_warm() -> bool:
    """Whether inductor's on-disk cache holds compiled graphs (an earlier stage or call's)."""
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""))
    return bool(os.environ.get("TORCHINDUCTOR_CACHE_DIR")) and cache.is_dir() and any(cache.rglob("*.py"))


def training_plan(check: Check, asked: float | None) -> dict:
    """The training budget the stage's budget holds: the budget less the overhead of a run and, on
    a GPU, of loading the compiled graph (warm cache) or compiling it (cold). Judged from the cache
    on disk, never from a stage that may not have run. A cold cache that leaves under MIN_TRAIN_S
    trains eager: slower, but the learning question still gets an answer."""
    limit, _ = check.timeout("training")
    overhead = TRAINING_OVERHEAD_S[check.kind]
    plan = {"limit": limit, "compile": "auto", "cache": None}
    if check.kind == "cuda":
        warm = compile_cache_warm()
        plan["cache"] = "warm" if warm else "cold"
        with_compile = overhead + (WARM_COMPILE_S if warm else COLD_COMPILE_S)
        if limit - with_compile >= MIN_TRAIN_S:
            overhead = with_compile
        else:
            plan["compile"] = "none"
            plan["why_eager"] = (
                f"the compile cache is cold and {limit:.0f} s cannot hold a {COLD_COMPILE_S:.0f} s compile, "
                f"{overhead:.0f} s of overhead and {MIN_TRAIN_S:.0f} s of training: trained eager"
            )
    plan["overhead_estimate"] = overhead
    available = limit - overhead
    plan["train_seconds"] = min(asked, available) if asked else available
    return plan


def stage_training(
    check: Check, size: dict, data_root: Path | None, train_seconds: float | None, eval_seconds: float | None
) -> dict:
    if data_root is None:
        raise StageError("no data (the data stage did not run or failed)")
    entry = check.record["stages"]["training"]
    asked = train_seconds or size["train_seconds"]
    plan = training_plan(check, asked)
    budget = plan["train_seconds"]
    if budget < min(MIN_TRAIN_S, asked or MIN_TRAIN_S):
        raise StageError(
            f"the stage's {plan['limit']:.0f} s leave {budget:.0f} s of training after "
            f"{plan['overhead_estimate']:.0f} s of overhead; give it more with --budget training=SECONDS"
        )
    every = eval_seconds or size["eval_seconds"]
    run_dir = check.work / "run"
    store = check.work / "mlflow.db"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run folder of an earlier call would be resumed
    store.unlink(missing_ok=True)
    shutil.rmtree(check.work / "mlartifacts", ignore_errors=True)
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
    if plan["compile"] == "none":
        overrides.append("schedule.compile=none")
        entry["eager_because"] = plan["why_eager"]
    entry.update(
        train_seconds_asked=asked,
        train_seconds_budget=round(budget),
        overhead_estimate=plan["overhead_estimate"],
        compile_cache=plan["cache"],
        overrides=overrides,
    )
    check.save()
    began = time.perf_counter()
    try:
        returncode = run_logged(check, "training", [sys.executable, "launch.py", *overrides])
    except BaseException:
        try:  # cut short: keep the evaluations it had recorded
            entry.update(read_training_record(store))
        except Exception as error:
            entry["unread"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        send_training_run(check, store, run_dir)
    entry["process_seconds"] = round(time.perf_counter() - began, 1)
    if returncode != 0:
        raise StageError(f"launch.py exited {returncode}: {_last_line(check, 'training')}")
    entry.update(read_training_record(store))
    entry["overhead_seconds"] = round(entry["process_seconds"] - entry.get("train_seconds", 0.0), 1)
    return entry


def send_training_run(check: Check, store: Path, run_dir: Path) -> None:
    """The run's MLflow store, and its run folder and artifacts without checkpoints, into $OUT."""
    if check.export is None:
        return
    check.send(store, "gpu-check-mlflow.db")
    with tarfile.open(check.export / "gpu-check-training-run.tar.gz", "w:gz") as packed:
        for folder in (run_dir, check.work / "mlartifacts"):
            if folder.is_dir():
                packed.add(folder, arcname=folder.name, filter=_no_checkpoints)


def _no_checkpoints(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if member.name.endswith((".pt", ".ckpt", ".lock")) else member


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
    """Each target of one H100 or H200 against what this check measured (None where it did not)."""
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
    if record["kind"] != "cuda":  # the throughput targets are a GPU's; a CPU says nothing about them
        return {"note": "throughput targets apply to one H100 or H200; not judged on a CPU", **learning}
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
