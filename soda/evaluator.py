"""The evaluation of an encoder during training and after it: the probes, the latent gap and
reconstructions of a SODA model (`Evaluator`). Training calls it at each evaluation;
`python -m soda.evaluate` (soda.evaluate, soda.saved_run) calls it for a saved run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torchvision.utils import save_image

from soda import progress
from soda.data import LabelledImages, ViewAugmentation
from soda.eval import evaluate_probes, extract_features, factor_probes, latent_errors, latent_gap
from soda.models import SODA
from soda.record import KNN_ACC, LATENT_GAP, LINEAR_ACC, RECON_MSE, factor_metric, latent_gap_at


class Evaluator:
    """evaluator(ema_model, epoch, last) -> {KNN_ACC: ..., ...}. Runs under its own seeded
    RNG, so evaluating, or not, never changes the training that follows."""

    def __init__(
        self,
        train_set: LabelledImages,  # the k-NN bank and the probe's training set
        test_set: LabelledImages,
        device: torch.device,
        *,
        seed: int,
        num_classes: int,
        probe_augmentation: ViewAugmentation,  # the probe's augmented passes
        autocast_dtype: torch.dtype | None = None,  # feature extraction precision on CUDA
        samples_dir: Path | None = None,  # where reconstruction grids go
        log_artifact: Callable[[Path, str], None] | None = None,  # and how they are recorded
        keep_latent_errors: bool = False,  # also measure the dropped latent (soda.evaluate's table)
        linear_probe: str,  # every | last: the linear probe at each evaluation or at the last only
        batch_size: int,  # feature extraction batch
        knn_k: int,
        knn_vote: str,
        knn_temperature: float,
        probe_epochs: int,
        probe_lr: float,
        probe_batch_size: int,
        probe_augmented_copies: int,
        num_reconstructions: int,
        sample_steps: int,
        sample_eta: float,
        guidance: float,
        latent_gap_images: int,
        latent_gap_timesteps: Sequence[int],
    ):
        self.train_set, self.test_set, self.device = train_set, test_set, device
        self.seed, self.num_classes = seed, num_classes
        self.probe_augmentation = probe_augmentation
        self.autocast_dtype = autocast_dtype if device.type == "cuda" else None
        self.samples_dir, self.log_artifact = samples_dir, log_artifact
        self.keep_latent_errors = keep_latent_errors
        self.latent_errors: dict[int, dict[str, float]] = {}
        self.linear_probe = linear_probe
        self.batch_size = batch_size
        self.knn = {"knn_k": min(knn_k, len(train_set)), "knn_vote": knn_vote, "knn_temperature": knn_temperature}
        self.probe = {"probe_epochs": probe_epochs, "probe_lr": probe_lr, "probe_batch_size": probe_batch_size}
        self.probe_augmented_copies = probe_augmented_copies
        self.num_reconstructions = num_reconstructions
        self.sampling = {"steps": sample_steps, "eta": sample_eta, "guidance": guidance}
        self.latent_gap_images, self.latent_gap_timesteps = latent_gap_images, list(latent_gap_timesteps)

    @torch.no_grad()
    def __call__(self, ema_model: SODA, epoch: int, last: bool = True) -> dict[str, float]:
        ema_model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 7_919 + epoch)
            metrics = self.probes(ema_model, linear=last or self.linear_probe == "every")
            if self.train_set.factors and self.test_set.factors:
                metrics.update(self.factor_probes(ema_model))
            if self.latent_gap_images > 0:
                metrics.update(self.latent_gaps(ema_model))
            if self.num_reconstructions > 0:
                progress.stage("samples", self.num_reconstructions, "images")
                metrics[RECON_MSE] = self.reconstruct(ema_model, epoch)
        return {k: float(v) for k, v in metrics.items()}

    def latent_gaps(self, ema_model: SODA) -> dict[str, float]:
        """eval/latent_gap on a fixed test batch with fixed noise (the same at every evaluation),
        and the gap at each timestep."""
        images = self.test_set.images[: self.latent_gap_images].to(self.device).float() / 255
        errors = latent_errors(
            ema_model, images, self.latent_gap_timesteps, seed=self.seed, dropped=self.keep_latent_errors
        )
        self.latent_errors = errors
        gaps = {latent_gap_at(step): latent_gap({step: errors[step]}) for step in errors}
        return {LATENT_GAP: latent_gap(errors), **gaps}

    def _encoder(self, ema_model: SODA):
        def encode(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                return ema_model.encode(images.to(self.device).float() / 255, normalize=True)

        return encode

    def _batches(self, data: LabelledImages, augment: ViewAugmentation | None = None):
        for start in range(0, len(data), self.batch_size):
            images = data.images[start : start + self.batch_size].to(self.device)
            if augment is not None:
                images = (augment(images) * 255).round().to(torch.uint8)
            yield images, data.labels[start : start + self.batch_size]

    def factor_probes(self, ema_model: SODA) -> dict[str, float]:
        """eval/factor/<name>: each factor of variation the data set records, read linearly from
        the same features as the probes (soda.eval.factor_probes). The features are extracted once
        more here; for `shapes` that is a fraction of the evaluation."""
        encode = self._encoder(ema_model)
        progress.stage("factor probe features", len(self.train_set) + len(self.test_set), "images")
        train, _ = extract_features(encode, self._batches(self.train_set), self.device)
        test, _ = extract_features(encode, self._batches(self.test_set), self.device)
        scores = factor_probes(train, self.train_set.factors, test, self.test_set.factors)
        return {factor_metric(name): score for name, score in scores.items()}

    def probes(self, ema_model: SODA, linear: bool = True) -> dict[str, float]:
        encode, batches = self._encoder(ema_model), self._batches
        augmented = [batches(self.train_set, self.probe_augmentation) for _ in range(self.probe_augmented_copies)]
        result = evaluate_probes(
            encode,
            batches(self.train_set),
            batches(self.test_set),
            self.num_classes,
            **self.knn,
            **self.probe,
            probe_augmented_batches=augmented,
            seed=self.seed,
            device=self.device,
            linear=linear,
            train_count=len(self.train_set),
            test_count=len(self.test_set),
        )
        keys = {"knn_acc": KNN_ACC, "linear_acc": LINEAR_ACC}
        return {keys[name]: value for name, value in result.items()}

    def reconstruct(self, ema_model: SODA, epoch: int) -> float:
        """Reconstructions of the first test images from their latents alone; the grid is saved
        (top row: the images, bottom row: their reconstructions) when there is a samples_dir."""
        originals = self.test_set.images[: self.num_reconstructions].to(self.device).float() / 255
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        reconstructions = ema_model.reconstruct(originals, generator=generator, **self.sampling)
        if self.samples_dir is not None:
            path = self.samples_dir / f"reconstructions_epoch{epoch:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(torch.cat([originals, reconstructions]).cpu(), path, nrow=len(originals), padding=1)
            if self.log_artifact is not None:
                self.log_artifact(path, "samples")
        return torch.mean((reconstructions - originals) ** 2).item()
