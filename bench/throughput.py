"""Training throughput: the fast path against a straightforward one, side by side in one run.

    python bench/throughput.py                      # CPU: small sizes (make bench)
    python bench/throughput.py --preset reference   # GPU: the reference CIFAR-10 model, batch 512
    python bench/throughput.py --dataset-root data/cifar10   # real images (and real probe accuracies)

Three measurements, each for both paths, in images per second:
  (a) data path alone: both augmented views of a batch, normalised, on the training device.
      fast: the decoded uint8 set on the device, batched augmentation there (soda.data).
      baseline: per-image PIL transforms (torchvision's RandomResizedCrop, flip, RandAugment,
      ToTensor, Normalize, as the seed ships them) in DataLoader workers, then copied over.
  (b) model step alone on fixed views: loss, backward, clip, AdamW, EMA.
      fast: soda.loop.Trainer.optimize (precision and compile from the schedule, fused AdamW on
      CUDA, sync-free foreach EMA). baseline: fp16 autocast and GradScaler on CUDA (fp32 on a
      CPU), eager, AdamW's defaults, ema-pytorch's update() as shipped.
  (c) end to end: (a) and (b) together, as training runs them; both start from the same weights,
      and their losses are compared (same trajectory within noise).
Then the probes (k-NN + linear, the eval config's settings) timed on the fast path. Achieved
TFLOP/s use the model's counted FLOPs per image (soda.models.summary); the fraction of peak needs
the device's dense bf16 peak (PEAK_TFLOPS: measured for the H200, else datasheets; or --peak-tflops). A JSON record goes
to --json. The last line is `speedup data=<x> step=<y> end_to_end=<z>` (fast / baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

import soda.config
from soda.build import build_evaluator, build_model, build_trainer
from soda.data import LabelledImages, load_split
from soda.data.shapes import make_shapes
from soda.models.summary import training_step_flops_per_image
from soda.record import git_state

# The baseline, a sibling script's module, found through the path line.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_baseline import StraightforwardStep, pil_loader

REPO = Path(__file__).resolve().parents[1]  # the records go to bench/results/

PRESETS = {
    # Small enough for two CPU cores in a few minutes; CIFAR-10's image size and augmentation.
    "cpu": {
        "overrides": ["model=tiny", "dataset=cifar10", "augmentation=seed", "schedule=short", "eval=reference"],
        "images": 4096,
        "batch": 256,
        "data_batch": 512,  # the data path alone at the reference's global batch
        "data_batches": 12,
        "steps": 10,
        "end_to_end_steps": 10,
        "warmup": 2,
        "eval_test": 1024,
    },
    # Seconds: for the test that keeps this script working (the figures mean nothing).
    "smoke": {
        "overrides": ["model=tiny", "dataset=cifar10", "augmentation=seed", "schedule=short", "eval=reference"],
        "images": 256,
        "batch": 32,
        "data_batches": 2,
        "steps": 2,
        "end_to_end_steps": 3,
        "warmup": 1,
        "eval_test": 64,
    },
    # The reference CIFAR-10 model and augmentation, the reference's global batch of 512 on one GPU.
    "reference": {
        "overrides": ["model=soda_r18_ddpm", "dataset=cifar10", "augmentation=seed", "schedule=reference_800ep"],
        "images": 50_000,
        "batch": 512,
        "data_batches": 40,
        "steps": 40,
        "end_to_end_steps": 60,
        "warmup": 15,
        "eval_test": 10_000,
    },
}
# Dense bf16 peaks, TFLOP/s. The H200's and the H100's are what an 8192^3 bf16 matrix product
# reaches on the cards this project is lent (H200: 769-798, H100: 798 measured; the device tool's
# KINDS.md), the ceiling a training step can be held to; the others are datasheet figures (SXM
# parts), which such products do not reach.
PEAK_TFLOPS = {
    "H200": (790.0, "measured: bf16 matmul on this project's H200s"),
    "H100": (798.0, "measured: bf16 matmul on this project's H100"),
    "A100": (312.0, "datasheet"),
    "L40S": (362.0, "datasheet"),
    "A10": (125.0, "datasheet"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: reference with a GPU, cpu without")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--batch", type=int, help="global batch (default: the preset's)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline (default 2)")
    parser.add_argument("--dataset-root", help="a CIFAR-10 folder to read instead of synthetic images")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: PEAK_TFLOPS)")
    parser.add_argument("--skip-eval", action="store_true", help="do not time the probes")
    parser.add_argument(
        "--eval-full", action="store_true", help="time the probes on the whole of --dataset-root's train and test sets"
    )
    parser.add_argument("--steps", type=int, help="timed steps of (b) and (c) (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default: the preset's)")
    parser.add_argument("--json", help="record path (default: bench/results/throughput-<cpu|cuda>.json)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. schedule.compile=none")
    args = parser.parse_args()

    # The device, the preset and the settings it measures.
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    preset = dict(PRESETS[args.preset or ("reference" if device.type == "cuda" else "cpu")])
    if args.steps:
        preset.update(steps=args.steps, end_to_end_steps=args.steps, data_batches=args.steps)
    if args.warmup is not None:
        preset["warmup"] = args.warmup
    batch = args.batch or preset["batch"]
    settings = _settings([*preset["overrides"], f"schedule.batch_size={batch}", *args.overrides])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    train_set, test_set = _data(args.dataset_root, preset, settings)

    # What was measured, and the device's peak that the rates are a fraction of.
    record = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **git_state(),  # git_sha, git_dirty: the code that was measured
        "preset": args.preset or ("reference" if device.type == "cuda" else "cpu"),
        "batch": batch,
        "baseline_workers": args.workers,
        "images": "dataset" if args.dataset_root else "synthetic shapes",
        "model": settings.model.name,
        "precision": settings.schedule.precision,
        "compile": settings.schedule.compile,
    }
    print(f"# {record['device']}, torch {torch.__version__}, {record['model']} model, batch {batch}", flush=True)
    flops = training_step_flops_per_image(build_model(settings))
    record["gflop_per_image"] = flops / 1e9
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else _peak(device)
    record["peak_tflops"], record["peak_source"] = peak, peak_source

    # Measure: (a) data, (c) end to end, (b) the step alone, then the probes.
    data_batch = preset.get("data_batch", batch) if not args.batch else batch
    data = measure_data(settings, train_set, device, data_batch, preset["data_batches"], args.workers)
    data["batch"] = data_batch
    end_to_end, fast_trainer = measure_end_to_end(
        settings, train_set, test_set, device, batch, preset["end_to_end_steps"], preset["warmup"], args.workers
    )
    step = measure_step(settings, fast_trainer, device, batch, preset["steps"], preset["warmup"])
    record.update(data=data, step=step, end_to_end=end_to_end)
    for name in ("step", "end_to_end"):
        for path in ("fast", "baseline"):
            result = record[name][path]
            result["tflops"] = result["images_per_s"] * flops / 1e12
            result["fraction_of_peak"] = result["tflops"] / peak if peak else None
    if not args.skip_eval:
        if args.eval_full:
            if not args.dataset_root:
                parser.error("--eval-full needs --dataset-root")
            fast_trainer.train_set, fast_trainer.test_set = _data(args.dataset_root, None, settings)
        record["eval"] = measure_eval(settings, fast_trainer, device)

    # The speedups, the report and the record.
    record["peak_memory_mib"] = _peak_memory_mib(device)
    record["speedup"] = {
        name: record[name]["fast"]["images_per_s"] / record[name]["baseline"]["images_per_s"]
        for name in ("data", "step", "end_to_end")
    }
    _report(record)
    path = Path(args.json or REPO / "bench" / "results" / f"throughput-{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")
    s = record["speedup"]
    print(f"speedup data={s['data']:.2f} step={s['step']:.2f} end_to_end={s['end_to_end']:.2f}", flush=True)


def _settings(overrides: list[str]):
    return soda.config.compose(overrides)


def _data(root: str | None, preset: dict, settings) -> tuple[LabelledImages, LabelledImages]:
    """CIFAR-10 from `root`, or synthetic shapes at its size (throughput does not depend on what
    the pixels show; accuracies do, so they are only meaningful with real data)."""
    d = settings.dataset
    if root:
        train = load_split("cifar10", root, "train", d.image_size, d.num_classes, download=False)
        test = load_split("cifar10", root, "test", d.image_size, d.num_classes, download=False)
        if preset is None:  # everything
            return train, test
        return train.subset(preset["images"]), test.subset(preset["eval_test"])

    def shapes(count: int, seed: int) -> LabelledImages:
        images, labels = make_shapes(min(count, 2048), d.image_size, seed=seed)
        repeats = math.ceil(count / images.shape[0])
        return LabelledImages(images.repeat(repeats, 1, 1, 1)[:count], labels.repeat(repeats)[:count], list("abcdef"))

    return shapes(preset["images"], 0), shapes(preset["eval_test"], 1)


def _peak(device: torch.device) -> tuple[float | None, str | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), (None, None))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device: torch.device) -> dict:
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
    fast_memory = _peak_memory_mib(device)

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


def _report(record: dict) -> None:
    print()
    print(f"{'':14s} {'fast img/s':>12s} {'baseline img/s':>15s} {'ratio':>7s} {'fast TFLOP/s':>13s} {'of peak':>8s}")
    for name in ("data", "step", "end_to_end"):
        fast, baseline = record[name]["fast"], record[name]["baseline"]
        tflops = f"{fast['tflops']:.2f}" if "tflops" in fast else "-"
        fraction = f"{fast['fraction_of_peak']:.1%}" if fast.get("fraction_of_peak") else "-"
        print(
            f"{name:14s} {fast['images_per_s']:12,.0f} {baseline['images_per_s']:15,.0f} "
            f"{record['speedup'][name]:7.2f} {tflops:>13s} {fraction:>8s}"
        )
    epoch = 50_000 / record["end_to_end"]["fast"]["images_per_s"]
    print(f"end to end: {epoch:.1f} s per 50,000-image epoch on the fast path")
    print(
        f"model: {record['gflop_per_image']:.1f} GFLOP per image per training step; peak memory {record['peak_memory_mib']}"
    )
    print(record["end_to_end"]["loss"]["verdict"])


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
