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
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import soda.config
from soda.build import build_model
from soda.data import LabelledImages, load_split
from soda.data.shapes import make_shapes
from soda.models.summary import training_step_flops_per_image
from soda.record import git_state

# The measurements and the baseline, sibling modules, found through the path line.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_measures import measure_data, measure_end_to_end, measure_eval, measure_step, peak_memory_mib

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
    record["peak_memory_mib"] = peak_memory_mib(device)
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
