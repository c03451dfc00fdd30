"""A saved run evaluated again (`python -m soda.evaluate`): its config and EMA model read back,
the eval settings changed as asked, the metrics printed and recorded on the run's MLflow record."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from soda import tracking
from soda.build import build_evaluator, build_model, load_data, resolve_device, signature
from soda.checkpoint import load_checkpoint
from soda.config import compose_config, to_settings
from soda.errors import ConfigError, RunDirError, SodaError, TrackingError, first_line
from soda.eval import latent_gap
from soda.files import LockContended, OwnerLock, describe
from soda.loop import CHECKPOINT
from soda.rundir import CONFIG_FILE, HEARTBEAT_SECONDS, STALE_AFTER_SECONDS
from soda.store import Store, redact

# The lock of a name being recorded (`--name`): <run dir>/.soda-evaluate-<name>.
EVALUATE_LOCK_PREFIX = ".soda-evaluate-"


def evaluate_saved_run(run_dir: Path, overrides: list[str], name: str = "posthoc", record: bool = True) -> dict:
    """Evaluate the EMA model of `run_dir`'s last checkpoint with its eval settings changed by
    `overrides`; print the metrics and, if `record`, log them on the run as `<name>/<metric>`."""
    cfg = _saved_config(run_dir, overrides)
    settings = to_settings(cfg)
    device = resolve_device(settings.device)
    state = load_checkpoint(run_dir / CHECKPOINT, signature(settings))
    epoch = int(state["epoch"])
    if not record:
        return _evaluate(run_dir, settings, state, device, epoch)
    run_id = _run_id(run_dir)
    # From the check to the write, this name is ours: a second evaluation under it would pass the
    # check too and add a second point at the step.
    lock = _claim_name(run_dir, name)
    try:
        store = Store.checked(settings.tracking.uri)
        _check_unrecorded(store, run_id, name, epoch)
        metrics = _evaluate(run_dir, settings, state, device, epoch)
        _record(store, run_id, name, epoch, metrics, overrides)
    finally:
        lock.release()
    print(f"recorded as {name}/<metric> at step {epoch} on MLflow run {run_id} ({redact(settings.tracking.uri)})")
    return metrics


def _evaluate(run_dir: Path, settings, state: dict, device: torch.device, epoch: int) -> dict:
    """The metrics of the checkpoint's EMA model, printed."""
    # The EMA weights into the model, in the layout training used.
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    prefix = "ema_model."
    weights = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    model.load_state_dict(weights)
    channels_last = settings.schedule.channels_last
    channels_last = channels_last if channels_last is not None else device.type == "cpu"
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    train_set, test_set = load_data(settings)
    evaluator = build_evaluator(settings, train_set, test_set, device, keep_latent_errors=True)
    started = time.perf_counter()
    metrics = evaluator(model, epoch, last=True)
    seconds = time.perf_counter() - started

    _print(run_dir, epoch, metrics, evaluator.latent_errors, seconds)
    return metrics


def _claim_name(run_dir: Path, name: str) -> OwnerLock:
    """This process's lock on recording `name` on the run (a file in the run directory that names
    its owner, soda.files.OwnerLock). Not waited for: a second evaluation under the name stops at
    once with one line naming the first, which is still working (its lock goes with it, even when
    it is killed); a third one after both is refused by the check of what is recorded."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    lock = OwnerLock(
        run_dir / f"{EVALUATE_LOCK_PREFIX}{safe}",
        refresh_seconds=HEARTBEAT_SECONDS,
        stale_after_seconds=STALE_AFTER_SECONDS,
    )
    try:
        owner = lock.try_acquire()
    except OSError as error:
        raise RunDirError(
            f"cannot write the lock {lock.path} ({error.strerror}): recording on a run takes a lock in its "
            "directory; make it writable, or print only with --no-record"
        ) from None
    except LockContended:
        raise RunDirError(f"could not take the lock {lock.path}; try again") from None
    if owner is not None:
        raise RunDirError(
            f"{name}/... metrics are being recorded on this run by another evaluation ({describe(owner)}); "
            f"wait for it to end (a second one at the same epoch is then refused), or pass another --name"
        )
    return lock


def _saved_config(run_dir: Path, overrides: list[str]):
    """The run's resolved config with `eval=<option>` and `eval.*`/`device` overrides applied.
    Anything else would evaluate a model other than the one trained, so it is refused."""
    # The settings the run trained with (soda.rundir); .hydra/ describes the latest launch into
    # the directory, which may have been refused. Older run directories have only .hydra/.
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir / CONFIG_FILE} is missing: {run_dir} is not a run directory written by launch.py")
    cfg = OmegaConf.load(path)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not (key in ("eval", "device") or key.startswith("eval.")):
            raise ConfigError(
                f"{override!r}: only eval=<option>, eval.<key>=<value> and device=<name> can change when "
                f"evaluating a saved run"
            )
        if key == "eval":
            # The option composed as launch.py composes it (its defaults list included).
            cfg.eval = compose_config([f"eval={value}"]).eval
        else:
            OmegaConf.update(cfg, key, OmegaConf.create({"v": _parse(value)}).v, force_add=True)
    return cfg


def _parse(value: str):
    """A command-line value as YAML reads it (10 -> int, [1,2] -> list, null -> None)."""
    import yaml

    return yaml.safe_load(value)


def _run_id(run_dir: Path) -> str:
    path = run_dir / tracking.RUN_ID_FILE
    if not path.is_file():
        raise TrackingError(f"{path} is missing: the run has no MLflow record to add to; use --no-record")
    return path.read_text().strip()


def _check_unrecorded(store: Store, run_id: str, name: str, epoch: int) -> None:
    """A second evaluation under the same name at the same epoch would add a second point at that
    step; refuse before any work."""
    try:
        recorded = store.get_run(run_id).data.metrics
    except SodaError:
        raise
    except Exception as error:
        raise TrackingError(
            f"MLflow run {run_id} cannot be read from {redact(store.uri)} ({first_line(error)})"
        ) from None
    taken = [key for key in recorded if key.startswith(f"{name}/")]
    if taken and epoch in store.steps_of(run_id, taken[0]):
        raise ConfigError(f"MLflow run {run_id} already has {name}/... metrics at epoch {epoch}; pass another --name")


def _record(store: Store, run_id: str, name: str, epoch: int, metrics: dict, overrides: list[str]) -> None:
    store.check()  # again: the evaluation may have taken long
    points = {f"{name}/{key.split('/', 1)[1]}": value for key, value in metrics.items()}
    store.log_batch(run_id, points, step=epoch, tags={f"{name}.overrides": " ".join(overrides) or "(none)"})


def _print(run_dir: Path, epoch: int, metrics: dict, errors: dict, seconds: float) -> None:
    print(f"run {run_dir}  epoch {epoch}  ({seconds:.1f} s)")
    for key, value in sorted(metrics.items()):
        print(f"  {key:<28} {value:.4f}")
    if errors:
        print(f"  {'t':>6} {'own latent':>12} {'shuffled':>12} {'dropped':>12} {'latent gap':>12}")
        for step, error in errors.items():
            gap = latent_gap({step: error})
            values = " ".join(f"{error[k]:>12.4f}" for k in ("own", "shuffled", "dropped"))
            print(f"  {step:>6} {values} {gap:>12.2%}")
