"""The learning canary: a short training run whose decoder must come to rely on each image's own
latent. If a change cut the gradient path from the decoder into the encoder, detached or zeroed
the latent, or froze the encoder, every other test would still pass; this one fails.

The run is the demo's learning setting (no augmentation, the inverted-cosine noise schedule;
docs/learning.md) made small: CANARY_STEPS optimiser steps on CPU. The yardstick is the latent
gap at t = 500 (soda.eval.latent_gap), of the trained (not EMA) weights, on fixed test images and
noise. THRESHOLD sits between what the run reaches and what the same run reaches with the
encoder's output detached (the decoder can still learn to read the untrained encoder's latent,
which carries some image information, so that control is not zero).
"""

from __future__ import annotations

from pathlib import Path

import torch

from soda.build import build_model, build_trainer, load_data
from soda.config import compose_config, to_settings
from soda.eval import latent_errors, latent_gap

CANARY = [
    "experiment=demo",
    "augmentation=none",
    "model.noise_schedule=inverted_cosine",
    "device=cpu",
    "schedule.batch_size=32",
    "schedule.decoder_lr=1e-3",
    "schedule.warmup_epochs=0.2",
]
CANARY_STEPS = 300
THRESHOLD = 0.035
GAP_IMAGES = 256


def canary_gap(run_dir: Path, steps: int = CANARY_STEPS) -> float:
    """Train the canary run for `steps` steps (batches drawn with a fixed generator) and return
    the latent gap at t = 500 of the trained weights."""
    settings = to_settings(compose_config(CANARY))
    torch.manual_seed(settings.seed)
    model = build_model(settings)
    train, test = load_data(settings)
    trainer = build_trainer(settings, model, train, run_dir, torch.device("cpu"))
    draw = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(train), (settings.schedule.batch_size,), generator=draw)
        trainer.train_step(trainer.train_images[batch])
    model.eval()
    images = test.images[:GAP_IMAGES].float() / 255
    return latent_gap(latent_errors(model, images, [500], seed=0))


def test_the_decoder_comes_to_rely_on_each_images_own_latent(tmp_path):
    gap = canary_gap(tmp_path)
    assert gap > THRESHOLD, (
        f"after {CANARY_STEPS} steps the decoder's error at t=500 rises by only {gap:.2%} when it gets another "
        f"image's latent (the canary needs > {THRESHOLD:.1%}): is the encoder still trained through the latent?"
    )
