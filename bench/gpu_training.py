"""The GPU check's training stage: python launch.py on the reference model and augmentation,
time-boxed to what the stage's budget leaves after a run's overhead (and, on a GPU, loading or
compiling the training graph), with k-NN and eval/latent_gap at the start and every --eval-seconds
and the linear probe at the end; then read back from its MLflow store into the record.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from soda.record import (
    COMPILE,
    EVAL_SECONDS,
    FIRST_STEP_SECONDS,
    IMAGES_PER_SECOND,
    IMAGES_SEEN,
    KNN_ACC,
    LATENT_GAP,
    LINEAR_ACC,
    RECON_MSE,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    latent_gap_at,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the sibling modules below
from gpu_process import last_line, run_logged
from gpu_record import Check, StageError

# What the training stage costs besides its training budget: process start, data from the cache,
# the evaluations (k-NN at the start and every --eval-seconds, the linear probe at the end), the
# final checkpoint; on a GPU also its first step, which loads the compiled graph from the cache
# (WARM_COMPILE_S) or compiles it (COLD_COMPILE_S). The record keeps the estimate and the truth.
TRAINING_OVERHEAD_S = {"cuda": 70.0, "cpu": 45.0}
COLD_COMPILE_S = 165.0
WARM_COMPILE_S = 30.0
MIN_TRAIN_S = 30.0  # a shorter run says nothing about learning


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
    """launch.py within the stage's budget (training_plan), its evaluations read back into the
    stage's entry; those it had recorded are kept when the run is cut short."""
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

    # A new run, in the work folder: nothing of an earlier call's run is resumed or appended to.
    run_dir = check.work / "run"
    store = check.work / "mlflow.db"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run folder of an earlier call would be resumed
    store.unlink(missing_ok=True)
    shutil.rmtree(check.work / "mlartifacts", ignore_errors=True)
    every = eval_seconds or size["eval_seconds"]
    overrides = launch_overrides(size["train"], data_root, budget, every, store, check.work / "mlartifacts", run_dir)
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

    # The run, and what it recorded; its store and run folder go to $OUT however it ends.
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
        raise StageError(f"launch.py exited {returncode}: {last_line(check, 'training')}")
    entry.update(read_training_record(store))
    entry["overhead_seconds"] = round(entry["process_seconds"] - entry.get("train_seconds", 0.0), 1)
    return entry


def launch_overrides(
    train: list[str], data_root: Path, budget: float, every: float, store: Path, artifacts: Path, run_dir: Path
) -> list[str]:
    """launch.py's overrides: the size's model and schedule (`train`) on the CIFAR-10 folder,
    trained for `budget` seconds, k-NN at the start and every `every` seconds, the probe and one
    checkpoint at the end, tracked into the MLflow store `store`."""
    return [
        *train,
        "dataset=cifar10",
        f"dataset.root={data_root}",
        "dataset.download=false",
        f"schedule.train_seconds={budget:.0f}",
        "eval.at_start=true",
        f"eval.every_seconds={every:g}",
        "eval.linear_probe=last",
        "schedule.checkpoint_every=100000",  # one checkpoint, at the end
        f"tracking.uri=sqlite:///{store}",
        f"tracking.artifact_location={artifacts}",
        "tracking.experiment=gpu-check",
        "tracking.system_metrics=false",
        f"hydra.run.dir={run_dir}",
    ]


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

    uri = f"sqlite:///{store}"
    (run,) = load_runs(uri, ["gpu-check"]).to_dict("records")
    # The timesteps the run measured the gap at, as its config said (a list param: "[500, 700]").
    timesteps = run.get("params.eval.latent_gap_timesteps")
    timesteps = json.loads(timesteps) if isinstance(timesteps, str) else []
    keys = (
        KNN_ACC,
        LINEAR_ACC,
        LATENT_GAP,
        *(latent_gap_at(timestep) for timestep in timesteps),
        RECON_MSE,
        EVAL_SECONDS,
        IMAGES_SEEN,
        TRAIN_SECONDS,
        IMAGES_PER_SECOND,
        FIRST_STEP_SECONDS,
        TRAIN_LOSS,
    )
    history = load_history(uri, [run["run_id"]], keys)
    curves = {key: history.loc[history["key"] == key, ["step", "value"]].values.tolist() for key in keys}
    knn, linear, gap = curves[KNN_ACC], curves[LINEAR_ACC], curves[LATENT_GAP]
    images, seconds = curves[IMAGES_SEEN], curves[TRAIN_SECONDS]
    first_step = curves[FIRST_STEP_SECONDS]
    rates = [value for _, value in curves[IMAGES_PER_SECOND]]
    result = {
        "mlflow_run_id": run["run_id"],
        "status": run["status"],
        "compile": run.get(f"tags.{COMPILE}"),
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
        "curves": {key: value for key, value in curves.items() if key != TRAIN_LOSS},
        "loss_points": len(curves[TRAIN_LOSS]),
    }
    return result
