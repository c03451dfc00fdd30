"""Fault campaign: kill it, crowd it, feed it garbage, and count what is lost.

    python bench/faults.py                   # every campaign (make faults)
    python bench/faults.py --only kills garbage --kills 5

Everything goes through the project's public command (`python launch.py ...`) as real processes,
on the CPU, with tiny configs, in a scratch folder (--workdir, default a temporary one). Each
campaign prints one summary line; the last line is `faults passed=<n> failed=<m>`, counting
checks. The exit status is 1 when any check failed.

  kills    the demo experiment SIGKILLed at --kills seeded random moments (a third timed inside a
           checkpoint write, a third inside an MLflow metric write, via soda/faults.py marks) and
           restarted each time; then: the run finished, once in MLflow, with every epoch's eval
           metrics exactly once, its params and config, no partial checkpoint ever loaded, no
           temporary files left, and final metrics equal to an uninterrupted run's, exactly.
  requeue  a 2-task SLURM job preempted (SIGTERM + USR2, as SLURM and submitit do) and requeued 3
           times at random moments: the same guarantees as `kills`, against an uninterrupted job.
  crowd    16 concurrent trials (a sweep, 4 in flight on the local launcher) writing to the
           embedded SQLite store, then to an MLflow server on PostgreSQL (make postgres-up):
           metric points written (each run's own count) against read back, lock errors, time.
  trials   an 8-trial sweep where one trial raises, one diverges to NaN and one is SIGKILLed: the
           other 5 finish, the 3 are FAIL in Optuna and FAILED in MLflow with their errors, and
           re-running the same command retries only those 3.
  garbage  bad inputs (config overrides, sweep settings, data folders, checkpoints, tracking URIs,
           launcher settings): each must exit non-zero with one `error:` line naming the problem,
           without a traceback, and leave the store's earlier record as it was.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.slurm import preempt, release_requeued, squeue  # noqa: E402

# A few seconds per epoch on two CPU cores: the demo's data and model, smaller.
TINY = [
    "experiment=demo",
    "dataset.train_size=384",
    "dataset.test_size=128",
    "schedule.batch_size=64",
    "schedule.log_every=2",
    "schedule.checkpoint_every=1",
    "eval.every=1",
    "eval.at_start=false",
    "eval.batch_size=128",
    "eval.probe_epochs=3",
    "eval.num_reconstructions=2",
    "eval.sample_steps=3",
]


@dataclass
class Tally:
    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            self.failures.append(what)
            print(f"    FAILED: {what}", flush=True)
        return ok


def launch_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), *args]


def tracking(work: Path, experiment: str) -> list[str]:
    return [
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"tracking.artifact_location={work}/artifacts",
        f"tracking.experiment={experiment}",
    ]


def environment(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1", "TQDM_DISABLE": "1"}
    env.pop("SODA_FAULT_MARKS", None)
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------
# Kills at random moments


@dataclass
class Attempt:
    returncode: int
    output: str
    killed: bool
    seconds: float


def run_and_maybe_kill(
    command: list[str], env: dict, mark: str | None = None, occurrence: int = 1, delay: float = 0.0
) -> Attempt:
    """Run `command`; SIGKILL its process group `delay` seconds after the `occurrence`-th
    `soda-fault-mark <mark>` line (mark given), or `delay` seconds after the start (no mark).
    delay=None: never kill."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        seen = 0
        for line in process.stdout:
            lines.append(line)
            if mark is not None and line.strip() == f"soda-fault-mark {mark}":
                seen += 1
                if seen == occurrence:
                    reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = False
    if delay is not None:
        if mark is None:
            target = time.perf_counter() + delay
            while process.poll() is None and time.perf_counter() < target:
                time.sleep(0.01)
        else:
            while process.poll() is None and not reached.wait(0.01):
                pass
            if reached.is_set():
                time.sleep(delay)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
    process.wait(timeout=600)
    reader.join(timeout=10)
    return Attempt(process.returncode, "".join(lines), killed, time.perf_counter() - started)


def final_metrics(output: str) -> dict[str, str] | None:
    """The `final k=v ...` line launch.py prints at the end of a run, as strings (exact)."""
    for line in output.splitlines():
        if line.startswith("final "):
            return dict(part.split("=", 1) for part in line.split("(")[0].split()[1:])
    return None


