"""One training run: config in; a trained encoder, probe accuracies and an MLflow record out.

`run(cfg)` is the config's edge: it validates the composed Hydra config, builds the model, the
data and the evaluation from it (soda.build), and the tracker and the sweep's reporter, and hands
plain values to the loop (`soda.loop.Trainer`). How each evaluation is recorded (and whether a sweep's pruner stops
the trial) is the `on_evaluation` callback built here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig, OmegaConf

from soda import dist, progress, tracking
from soda.build import build_evaluator, build_model, build_trainer, load_data, resolve_device, signature
from soda.checkpoint import load_checkpoint, restore_trainer
from soda.config import Config, gpu_sized, run_directory, to_settings
from soda.errors import ConfigError, RendezvousError, RunDirError, Terminated, TrackingLost
from soda.heartbeat import Heartbeat, PeerStalled
from soda.loop import CHECKPOINT, Preempted, StopRequested
from soda.models import SODA
from soda.record import COMPILE, HOST, PID, TRIAL_STATE, flatten, git_state, run_name, shown_order, trial_tags
from soda.rundir import RunDirectory, resolved_settings
from soda.sweep import TrialReporter
from soda.tracking import NullTracker, Tracker
from soda.trainer_parts import OnEvaluation

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> float | list[float] | None:
    """Train, evaluate and record one run; returns the metric named by `objective` (a list of
    them for a list) on global rank 0 and None on the other ranks. In a sweep's trial
    (`sweep.trial` set), each evaluation is reported to the Optuna trial, which may prune it.

    The run directory is this process's while it runs (soda.rundir): another launch into it
    stops, and a re-run resumes it only with the settings it started with."""
    settings = to_settings(cfg)
    directory = RunDirectory(run_dir if run_dir is not None else run_directory())
    device = resolve_device(settings.device)
    world = _join(settings, use_cuda=device.type == "cuda")
    if world.enabled and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if settings.schedule.batch_size % world.world_size:
        raise ConfigError(
            f"schedule.batch_size={settings.schedule.batch_size} is not divisible by the world size "
            f"{world.world_size} (nodes x tasks per node); choose a multiple of {world.world_size}"
        )
    tracker = _tracker(settings) if world.is_main else NullTracker()
    tracker.check()
    resolved = resolved_settings(cfg)
    changes = _claim(directory, resolved, world, device)
    heartbeat = _watch_peers(settings, directory.path, world, tracker)
    try:
        with _sigterm_raises():
            return _run(settings, directory, tracker, resolved, changes, device, world)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if world.is_main:
            directory.release()


def _join(settings: Config, use_cuda: bool) -> dist.Distributed:
    """This process's rank in the job. A rank that cannot join leaves the process at once, as one
    that fails later does, so that srun (or the local launcher) ends the others now."""
    try:
        return dist.setup(use_cuda=use_cuda, rendezvous_timeout_s=settings.rendezvous_timeout_s)
    except RendezvousError:
        log.exception("rank %s could not join the job", os.environ.get("RANK", "?"))
        logging.shutdown()
        os._exit(1)


def _watch_peers(
    settings: Config, run_dir: Path, world: dist.Distributed, tracker: Tracker | NullTracker
) -> Heartbeat | None:
    """In a multi-rank job, a rank that stops beating (soda.heartbeat) ends the job, from this
    rank's heartbeat thread: its main thread waits in a collective that would not return."""
    if not world.enabled or settings.peer_timeout_s is None:
        return None

    def end_the_job(stalled: PeerStalled) -> None:
        try:
            raise stalled  # a traceback in this rank's log: the launcher's line names the frozen rank
        except PeerStalled:
            log.exception("rank %d ends the job", world.rank)
        ended = f"failed: PeerStalled: {stalled}"
        with contextlib.suppress(Exception):
            tracking.write_end_file(run_dir, tracker.run_id, ended)
        with contextlib.suppress(Exception):
            tracker.fail_from_another_thread(f"PeerStalled: {stalled}")
        heartbeat.kill_if_here(stalled.rank)
        logging.shutdown()
        os._exit(1)

    heartbeat = Heartbeat(run_dir, world.rank, world.world_size, settings.peer_timeout_s, end_the_job)
    return heartbeat.start()


def _claim(directory: RunDirectory, resolved: dict, world: dist.Distributed, device: torch.device) -> dict:
    """Rank 0 takes the run directory and checks the settings against the run it holds; every
    rank stops if it cannot. Returns the resumable settings that changed."""
    problem, changes = None, {}
    if world.is_main:
        try:
            directory.claim()
            try:
                changes = directory.check_settings(resolved)
            except RunDirError:
                directory.release()
                raise
        except RunDirError as error:
            problem = error
    if dist.any_rank(problem is not None, device):
        raise problem or RunDirError(f"rank 0 could not use the run directory {directory.path}")
    return changes


