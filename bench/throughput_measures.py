"""The measurements of bench/throughput.py, each of the fast path and the baseline
(throughput_baseline) from the same weights: the data path, the model step, the two together end
to end, and the probes. Each returns its part of the JSON record."""

from __future__ import annotations

import math
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from throughput_baseline import StraightforwardStep, pil_loader

from soda.build import build_evaluator, build_model, build_trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> dict:
    memory = {"process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["device_max_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def _fresh(settings, train_set, test_set, device, tmp: Path):
    """The fast trainer and the baseline step, from the same initial weights."""
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    baseline_model = build_model(settings)
    baseline_model.load_state_dict(model.state_dict())
    trainer = build_trainer(settings, model, train_set, tmp, device)
    trainer.test_set = test_set  # what measure_eval probes on
    return trainer, StraightforwardStep(baseline_model, settings, device, trainer.warmup_steps)


# ------------------------------------------------------------------------------------------------
def measure_data(settings, train_set, device, batch, batches, workers) -> dict:
    print("(a) data path ...", flush=True)
    trainer = build_trainer(settings, build_model(settings), train_set, Path("."), device)
    model = trainer.model

    def fast_batches(count):
        order = torch.randperm(len(train_set), device=device)
        for index in range(count):
            start = (index * batch) % (len(train_set) - batch + 1)
            source_view, target_view = trainer.make_views(trainer.train_images[order[start : start + batch]])
            yield model._encoder_input(source_view), target_view

    def timed(make_batches, warmup, count):
        iterator = make_batches()
        for _ in range(warmup):  # worker start-up, first-call allocations
            next(iterator)
        _sync(device)
        started = time.perf_counter()
        for _ in range(count):
            source_view, target_view = next(iterator)
            source_view = source_view.to(device, non_blocking=True)
            target_view = target_view.to(device, non_blocking=True)
        _sync(device)
        return count * batch / (time.perf_counter() - started)

    fast = timed(lambda: fast_batches(batches + 2), 2, batches)
    loader = pil_loader(train_set, settings, batch, workers, device)

    def loader_batches():
        while True:
            yield from loader

    baseline = timed(loader_batches, 2, batches)
    print(f"    fast {fast:,.0f} images/s, baseline {baseline:,.0f} images/s", flush=True)
    return {"fast": {"images_per_s": fast}, "baseline": {"images_per_s": baseline}, "batches": batches}


def measure_end_to_end(settings, train_set, test_set, device, batch, steps, warmup, workers):
    print("(c) end to end ...", flush=True)
    trainer, baseline_step = _fresh(settings, train_set, test_set, device, Path(tempfile.gettempdir()))
    log_every = settings.schedule.log_every

    # Fast: Trainer.train_epoch's loop (device permutation, uint8 batch, train_step), timed after
    # `warmup` steps (compilation, cuDNN autotuning).
    order = torch.randperm(len(train_set), device=device)
    fast_losses, started, compile_seconds = [], None, time.perf_counter()
    for index in range(steps + warmup):
        if index == warmup:
            _sync(device)
            compile_seconds = time.perf_counter() - compile_seconds
            started = time.perf_counter()
        start = (index * batch) % (len(train_set) - batch + 1)
        loss = trainer.train_step(trainer.train_images[order[start : start + batch]])
        fast_losses.append(loss.detach())
        if index % log_every == 0:
            loss.item()  # the loop's one host sync per log_every steps
    _sync(device)
    fast = steps * batch / (time.perf_counter() - started)
    fast_memory = peak_memory_mib(device)

    loader = pil_loader(train_set, settings, batch, workers, device)
    baseline_losses, done = [], 0
    while done < steps + warmup:
        for source_view, target_view in loader:
            if done == warmup:
                _sync(device)
                started = time.perf_counter()
            source_view = source_view.to(device, non_blocking=True)
            target_view = target_view.to(device, non_blocking=True)
            baseline_losses.append(baseline_step(source_view, target_view).detach())
            done += 1
            if done == steps + warmup:
                break
    _sync(device)
    baseline = steps * batch / (time.perf_counter() - started)
    del loader
    fast_curve = [float(x) for x in torch.stack(fast_losses).float().cpu()]
    baseline_curve = [float(x) for x in torch.stack(baseline_losses).float().cpu()]
    trajectory = _compare(fast_curve, baseline_curve)
    print(f"    fast {fast:,.0f} images/s, baseline {baseline:,.0f} images/s; {trajectory['verdict']}", flush=True)
    result = {
        "fast": {
            "images_per_s": fast,
            "seconds_before_timing": compile_seconds,
            "memory_mib": fast_memory,
            "compile": trainer.compile_state,
        },
        "baseline": {"images_per_s": baseline},
        "steps": steps,
        "warmup_steps": warmup,
        "loss": {"fast": fast_curve, "baseline": baseline_curve, **trajectory},
    }
    return result, trainer


def _compare(fast: list[float], baseline: list[float]) -> dict:
    """Same trajectory within noise: per step, the two losses differ by no more than the noise of
    single-batch losses allows (each step's loss is one batch's estimate, with its own timesteps
    and noise draws). The noise is estimated from step-to-step changes of both curves."""
    differences = [a - b for a, b in zip(fast, baseline, strict=False)]
    steps = len(differences)
    mean_difference = statistics.fmean(differences)
    jitter = [abs(c[i + 1] - c[i]) for c in (fast, baseline) for i in range(len(c) - 1)]
    noise = statistics.median(jitter) / math.sqrt(2) * 1.4826 if jitter else 0.0  # robust per-loss sd
    standard_error = noise * math.sqrt(2 / steps) if steps else math.inf
    within = abs(mean_difference) <= 3 * standard_error
    verdict = (
        f"mean loss difference {mean_difference:+.4f} over {steps} steps, "
        f"{'within' if within else 'OUTSIDE'} 3 standard errors ({3 * standard_error:.4f})"
    )
    return {
        "mean_difference": mean_difference,
        "three_standard_errors": 3 * standard_error,
        "within_noise": within,
        "verdict": verdict,
    }


def measure_step(settings, trainer, device, batch, steps, warmup) -> dict:
    print("(b) model step alone ...", flush=True)
    images = trainer.train_images[:batch]
    source_view, target_view = trainer.make_views(images)
    torch.manual_seed(settings.seed)
    _, baseline_step = _fresh(settings, trainer.train_set, trainer.test_set, device, Path(tempfile.gettempdir()))

    def timed(step) -> float:
        for _ in range(warmup):
            step(source_view, target_view)
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            step(source_view, target_view)
        _sync(device)
        return steps * batch / (time.perf_counter() - started)

    fast = timed(trainer.optimize)
    baseline = timed(baseline_step)
    print(f"    fast {fast:,.0f} images/s, baseline {baseline:,.0f} images/s", flush=True)
    syncs = {
        "fast": host_syncs_per_step(lambda: trainer.train_step(images), device),
        "baseline": host_syncs_per_step(lambda: baseline_step(source_view, target_view), device),
    }
    if syncs["fast"] is not None:
        print(
            f"    host syncs per step: fast {syncs['fast']:.1f} (with augmentation), baseline {syncs['baseline']:.1f}"
        )
    return {
        "fast": {"images_per_s": fast, "host_syncs_per_step": syncs["fast"]},
        "baseline": {"images_per_s": baseline, "host_syncs_per_step": syncs["baseline"]},
        "steps": steps,
    }


def host_syncs_per_step(step, device, steps: int = 3) -> float | None:
    """Synchronising CUDA calls per step, as counted by torch.cuda's sync debug mode (None off CUDA)."""
    if device.type != "cuda":
        return None
    step()
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def measure_eval(settings, trainer, device) -> dict:
    """The probes of the EMA encoder with the eval config's settings: features of the training
    and test sets, k-NN (matmul + top-k on the device), linear probe on cached features."""
    print("(d) probes ...", flush=True)
    _sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        evaluator = build_evaluator(settings, trainer.train_set, trainer.test_set, device)
        metrics = evaluator.probes(trainer.ema.ema_model.eval())
    _sync(device)
    seconds = time.perf_counter() - started
    print(f"    {seconds:.1f} s for k-NN + linear probe on {len(trainer.train_set)} + {len(trainer.test_set)} images")
    return {
        "seconds": seconds,
        "train_images": len(trainer.train_set),
        "test_images": len(trainer.test_set),
        **{k.split("/")[-1]: v for k, v in metrics.items()},
    }