def campaign_kills(work: Path, tally: Tally, kills: int, seed: int) -> str:
    import mlflow

    epochs = 4
    base = [*TINY, f"schedule.epochs={epochs}", *tracking(work, "faults-kills")]
    reference = run_and_maybe_kill(launch_command(*base, f"hydra.run.dir={work}/reference"), environment(), delay=None)
    if not tally.check(reference.returncode == 0, f"kills: the uninterrupted run failed:\n{reference.output[-2000:]}"):
        return "kills: the uninterrupted reference run failed"
    print(f"    uninterrupted run: {reference.seconds:.0f} s, final {final_metrics(reference.output)}", flush=True)

    rng = random.Random(seed)
    plan = [("checkpoint.write", i) for i in range(kills // 3)] + [("mlflow.log_metrics", i) for i in range(kills // 3)]
    plan += [(None, i) for i in range(kills - len(plan))]
    rng.shuffle(plan)
    env = environment(SODA_FAULT_MARKS="checkpoint.write,mlflow.log_metrics")
    rounds, done, where = [], 0, {"checkpoint.write": 0, "mlflow.log_metrics": 0, None: 0}
    while done < kills:
        run_dir = work / f"killed-{len(rounds)}"
        command = launch_command(*base, f"hydra.run.dir={run_dir}")
        outputs, completed = [], None
        while done < kills:
            mark, _ = plan[done]
            if mark is None:
                attempt = run_and_maybe_kill(command, env, delay=rng.uniform(0.5, reference.seconds))
            else:
                # Not always the first write of the process, and at a random instant inside it.
                attempt = run_and_maybe_kill(
                    command, env, mark, occurrence=rng.randint(1, 4), delay=rng.uniform(0.0, 0.05)
                )
            outputs.append(attempt.output)
            if attempt.killed:
                done += 1
                where[mark] += 1
                continue
            completed = attempt  # it finished before the kill came: this round is over
            break
        if completed is None:  # the kills are spent: restart once more and let it finish
            completed = run_and_maybe_kill(command, env, delay=None)
            outputs.append(completed.output)
        rounds.append((run_dir, outputs, completed))

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("faults-kills")
    final_keys = ("eval/knn_acc", "eval/linear_acc", "eval/recon_mse")

    def recorded_finals(run_dir: Path) -> dict[str, float] | None:
        """The last eval values as MLflow holds them (full precision, not the printed 4 digits)."""
        runs = client.search_runs([experiment.experiment_id], f"tags.run_dir = '{run_dir.resolve()}'")
        return {k: runs[0].data.metrics.get(k) for k in final_keys} if len(runs) == 1 else None

    expected = recorded_finals(work / "reference")
    all_equal = True
    for run_dir, outputs, completed in rounds:
        name = run_dir.name
        tally.check(completed.returncode == 0, f"kills/{name}: the last restart failed:\n{completed.output[-2000:]}")
        got = recorded_finals(run_dir)
        all_equal &= got == expected
        tally.check(got == expected, f"kills/{name}: final metrics {got} differ from the uninterrupted {expected}")
        everything = "".join(outputs)
        tally.check(
            "is unreadable" not in everything and "CheckpointError" not in everything,
            f"kills/{name}: a restart met a damaged checkpoint",
        )
        leftovers = sorted(p.name for p in (run_dir / "checkpoints").glob("*.tmp"))
        tally.check(not leftovers, f"kills/{name}: temporary checkpoint files left behind: {leftovers}")
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.run_dir = '{run_dir.resolve()}'", max_results=50
        )
        if not tally.check(len(runs) == 1, f"kills/{name}: {len(runs)} MLflow runs for one run directory"):
            continue
        run = runs[0]
        tally.check(run.info.status == "FINISHED", f"kills/{name}: MLflow status {run.info.status}")
        for key in ("eval/knn_acc", "eval/linear_acc", "eval/recon_mse"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            tally.check(steps == list(range(1, epochs + 1)), f"kills/{name}: {key} recorded at steps {steps}")
        losses = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        tally.check(len(losses) == len(set(losses)), f"kills/{name}: duplicate train/loss steps")
        tally.check("seed" in run.data.params and "model.arch" in run.data.params, f"kills/{name}: params missing")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        tally.check("config.yaml" in artifacts, f"kills/{name}: config.yaml missing from the run")
    return (
        f"kills: {done} SIGKILLs ({where['checkpoint.write']} in checkpoint writes, {where['mlflow.log_metrics']} "
        f"in MLflow writes, {where[None]} at random times) over {len(rounds)} run(s); each finished once in "
        f"MLflow with every epoch's metrics once and final metrics {'bit-equal to' if all_equal else 'DIFFERENT from'} "
        f"the uninterrupted run"
    )


# ------------------------------------------------------------------------------------------------
# Garbage in


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str  # a fragment the error line must contain (case-insensitive)
    setup: object = None  # callable(work) -> None, before the run
    env: dict = field(default_factory=dict)
    file_size_limit: int | None = None  # bytes one file may grow to (the disk is "full" beyond)
    verify: object = None  # callable(work) -> a problem found afterwards, or None


def _image_folder(root: Path, broken=None) -> Path:
    """A tiny valid image folder train/<class>/*.png, test/<class>/*.png; `broken(root)` spoils it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    if broken is not None:
        broken(root)
    return root


def _truncated_jpeg(root: Path) -> None:
    from PIL import Image

    path = root / "train" / "cat" / "bad.jpg"
    Image.new("RGB", (16, 16), "red").save(path, quality=90)
    path.write_bytes(path.read_bytes()[:60])


def garbage_cases(work: Path) -> list[Case]:
    data = work / "data"
    folder = ["dataset=imagefolder", "dataset.num_classes=2", "dataset.image_size=16"]
    run_dir = work / "garbage-run"

    def folder_case(name: str, expect: str, spoil) -> Case:
        """A tiny image folder of its own, spoilt by `spoil(root)`."""
        root = data / name.replace(" ", "-")
        return Case(name, [*folder, f"dataset.root={root}"], expect, lambda _work: _image_folder(root, spoil))

    def checkpoint(content: bytes | None = None, other_model: bool = False):
        def make(_work: Path) -> None:
            path = run_dir / "checkpoints" / "last.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            if other_model:  # the earlier run's real checkpoint; the case asks for another latent size
                shutil.copy(work / "earlier" / "checkpoints" / "last.pt", path)
            else:
                path.write_bytes(content)

        return make

    full_disk_run = work / "full-disk-run"

    def full_disk_record(_work: Path) -> str | None:
        """The run that could not checkpoint is a complete FAILED record saying why, and left no
        partial checkpoint or temporary file behind."""
        with sqlite3.connect(f"file:{work}/full-disk.db?mode=ro", uri=True) as connection:
            runs = connection.execute(
                "SELECT status, (SELECT value FROM tags WHERE tags.run_uuid = runs.run_uuid AND key = 'error') "
                "FROM runs"
            ).fetchall()
        if len(runs) != 1 or runs[0][0] != "FAILED" or "cannot write checkpoint" not in (runs[0][1] or ""):
            return f"expected one FAILED run whose error names the checkpoint write, found {runs}"
        left = sorted(p.name for p in (full_disk_run / "checkpoints").glob("*"))
        return f"files left in checkpoints/: {left}" if left else None

    def readonly_store(_work: Path) -> None:
        # A copy of the store opened read-only by SQLite itself (file permissions do not stop root).
        store = work / "readonly"
        store.mkdir(exist_ok=True)
        shutil.copy(work / "mlflow.db", store / "mlflow.db")

    return [
        # Config overrides
        Case("unknown key", ["schedule.epochz=3"], "epochz"),
        Case("unknown group option", ["model=resnet9000"], "resnet9000"),
        Case("value of the wrong type", ["schedule.epochs=many"], "epochs"),
        Case("batch of one", ["schedule.batch_size=1"], "batch_size"),
        Case("batch larger than the data", [*TINY, "schedule.batch_size=100000"], "larger than the training set"),
        Case("negative learning rate", ["schedule.decoder_lr=-1"], "decoder_lr"),
        Case("unknown precision", ["schedule.precision=fp8"], "precision"),
        Case("unknown compile mode", ["schedule.compile=turbo"], "compile"),
        Case("latent not divisible into layer groups", ["model.layer_groups=3"], "layer_groups"),
        Case("unknown augmentation view", ["augmentation/view@augmentation.source=wobble"], "wobble"),
        Case("image size zero", ["dataset.image_size=0"], "image_size"),
        # Images of another size in a folder are resized by design (README, Data); a size the
        # model cannot take is the error.
        Case("image size the UNet cannot halve", ["dataset.image_size=15"], "cannot be halved"),
        Case("unknown device", ["device=tpu"], "device"),
        # Sweep settings
        Case("unknown sweep", ["-m", "sweep=nonexistent"], "nonexistent"),
        Case("sweep over an unknown key", ["-m", "sweep=lr_search", "schedule.epochz=choice(1,2)"], "epochz"),
        Case("empty interval", ["-m", "sweep=lr_search", "schedule.decoder_lr=interval(1,0)"], "interval"),
        Case("grid over an interval", ["-m", "sweep=augment_ablation", "schedule.decoder_lr=interval(0.1,1)"], "grid"),
        # Data folders
        folder_case("empty class folder", "empty", lambda root: (root / "train" / "bird").mkdir()),
        folder_case(
            "non-image file", "notes.txt", lambda root: (root / "train" / "cat" / "notes.txt").write_text("hi")
        ),
        folder_case("truncated JPEG", "bad.jpg", _truncated_jpeg),
        Case(
            "class count differs from the config",
            ["dataset=imagefolder", "dataset.num_classes=10", f"dataset.root={data}/two-classes"],
            "num_classes",
            lambda w: _image_folder(data / "two-classes"),
        ),
        Case(
            "missing data, download off",
            ["dataset=cifar10", f"dataset.root={data}/nowhere", "dataset.download=false"],
            "not found",
        ),
        folder_case("corrupt decode cache", "cache", _corrupt_cache),
        # Checkpoints
        Case(
            "truncated checkpoint",
            [*TINY, f"hydra.run.dir={run_dir}"],
            "checkpoint",
            checkpoint(b"PK\x03\x04 truncated"),
        ),
        Case(
            "checkpoint of another model",
            [*TINY, "model.latent_dim=32", f"hydra.run.dir={run_dir}"],
            "other settings",
            checkpoint(other_model=True),
        ),
        Case("not a checkpoint", [*TINY, f"hydra.run.dir={run_dir}"], "checkpoint", checkpoint(b"just some text\n")),
        Case(
            # The operating system refuses the write past 32 MiB (a full disk, a quota, `ulimit -f`).
            "disk full during a checkpoint write",
            [
                *TINY,
                "schedule.epochs=1",
                f"hydra.run.dir={full_disk_run}",
                f"tracking.uri=sqlite:///{work}/full-disk.db",
            ],
            "cannot write checkpoint",
            file_size_limit=32 * 2**20,
            verify=full_disk_record,
        ),
        # Tracking URIs
        Case("unreachable tracking server", [*TINY, "tracking.uri=http://127.0.0.1:9"], "127.0.0.1:9"),
        Case("unknown tracking scheme", [*TINY, "tracking.uri=gopher://example"], "gopher"),
        Case(
            "read-only tracking store",
            [*TINY, f"tracking.uri='sqlite:///file:{work}/readonly/mlflow.db?mode=ro&uri=true'"],
            "read-only",
            readonly_store,
        ),
        # Launcher settings
        Case(
            "zero tasks per node",
            ["-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=0", "seed=1,2"],
            "tasks_per_node",
        ),
        Case(
            "GPUs on a CPU machine", ["-m", "hydra/launcher=local", "hydra.launcher.gpus_per_node=2", "seed=1,2"], "gpu"
        ),
        Case(
            "unknown SLURM partition",
            ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=nope", "seed=1,2"],
            "nope",
        ),
    ]


def _limit_file_size(size: int):
    def limit() -> None:  # in the child, before exec; CPython ignores SIGXFSZ, so writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return limit


def _corrupt_cache(root: Path) -> None:
    cache = root / ".soda-cache"
    cache.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (cache / f"imagefolder-{split}-16px.pt").write_bytes(b"not a tensor file")


def _store_snapshot(database: Path) -> tuple:
    """Every run, metric and param row of the store: an earlier record must survive as it was."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        return tuple(
            tuple(connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall())
            for table in ("runs", "metrics", "params")
        )


def campaign_garbage(work: Path, tally: Tally, quick: bool = False) -> str:
    # An earlier record that every bad input must leave alone.
    record = run_and_maybe_kill(
        launch_command(*TINY, "schedule.epochs=1", *tracking(work, "faults-garbage"), f"hydra.run.dir={work}/earlier"),
        environment(),
        delay=None,
    )
    if not tally.check(record.returncode == 0, f"garbage: the earlier run failed:\n{record.output[-2000:]}"):
        return "garbage: could not make the earlier record"
    before = _store_snapshot(work / "mlflow.db")
    cases = garbage_cases(work)
    if quick:
        cases = [case for case in cases if case.name in QUICK_CASES]
    slowest, ok = 0.0, 0
    for case in cases:
        if case.setup is not None:
            case.setup(work)
        command = launch_command(
            *case.args,
            *(a for a in tracking(work, "faults-garbage") if not any(x.startswith(a.split("=")[0]) for x in case.args)),
            f"hydra.sweep.dir={work}/multirun",
            *(
                []
                if any(a.startswith("hydra.run.dir") for a in case.args)
                else [f"hydra.run.dir={work}/bad-{len(case.name)}"]
            ),
        )
        started = time.perf_counter()
        result = subprocess.run(
            command,
            cwd=REPO,
            env=environment(**case.env),
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=None if case.file_size_limit is None else _limit_file_size(case.file_size_limit),
        )
        seconds = time.perf_counter() - started
        slowest = max(slowest, seconds)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        error_lines = [line for line in lines if line.startswith("error:")]
        message = error_lines[-1] if error_lines else (lines[-1] if lines else "(no output)")
        good = (
            result.returncode != 0
            and len(error_lines) == 1
            and "Traceback" not in result.stderr
            and case.expect.lower() in message.lower()
        )
        problem = case.verify(work) if good and case.verify is not None else None
        if problem is not None:
            good = False
            message = f"{message[:120]} -- but {problem}"
        ok += good
        print(
            f"    {'ok ' if good else 'BAD'} {case.name:42s} rc={result.returncode} {seconds:4.1f}s  {message[:200]}",
            flush=True,
        )
        tally.check(good, f"garbage/{case.name}: rc={result.returncode}, stderr tail:\n{result.stderr[-1500:]}")
        after = _store_snapshot(work / "mlflow.db")
        tally.check(after == before, f"garbage/{case.name}: the store changed (earlier record or a half-written run)")
        before = after
    return f"garbage: {ok}/{len(cases)} bad inputs ended in one error line with a non-zero exit, slowest {slowest:.1f} s; the earlier record intact"


# ------------------------------------------------------------------------------------------------
# Failing trials

CAMPAIGN_SWEEP = """# @package _global_
defaults:
  - override /hydra/sweeper: optuna
objective: eval/linear_acc
sweep:
  study_name: faults_trials
  n_jobs: 2
  max_failure_rate: 0.5
hydra:
  sweeper:
    direction: maximize
    sampler:
      name: grid
    params:
      +campaign: choice(ok1, ok2, ok3, ok4, ok5, raises, diverges, killed)
"""
# Each option is a normal config; three of them fail at run time, as real mistakes do.
CAMPAIGN_OPTIONS = {
    **{f"ok{i}": f"seed: {i}\n" for i in range(1, 6)},
    # Data that is not there: a DataError once the trial runs (composing it, as the sweeper does
    # before launching, cannot know).
    "raises": "defaults:\n  - override /dataset: imagefolder\nseed: 6\ndataset:\n  root: /nonexistent/soda-faults\n",
    "diverges": "seed: 7\nschedule:\n  decoder_lr: 1.0e+12\n",  # the loss turns NaN: DivergenceError
    "killed": "seed: 13\n",  # SIGKILLed by the campaign while it trains (first sweep only)
}
EXPECTED_ERRORS = {
    "raises": "not found under /nonexistent/soda-faults",
    "diverges": "train/loss is nan",
    "killed": "job died",
}


def campaign_failing_trials(work: Path, tally: Tally) -> str:
    import mlflow
    import optuna

    from soda.sweep import open_storage

    search = work / "conf"
    (search / "sweep").mkdir(parents=True, exist_ok=True)
    (search / "campaign").mkdir(parents=True, exist_ok=True)
    (search / "sweep" / "faults_trials.yaml").write_text(CAMPAIGN_SWEEP)
    for name, text in CAMPAIGN_OPTIONS.items():
        (search / "campaign" / f"{name}.yaml").write_text("# @package _global_\n" + text)
    command = launch_command(
        "-m",
        f"hydra.searchpath=[file://{search}]",
        "sweep=faults_trials",
        *TINY,
        "schedule.epochs=2",
        *tracking(work, "faults-trials"),
        f"sweep.storage={work}/optuna.log",
        f"hydra.sweep.dir={work}/sweep",
    )
    uri = f"sqlite:///{work}/mlflow.db"
    client = mlflow.MlflowClient(uri)

    def kill_seed_13() -> str:
        """Wait for the trial with seed 13 to be training, then SIGKILL its process (its pid is
        an MLflow tag), as the kernel's OOM killer would."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            experiment = client.get_experiment_by_name("faults-trials")
            if experiment is not None:
                runs = client.search_runs(
                    [experiment.experiment_id], "params.seed = '13' and attributes.status = 'RUNNING'"
                )
                if runs and "pid" in runs[0].data.tags:
                    time.sleep(2)
                    os.kill(int(runs[0].data.tags["pid"]), signal.SIGKILL)
                    return "killed"
            time.sleep(0.2)
        return "never saw the trial with seed 13 running"

    first = subprocess.Popen(
        command, cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killer_result = kill_seed_13()
    output, _ = first.communicate(timeout=1800)
    tally.check(killer_result == "killed", f"trials: {killer_result}")
    tally.check(first.returncode == 0, f"trials: the sweep exited {first.returncode}:\n{output[-3000:]}")

    def states() -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[tuple[str, str]]]]:
        """Per option: (state, error) of its Optuna trials, and (status, error) of their MLflow
        runs (found by the trial number tag: a trial that died before its run started has a run
        the sweeper made, without the trial's params)."""
        try:
            study = optuna.load_study(study_name="faults_trials", storage=open_storage(f"{work}/optuna.log"))
        except KeyError:  # the sweep never created its study
            return {}, {}
        experiment = client.get_experiment_by_name("faults-trials")
        runs = client.search_runs([experiment.experiment_id], "tags.trial != ''", max_results=500) if experiment else []
        run_of = {run.data.tags["trial"]: run for run in runs}
        optuna_states: dict[str, list[tuple[str, str]]] = {}
        mlflow_states: dict[str, list[tuple[str, str]]] = {}
        for trial in study.trials:
            option = trial.params["+campaign"]
            optuna_states.setdefault(option, []).append((trial.state.name, trial.user_attrs.get("error", "")))
            run = run_of.get(str(trial.number))
            if run is not None:
                mlflow_states.setdefault(option, []).append((run.info.status, run.data.tags.get("error", "")))
        return optuna_states, mlflow_states

    trials, runs = states()
    for option in CAMPAIGN_OPTIONS:
        expected_state = "FAIL" if option in EXPECTED_ERRORS else "COMPLETE"
        got = trials.get(option, [])
        tally.check(
            [state for state, _ in got] == [expected_state],
            f"trials/{option}: Optuna states {got}, expected {expected_state}",
        )
        mlflow_expected = "FAILED" if option in EXPECTED_ERRORS else "FINISHED"
        recorded = runs.get(option, [])
        tally.check(
            [status for status, _ in recorded] == [mlflow_expected],
            f"trials/{option}: MLflow runs {recorded}, expected one {mlflow_expected}",
        )
        if option in EXPECTED_ERRORS:
            fragment = EXPECTED_ERRORS[option]
            tally.check(bool(got) and fragment in got[0][1], f"trials/{option}: Optuna error {got[:1]!r}")
            tally.check(
                bool(recorded) and fragment in recorded[0][1], f"trials/{option}: MLflow error {recorded[:1]!r}"
            )

    # The same command again: only the three unfinished parameter sets run, as new trials.
    second = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=1800)
    tally.check(second.returncode == 0, f"trials: the re-run exited {second.returncode}:\n{second.stderr[-3000:]}")
    trials, runs = states()
    rerun = sorted(option for option, got in trials.items() if len(got) > 1)
    tally.check(rerun == ["diverges", "killed", "raises"], f"trials: the re-run retried {rerun}")
    tally.check(
        [state for state, _ in trials.get("killed", [])] == ["FAIL", "COMPLETE"],
        f"trials: the killed trial's re-run: {trials.get('killed')}",
    )
    tally.check(
        sum(len(v) for v in runs.values()) == 11,
        f"trials: {sum(len(v) for v in runs.values())} MLflow child runs, expected 11",
    )
    complete = sum(state == "COMPLETE" for got in trials.values() for state, _ in got)
    return (
        f"trials: 8-trial sweep, 1 raised, 1 diverged to NaN, 1 SIGKILLed; {complete - 1} finished in the first sweep, "
        f"the 3 failures recorded with their errors in Optuna and MLflow; the re-run retried {len(rerun)} ({', '.join(rerun)})"
    )


# ------------------------------------------------------------------------------------------------
# A crowd of concurrent trials on each store

CROWD_SWEEP = """# @package _global_
defaults:
  - override /hydra/sweeper: optuna
objective: eval/linear_acc
sweep:
  study_name: faults_crowd
hydra:
  sweeper:
    direction: maximize
    sampler:
      name: grid
    params:
      seed: range(0, 16)
"""
POSTGRES = os.environ.get("SODA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5433")
LOCK_ERRORS = ("database is locked", "could not serialize", "deadlock detected", "OperationalError", "Lock wait")


def _mlflow_server(work: Path) -> tuple[subprocess.Popen, str]:
    """scripts/mlflow-server.sh on a fresh PostgreSQL database (make postgres-up first)."""
    import socket
    import urllib.request
    import uuid

    import psycopg

    database = f"mlflow_faults_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "SODA_MLFLOW_PORT": str(port),
        "SODA_MLFLOW_BACKEND": f"{POSTGRES}/{database}",
        "SODA_MLFLOW_ARTIFACTS": str(work / "server-artifacts"),
        "SODA_MLFLOW_WORKERS": "4",
    }
    log = open(work / "server.log", "w")  # noqa: SIM115 - the server's lifetime
    server = subprocess.Popen(
        ["bash", "scripts/mlflow-server.sh"], cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return server, uri
        except OSError:
            if server.poll() is not None:
                break
        time.sleep(1)
    raise RuntimeError(f"the MLflow server did not start: {(work / 'server.log').read_text()[-2000:]}")


def campaign_crowd(work: Path, tally: Tally, jobs: int = 4) -> str:
    import mlflow

    search = work / "conf"
    (search / "sweep").mkdir(parents=True, exist_ok=True)
    (search / "sweep" / "faults_crowd.yaml").write_text(CROWD_SWEEP)
    results = []
    server = None
    try:
        for store in ("embedded", "postgres"):
            if store == "embedded":
                uri, extra = f"sqlite:///{work}/mlflow.db", [f"tracking.artifact_location={work}/artifacts"]
            else:
                server, uri = _mlflow_server(work)
                extra = ["tracking=server"]
            command = launch_command(
                "-m",
                f"hydra.searchpath=[file://{search}]",
                "sweep=faults_crowd",
                *TINY,
                "dataset.train_size=128",
                "schedule.epochs=1",
                f"sweep.n_jobs={jobs}",
                f"sweep.study_name=crowd_{store}",
                f"sweep.storage={work}/optuna-{store}.log",
                f"tracking.uri={uri}",
                "tracking.experiment=faults-crowd",
                *extra,
                f"hydra.sweep.dir={work}/sweep-{store}",
            )
            started = time.perf_counter()
            result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=3600)
            seconds = time.perf_counter() - started
            tally.check(
                result.returncode == 0, f"crowd/{store}: the sweep exited {result.returncode}:\n{result.stderr[-3000:]}"
            )
            client = mlflow.MlflowClient(uri)
            experiment = client.get_experiment_by_name("faults-crowd")
            children = client.search_runs([experiment.experiment_id], "tags.trial != ''", max_results=100)
            written = read = 0
            for child in children:
                written += int(child.data.tags.get("metric_points_logged", "-1"))
                read += sum(
                    len(client.get_metric_history(child.info.run_id, key))
                    for key in child.data.metrics
                    if not key.startswith("system/")
                )
            logs = "".join(p.read_text(errors="replace") for p in (work / f"sweep-{store}").rglob("*.err"))
            logs += result.stderr
            locks = sum(logs.count(pattern) for pattern in LOCK_ERRORS)
            finished = sum(c.info.status == "FINISHED" for c in children)
            tally.check(finished == 16, f"crowd/{store}: {finished} of 16 trials finished")
            tally.check(
                written == read and written > 0, f"crowd/{store}: {written} metric points written, {read} read back"
            )
            tally.check(locks == 0, f"crowd/{store}: {locks} lock errors in the logs")
            results.append(
                f"{store} {finished}/16 finished, {written} points written / {read} read, {locks} lock errors, {seconds:.0f} s"
            )
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=30)
                server = None
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
    return f"crowd: 16 trials, {jobs} in flight: " + "; ".join(results)


