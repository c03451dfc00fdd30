"""Settings -> the pieces of a run: the model, the data, the view augmentations, the evaluation
and the training loop.

The run (soda.train), the benchmarks (bench/throughput.py), post-hoc evaluation (soda.saved_run)
and the tests all build here, so that each builds a piece exactly as a run does.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import torch

from soda import dist
from soda.config import Config
from soda.config_groups import ViewConfig
from soda.data import LabelledImages, ViewAugmentation, load_splits
from soda.errors import ConfigError
from soda.evaluator import Evaluator
from soda.loop import Trainer
from soda.models import SODA, build_soda
from soda.record import flatten
from soda.trainer_parts import PRECISION_DTYPES, Hooks, OnEvaluation, Optimization, Schedule, Views


def build_model(settings: Config) -> SODA:
    try:
        return build_soda(**settings.model_arguments())
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


def load_data(settings: Config) -> tuple[LabelledImages, LabelledImages]:
    d = settings.dataset
    train, test = load_splits(
        d.name,
        d.root,
        d.image_size,
        d.num_classes,
        download=d.download,
        seed=settings.seed,
        train_size=d.train_size,
        test_size=d.test_size,
    )
    return train.subset(d.train_limit), test.subset(d.test_limit)


def view_augmentation(image_size: int, view: ViewConfig) -> ViewAugmentation:
    kwargs = asdict(view)
    kwargs.pop("name")
    return ViewAugmentation(image_size, **kwargs)


def build_evaluator(
    settings: Config,
    train_set: LabelledImages,
    test_set: LabelledImages,
    device: torch.device,
    samples_dir: Path | None = None,
    log_artifact=None,
    keep_latent_errors: bool = False,
) -> Evaluator:
    options = asdict(settings.eval)
    for key in ("name", "every", "every_seconds", "at_start"):  # when to evaluate: the loop's
        options.pop(key)
    options.pop("probe_augmentation")  # built into an augmentation below
    return Evaluator(
        train_set,
        test_set,
        device,
        seed=settings.seed,
        num_classes=settings.dataset.num_classes,
        probe_augmentation=view_augmentation(settings.dataset.image_size, settings.eval.probe_augmentation),
        autocast_dtype=PRECISION_DTYPES[settings.schedule.precision],
        samples_dir=samples_dir,
        log_artifact=log_artifact,
        keep_latent_errors=keep_latent_errors,
        **options,
    )


def build_trainer(
    settings: Config,
    model: SODA,
    train_set: LabelledImages,
    run_dir: Path,
    device: torch.device,
    evaluate=None,
    on_evaluation: OnEvaluation | None = None,
    tracker=None,
    world: dist.Distributed | None = None,
) -> Trainer:
    schedule, e = asdict(settings.schedule), settings.eval
    schedule.pop("name")
    size, views = settings.dataset.image_size, settings.augmentation
    # Each schedule setting goes to the part of the loop that uses it, and none is left over.
    optimization = {f.name: schedule.pop(f.name) for f in fields(Optimization)}
    return Trainer(
        model,
        Views(
            train_set,
            source_augment=view_augmentation(size, views.source),
            # The same settings for both views: one call augments both (Trainer.make_views).
            target_augment=None if views.source == views.target else view_augmentation(size, views.target),
        ),
        Optimization(**optimization),
        Schedule(
            **schedule,
            eval_every=e.every,
            eval_every_seconds=e.every_seconds,
            eval_at_start=e.at_start,
        ),
        Hooks(evaluate if evaluate is not None else _no_evaluation, on_evaluation, tracker),
        run_dir=run_dir,
        device=device,
        world=world,
        seed=settings.seed,
        signature=signature(settings),
    )


def _no_evaluation(ema_model: SODA, epoch: int, last: bool) -> dict[str, float]:
    raise RuntimeError("this Trainer was built without an evaluation (build_trainer(..., evaluate=...))")


def signature(settings: Config) -> dict:
    """What a checkpoint must share with the run resuming it."""
    d = settings.dataset
    return {
        **flatten(asdict(settings.model), "model."),
        "dataset.name": d.name,
        "dataset.image_size": str(d.image_size),
        "dataset.num_classes": str(d.num_classes),
        "seed": str(settings.seed),
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)