def _run(
    settings: Config,
    directory: RunDirectory,
    tracker: Tracker | NullTracker,
    resolved: dict,
    changes: dict,
    device: torch.device,
    world: dist.Distributed,
) -> float | list[float] | None:
    # Everything that can be wrong is checked before any data is read or time is spent.
    run_dir = directory.path
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    model = build_model(settings)
    checkpoint_path = run_dir / CHECKPOINT
    resume = load_checkpoint(checkpoint_path, signature(settings)) if checkpoint_path.exists() else None
    train_set, test_set = load_data(settings)
    if settings.schedule.batch_size > len(train_set):
        raise ConfigError(
            f"schedule.batch_size={settings.schedule.batch_size} is larger than the training set "
            f"({len(train_set)} images); lower it"
        )

    # The pieces, on plain values.
    reporter = None
    if world.is_main and settings.sweep.trial is not None and isinstance(settings.objective, str):
        reporter = TrialReporter(settings.sweep.storage, settings.sweep.study_name, settings.sweep.trial)
    evaluate = build_evaluator(settings, train_set, test_set, device, run_dir / "samples", tracker.log_artifact)
    on_evaluation = _on_evaluation(tracker, reporter, settings.objective)
    trainer = build_trainer(settings, model, train_set, run_dir, device, evaluate, on_evaluation, tracker, world)
    if resume is not None:
        restore_trainer(trainer, resume)
        log.info("resuming from %s at epoch %d, step %d", checkpoint_path, trainer.epoch, trainer.step_in_epoch)
    if world.is_main and settings.device == "auto" and device.type == "cpu":
        trainer.on_pace = cpu_pace_warning(gpu_sized(settings))

    # From here on the run is recorded: its settings bind the run directory.
    if world.is_main:
        directory.save_settings(resolved)
    tracker.start(run_dir, *_record(resolved, settings, model, world), epoch=trainer.epoch)
    tracker.record_resume_changes(changes)

    # Train, and leave the record saying how it ended (soda.record.ENDINGS).
    # SLURM's warning signal: submitit asks for USR2, a plain `sbatch --signal` often USR1.
    previous_handlers = {sig: signal.signal(sig, trainer.request_preemption) for sig in PREEMPTION_SIGNALS}
    resume_hint = f"re-run with hydra.run.dir={run_dir} to resume from its last checkpoint"
    try:
        metrics = trainer.fit()
    except Preempted as preempted:
        tracker.finish("preempted", error=str(preempted))
        log.warning("%s", preempted)
        _hand_over_preemption(previous_handlers[trainer.preempt_signal], trainer.preempt_signal, world)
        raise SystemExit(f"{preempted} ({resume_hint}, or let SLURM requeue the job)") from None
    except KeyboardInterrupt:
        with _ignoring(signal.SIGINT):  # a second Ctrl-C must not cut the record short
            tracker.finish("interrupted", error="interrupted (SIGINT)")
        raise KeyboardInterrupt(f"interrupted (SIGINT); MLflow run {tracker.run_id} is KILLED; {resume_hint}") from None
    except Terminated:
        tracker.finish("terminated", error="terminated (SIGTERM)")
        raise Terminated(f"terminated (SIGTERM); MLflow run {tracker.run_id} is KILLED; {resume_hint}") from None
    except StopRequested as stopped:
        # Stopped on purpose by the sweep's pruner: not a failure, and not a finished run.
        tracker.finish("pruned", tags={TRIAL_STATE: "PRUNED", "pruned": str(stopped)})
        raise optuna.TrialPruned(str(stopped)) from None
    except TrackingLost as lost:
        # The store is gone: the record cannot say how this ended, so the run directory does.
        tracker.abandon(run_dir, f"at epoch {trainer.epoch} + {trainer.step_in_epoch} steps")
        if world.enabled:
            log.error("error: %s", lost)
            logging.shutdown()
            os._exit(1)
        raise
    except BaseException as error:
        tracker.finish("failed", error=f"{type(error).__name__}: {error}")
        if world.enabled:
            # One rank failing must end the job now, not leave the others waiting in a
            # collective until a timeout: report and leave the process at once.
            log.exception("rank %d failed", world.rank)
            logging.shutdown()
            os._exit(1)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if not world.is_main:
        return None
    # How the loss ran: a compile that fell back to eager trains at eager speed, so say so.
    tags = {
        COMPILE: trainer.compile_state,
        **({TRIAL_STATE: "COMPLETE"} if settings.sweep.trial is not None else {}),
    }
    try:
        tracker.finish("finished", tags=tags)
    except TrackingLost:
        tracker.abandon(run_dir, f"after its last epoch ({trainer.epoch}), while recording the end")
        raise
    objective = [settings.objective] if isinstance(settings.objective, str) else list(settings.objective)
    result = {
        "epoch": trainer.epoch,
        "metrics": metrics,
        "objective": {name: metrics[name] for name in objective},
        "mlflow_run_id": tracker.run_id,
    }
    # For the launcher's line on this job (hydra_plugins/soda_launchers), which reads it from here.
    # Only that line needs it: a run that cannot write it is still finished and recorded.
    try:
        progress.write_result(run_dir, result)
    except OSError as error:
        log.warning(
            "could not write %s (%s): the launcher will show this run without its metrics",
            error.filename,
            error.strerror,
        )
    summary = " ".join(f"{k}={v:.4f}" for k, v in shown_order(metrics))
    print(f"final {summary} (epoch {trainer.epoch}, mlflow run {tracker.run_id}, {run_dir})", flush=True)
    if isinstance(settings.objective, str):
        return metrics[settings.objective]
    return [metrics[name] for name in objective]