# ------------------------------------------------------------------------------------------------
# A requeue storm on SLURM


def campaign_requeue(work: Path, tally: Tally, requeues: int = 3, seed: int = 0) -> str:
    """A 2-task job, preempted the way SLURM preempts (SIGTERM, then USR2, submitit's signal) at
    random moments and requeued each time, must end as the uninterrupted job does."""
    import mlflow

    if shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        tally.check(False, "requeue: no SLURM here (make slurm-up)")
        return "requeue: no SLURM cluster"
    epochs = 4
    rng = random.Random(seed)

    def job(name: str, tag: str) -> subprocess.Popen:
        return subprocess.Popen(
            launch_command(
                "-m",
                *TINY,
                f"schedule.epochs={epochs}",
                *tracking(work, "faults-requeue"),
                f"hydra.sweep.dir={work}/{tag}",
                "hydra/launcher=slurm",
                "hydra.launcher.tasks_per_node=2",
                "hydra.launcher.cpus_per_task=1",
                f"hydra.launcher.name={name}",
            ),
            cwd=REPO,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    reference = job("soda-faults-reference", "reference")
    reference_output, _ = reference.communicate(timeout=1200)
    if not tally.check(
        reference.returncode == 0, f"requeue: the uninterrupted job failed:\n{reference_output[-3000:]}"
    ):
        return "requeue: the uninterrupted job failed"

    driver = job("soda-faults-storm", "storm")
    done = 0
    try:
        while done < requeues and driver.poll() is None:
            job_id = squeue("-n", "soda-faults-storm", "-t", "RUNNING", "-o", "%i").split()
            if not job_id:
                time.sleep(0.5)
                continue
            time.sleep(rng.uniform(3, 25))  # a random moment of this incarnation's life
            if "RUNNING" not in squeue("-j", job_id[0], "-o", "%T"):
                continue
            preempt(job_id[0], check=False)
            done += 1
            release_requeued(job_id[0], alive=lambda: driver.poll() is None)
        output, _ = driver.communicate(timeout=1800)
    finally:
        if driver.poll() is None:
            driver.kill()
    tally.check(done == requeues, f"requeue: only {done} of {requeues} requeues landed before the job ended")
    tally.check(driver.returncode == 0, f"requeue: the job failed:\n{output[-3000:]}")
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("faults-requeue")
    finals = {}
    for tag in ("reference", "storm"):
        runs = client.search_runs([experiment.experiment_id], f"tags.run_dir LIKE '{work}/{tag}/%'")
        if not tally.check(len(runs) == 1, f"requeue/{tag}: {len(runs)} MLflow runs"):
            return "requeue: wrong number of runs"
        run = runs[0]
        tally.check(run.info.status == "FINISHED", f"requeue/{tag}: status {run.info.status}")
        if tag == "storm":
            tally.check(run.data.tags.get("resumed") == "true", "requeue/storm: the run was never resumed")
        for key in ("eval/knn_acc", "eval/linear_acc"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            tally.check(steps == list(range(1, epochs + 1)), f"requeue/{tag}: {key} at steps {steps}")
        losses = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        tally.check(len(losses) == len(set(losses)), f"requeue/{tag}: duplicate train/loss steps")
        finals[tag] = {
            k: v for k, v in run.data.metrics.items() if k in ("eval/knn_acc", "eval/linear_acc", "eval/recon_mse")
        }
    same = finals["reference"] == finals["storm"]
    tally.check(same, f"requeue: final metrics {finals['storm']} differ from the uninterrupted {finals['reference']}")
    return (
        f"requeue: a 2-task SLURM job preempted and requeued {done} times finished once in MLflow, every epoch's "
        f"metrics once, final metrics {'equal to' if same else 'DIFFERENT from'} the uninterrupted job's"
    )


# The part of `garbage` that `make test` runs (one per kind of input, the fast ones).
QUICK_CASES = (
    "unknown key",
    "sweep over an unknown key",
    "truncated JPEG",
    "truncated checkpoint",
    "disk full during a checkpoint write",
    "read-only tracking store",
    "zero tasks per node",
)

# ------------------------------------------------------------------------------------------------
CAMPAIGNS = {
    "kills": campaign_kills,
    "requeue": campaign_requeue,
    "crowd": campaign_crowd,
    "trials": campaign_failing_trials,
    "garbage": campaign_garbage,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CAMPAIGNS), help="run these campaigns only")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs in the kills campaign (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--quick", action="store_true", help=f"garbage: only {len(QUICK_CASES)} cases (for make test)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soda-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# scratch folder {work}", flush=True)
    tally, summaries = Tally(), []
    for name in args.only or list(CAMPAIGNS):
        print(f"## {name}", flush=True)
        folder = work / name
        folder.mkdir(exist_ok=True)
        started = time.perf_counter()
        if name == "kills":
            summary = campaign_kills(folder, tally, args.kills, args.seed)
        elif name == "requeue":
            summary = campaign_requeue(folder, tally, seed=args.seed)
        elif name == "garbage":
            summary = campaign_garbage(folder, tally, quick=args.quick)
        else:
            summary = CAMPAIGNS[name](folder, tally)
        summaries.append(f"{summary} ({time.perf_counter() - started:.0f} s)")
        print(summaries[-1], flush=True)
    print()
    for summary in summaries:
        print(summary)
    print(f"faults passed={tally.passed} failed={tally.failed}")
    sys.exit(1 if tally.failed else 0)


if __name__ == "__main__":
    main()
