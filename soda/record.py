"""The record's contract: the metric keys and tags a run writes, and the names and tags of runs.

Runs write these keys and tags; analysis/, the sweeper, the benchmarks and the tests read them
(by importing them from here). Each is spelled here and nowhere else.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

# Metrics of an evaluation (step = epoch; epoch 0 is the untrained encoder).
KNN_ACC = "eval/knn_acc"
LINEAR_ACC = "eval/linear_acc"
RECON_MSE = "eval/recon_mse"
LATENT_GAP = "eval/latent_gap"
EVAL_SECONDS = "eval/seconds"
# Factor probes, where the data set knows its factors of variation (`shapes`): eval/factor/<name>,
# accuracy for a discrete factor, R^2 for a continuous one (soda.eval.factor_probes).
FACTOR_PREFIX = "eval/factor/"
# What a sweep may optimise (`objective`).
OBJECTIVES = (KNN_ACC, LINEAR_ACC, RECON_MSE, LATENT_GAP)
# Metrics of training: per log point (step = optimiser step) ...
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
FIRST_STEP_SECONDS = "train/first_step_seconds"
# Diagnostics, at log points only (soda.loop.Trainer): does the encoder get gradient, does the
# latent vary between images, does the decoder's modulation depend on it?
ENCODER_GRAD_NORM = "train/encoder_grad_norm"  # before clipping
DECODER_GRAD_NORM = "train/decoder_grad_norm"
LATENT_NORM = "train/latent_norm"  # mean L2 norm of the batch's latents
LATENT_STD = "train/latent_std"  # per-dimension standard deviation over the batch, averaged
LATENT_RANK = "train/latent_effective_rank"  # exp(entropy of the centred batch's singular values)
MODULATION_STD = "train/modulation_std"  # how much the latent's scale and shift differ between images
DIAGNOSTICS = (ENCODER_GRAD_NORM, DECODER_GRAD_NORM, LATENT_NORM, LATENT_STD, LATENT_RANK, MODULATION_STD)
# ... per epoch (step = epoch) ...
EPOCH_SECONDS = "train/epoch_seconds"
IMAGES_PER_SECOND = "train/images_per_second"
# ... and with each evaluation (step = epoch): progress comparable across batch sizes and GPUs.
IMAGES_SEEN = "train/images_seen"
TRAIN_SECONDS = "train/seconds"


def latent_gap_at(timestep: int) -> str:
    """The latent gap measured at one timestep."""
    return f"{LATENT_GAP}_t{timestep}"


def factor_metric(factor: str) -> str:
    """The factor probe's score of one factor of variation."""
    return f"{FACTOR_PREFIX}{factor}"


def shown_order(metrics: dict[str, float]) -> list[tuple[str, float]]:
    """Metrics as lines show them: sorted by key, the factor probes after the others, so that a
    line starts with the probes and the latent gap whether or not the data set has factors."""
    return sorted(metrics.items(), key=lambda item: (item[0].startswith(FACTOR_PREFIX), item[0]))


# Tags. A sweep's trials carry TRIAL and STUDY and point at the sweep's run with PARENT_RUN;
# the sweep's own run carries SWEEP=SWEEP_PARENT.
RUN_DIR = "run_dir"
ERROR = "error"  # why the run stopped; never on a FINISHED run
ENDED = "ended"  # how the run's last process ended: one of ENDINGS
PREVIOUS_END = "previous_end"  # on a resumed run: how the process before this one ended
# On a run that continued a run directory whose MLflow run was gone (tracking.resume_without_record):
# the lost run's id, and the epoch this record starts at (the earlier epochs are not in it).
LOST_RECORD = "lost_record"
RECORD_STARTS_AT = "record_starts_at_epoch"
RESUME_CHANGES = "resume_changes"  # on a resumed run: the resumable settings changed (soda.rundir)
COMPILE = "compile"
RESUMED = "resumed"  # "true" once a later process continued the run
POINTS_LOGGED = "metric_points_logged"  # metric points the last process sent (checked against the store)
HOST, PID = "host", "pid"  # the process writing the run while it is live
TRIAL = "trial"
STUDY = "optuna_study"
TRIAL_STATE = "trial_state"
SWEEP = "sweep"
SWEEP_PARENT = "parent"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the trials under the sweep


# Each way a process ends, and the MLflow status its run ends with (soda.train.run).
ENDINGS = {
    "finished": "FINISHED",
    "failed": "FAILED",  # an exception, divergence included; ERROR says which
    "interrupted": "KILLED",  # SIGINT (Ctrl-C)
    "terminated": "KILLED",  # SIGTERM
    "preempted": "KILLED",  # SIGUSR1/SIGUSR2 after a checkpoint; SLURM requeues the job
    "pruned": "KILLED",  # a sweep's pruner stopped the trial (TRIAL_STATE=PRUNED)
    "tracking_lost": "FAILED",  # the store stopped answering (END_FILE; recorded on the next start)
}
# A process that ended without recording it (SIGKILL, out of memory, a lost node) leaves its run
# RUNNING; the next start in its run directory records it as PREVIOUS_END, the sweeper closes it.
LOST = "lost: the process ended without recording how (SIGKILL, out of memory or a lost node)"


def trial_tags(study: str, number: int, parent_run_id: str | None = None) -> dict[str, str]:
    """The tags that make a run trial `number` of `study` (and a child of the sweep's run)."""
    tags = {TRIAL: str(number), STUDY: str(study)}
    if parent_run_id:
        tags[PARENT_RUN] = parent_run_id
    return tags


def short_value(value: Any) -> str:
    """A value as a run name shows it: floats to 3 significant digits (0.000316), else as is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_run_name(study: str, number: int, params: dict[str, Any]) -> str:
    """A trial's MLflow run name: its study, number and values, each under the last part of its
    key (`augment_ablation #3: target=flip source=none seed=1`)."""
    values = " ".join(f"{re.split(r'[./@]', name)[-1]}={short_value(value)}" for name, value in params.items())
    return f"{study} #{number}" + (f": {values}" if values else "")


def run_name(settings: Any) -> str:
    """A run's MLflow name when tracking.run_name is null: what ran (`tiny shapes seed=0`), after
    its study and trial number in a sweep's trial whose sweeper named none."""
    what = f"{settings.model.name} {settings.dataset.name} seed={settings.seed}"
    sweep = settings.sweep
    return what if sweep.trial is None else f"{sweep.study_name} #{sweep.trial}: {what}"


def parent_tags(study: str) -> dict[str, str]:
    """The tags of a sweep's own run."""
    return {SWEEP: SWEEP_PARENT, STUDY: str(study)}


def git_state(repo: Path | None = None) -> dict[str, str]:
    """The commit that produced a run, and whether the work tree had uncommitted changes: by
    default those of the source tree this package was imported from (the code that ran)."""
    repo = repo if repo is not None else Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {"git_sha": sha, "git_dirty": str(bool(status.strip())).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b.c": "value"} (lists kept whole, as their string)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)}
