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

# This file is the command line: the arguments, the environment every stage's process inherits,
# the stages in order, the last line and the exit code. The rest lives beside it in bench/:
#   gpu_record.py    the record across calls, the stages' budgets and the call's deadline, the
#                    targets and the summary line (Check, STAGES, TARGETS);
#   gpu_process.py   a stage's process, run in a process group of its own and ended whole;
#   gpu_stages.py    the data, cuda_tests and throughput stages;
#   gpu_training.py  the training stage: its budget, the launch.py run, its MLflow store read back;
#   gpu_env.py       the machine, the packages and the commit, and the preflight's torch check.

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the sibling modules below
from gpu_record import STAGES, Check, Ended, ended_by_signal
from gpu_stages import stage_cuda_tests, stage_data, stage_throughput
from gpu_training import stage_training

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".gpu-check"
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
    args = parse_arguments()
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

    # The work folder, kept between calls, and where the record goes.
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

    # The record, continued from an earlier call of this commit and machine; from here on a signal
    # ends the call through the stage it is in, which the record then names.
    check = Check(out, work, kind, budgets, deadline, export)
    check.begin(started, stages)
    print(f"# gpu-check ({kind}): {check.record['device']}, torch {torch.__version__}, record {out}", flush=True)
    if check.call_index > 1:
        print(f"# call {check.call_index} of this record: stages done before are kept", flush=True)
    signal.signal(signal.SIGTERM, ended_by_signal)
    signal.signal(signal.SIGHUP, ended_by_signal)
    try:
        run_stages(check, args, size, stages)
    except Ended as ended:  # between stages, or in the preflight
        check.ended_by = ended.number

    # The last line, before anything is cleaned up: whatever comes after it may be cut.
    line = check.finish()
    print(line, flush=True)
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)  # decoded data, checkpoint, caches: hundreds of MB
    if check.ended_by:
        return 128 + check.ended_by
    return 0 if line.startswith("gpu-check ok") else 1


def parse_arguments() -> argparse.Namespace:
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
    return parser.parse_args()


def run_stages(check: Check, args: argparse.Namespace, size: dict, stages: list[str]) -> None:
    """The preflight, then every stage in order: those of this call run, the others keep what an
    earlier call recorded (the data stage's folder too, which the later stages read)."""
    if not check.preflight():
        return
    data_root = check.stage(
        "data", lambda: stage_data(check, args.data, args.archive, args.carried_archive), run_it="data" in stages
    )
    if "data" not in stages:
        data_root = check.earlier_data()
    check.stage("cuda_tests", lambda: stage_cuda_tests(check), run_it="cuda_tests" in stages)
    check.stage("throughput", lambda: stage_throughput(check, size, data_root), run_it="throughput" in stages)
    check.stage(
        "training",
        lambda: stage_training(check, size, data_root, args.train_seconds, args.eval_seconds),
        run_it="training" in stages,
    )


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


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