@contextlib.contextmanager
def _ignoring(signum: int):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM (`kill`, `timeout`, a container stopping) raises Terminated, so that the run's
    record says how it ended instead of staying RUNNING. Only where nobody else handles SIGTERM:
    submitit's jobs keep submitit's handler (SLURM's requeue sends SIGTERM)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def terminate(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tracker(settings: Config) -> Tracker:
    options = {k: v for k, v in asdict(settings.tracking).items() if k != "name"}
    if options["run_name"] is None:
        options["run_name"] = run_name(settings)
    return Tracker(**options)


def _on_evaluation(tracker, reporter: TrialReporter | None, objective) -> OnEvaluation:
    """Record each evaluation; in a sweep's trial, report the objective to Optuna and stop when
    its pruner says so."""

    def on_evaluation(epoch: int, metrics: dict[str, float]) -> bool:
        tracker.log_metrics(metrics, step=epoch)
        # The untrained encoder (epoch 0) is the same in every trial: reporting it would hand
        # each trial the same best value and hide its later ones from a median pruner.
        if reporter is None or epoch == 0 or objective not in metrics:
            return False
        return reporter.report(metrics[objective], epoch)

    return on_evaluation


def _record(resolved: dict, settings: Config, model: SODA, world: dist.Distributed) -> tuple[dict, str, dict]:
    """What the MLflow run says about itself: the resolved config as params and as config.yaml,
    and tags naming the code, the seed, the process and the sweep's trial."""
    sweep = settings.sweep
    tags = {
        **git_state(),
        "seed": str(settings.seed),
        "world_size": str(world.world_size),
        "nodes": ",".join(world.nodes),  # the host names of the ranks, rank 0's first
        # Which process to look at (or stop) while the run is live.
        HOST: socket.gethostname(),
        PID: str(os.getpid()),
        **(trial_tags(sweep.study_name, sweep.trial, sweep.parent_run_id) if sweep.trial is not None else {}),
    }
    params = flatten(resolved)
    params["model.encoder_parameters"] = str(sum(p.numel() for p in model.encoder.parameters()))
    params["model.decoder_parameters"] = str(sum(p.numel() for p in model.decoder.parameters()))
    return params, OmegaConf.to_yaml(OmegaConf.create(resolved)), tags


def _hand_over_preemption(previous_handler, signum: int, world: dist.Distributed) -> None:
    """After our checkpoint, let submitit do its part: on rank 0 it requeues the job and exits.
    The other ranks must not exit first (srun --kill-on-bad-exit would end rank 0 before it
    requeues), so under SLURM they wait for the requeue to stop them."""
    if not callable(previous_handler):
        return
    previous_handler(signum, None)
    if not world.is_main and "SLURM_JOB_ID" in os.environ:
        time.sleep(600)


CPU_WARNING_S = 3600  # device=auto on CPUs: a run with more training left than this is warned about


def cpu_pace_warning(size: str | None) -> Callable[[float], None]:
    """Trainer.on_pace for a run that device=auto put on CPUs: one warning line with the time its
    training will take at its first steps' pace, when it is GPU-sized (`size`, config.gpu_sized)
    or longer than CPU_WARNING_S."""

    def warn(seconds_left: float) -> None:
        if size is None and seconds_left < CPU_WARNING_S:
            return
        log.warning(
            "device=auto found no GPU (torch.cuda.is_available() is false), so this run%s trains on CPUs: "
            "about %s more at the pace of its first steps; run it where a GPU is visible, or set device=cpu "
            "to train here without this warning",
            f" ({size})" if size else "",
            progress.duration(seconds_left),
        )

    return warn
