"""Frozen-feature probes (k-NN and a linear probe), and the latent gap: does the decoder use
what the encoder says about each image?

Both take features that were computed once. `evaluate_probes` holds one feature bank (the
training set's) and streams the test set through the encoder batch by batch, so memory stays at
one bank however large the test set is. Everything runs on whatever device the features are on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from soda import progress

KNN_VOTES = ("uniform", "weighted")


def _check_bank(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name}_features must be [count, dim]; got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name}_labels has {labels.shape[0] if labels.dim() else 0} entries but {name}_features has "
            f"{features.shape[0]} rows; they must be the same length"
        )


@torch.no_grad()
def knn_predict(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    vote: str = "uniform",
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Class predictions for `query_features` from their k nearest neighbours in the bank.

    vote="uniform": the reference's rule (scikit-learn's KNeighborsClassifier): the k smallest
    Euclidean distances, one vote each, ties between classes to the smallest label.
    vote="weighted": DINO / solo-learn's rule: the k largest cosine similarities, each voting
    exp(similarity / temperature). Features are expected L2-normalised for both.
    Queries are processed `chunk_size` at a time, so the distance matrix never exceeds
    chunk_size x bank size.
    """
    _check_bank(bank_features, bank_labels, "bank")
    if vote not in KNN_VOTES:
        raise ValueError(f"vote={vote!r} is not known; allowed: {', '.join(KNN_VOTES)}")
    if query_features.dim() != 2 or query_features.shape[1] != bank_features.shape[1]:
        raise ValueError(
            f"query_features has shape {tuple(query_features.shape)}; expected [count, {bank_features.shape[1]}] "
            "like bank_features"
        )
    if not 1 <= k <= bank_features.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the bank size ({bank_features.shape[0]})")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    bank_features = bank_features.float()
    bank_labels = bank_labels.to(bank_features.device)
    bank_sq_norms = (bank_features * bank_features).sum(dim=1)

    predictions = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = query_features[start : start + chunk_size].to(bank_features.device).float()
        similarity = query @ bank_features.T
        if vote == "uniform":
            # Squared Euclidean distance; the query's own norm does not change the ranking.
            distance = bank_sq_norms[None, :] - 2 * similarity
            _, neighbours = distance.topk(k, dim=1, largest=False)
            weights = torch.ones(neighbours.shape, device=query.device)
        else:
            top_similarity, neighbours = similarity.topk(k, dim=1)
            weights = (top_similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, bank_labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))  # first maximum = smallest label on ties
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_accuracy(bank_features, bank_labels, query_features, query_labels, **knn_kwargs) -> float:
    _check_bank(query_features, query_labels, "query")
    predictions = knn_predict(bank_features, bank_labels, query_features, **knn_kwargs)
    return (predictions.cpu() == query_labels.cpu()).float().mean().item()


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 15,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """BatchNorm1d(affine=False) + Linear trained with Adam and a per-epoch cosine schedule on
    features computed once. Deterministic for a fixed seed; the global RNG is left untouched."""
    _check_bank(features, labels, "train")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"linear probe needs epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    device = features.device
    features = features.float()
    labels = labels.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Sequential(
            nn.BatchNorm1d(features.shape[1], affine=False, eps=1e-6),
            nn.Linear(features.shape[1], num_classes),
        ).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    order_rng = torch.Generator().manual_seed(seed)
    probe.train()
    with torch.enable_grad():  # callers often evaluate under no_grad
        _fit_probe(probe, features, labels, optimizer, schedule, order_rng, epochs, batch_size)
    return probe.eval()


def _fit_probe(probe, features, labels, optimizer, schedule, order_rng, epochs, batch_size) -> None:
    device = features.device
    progress.stage("linear probe", epochs, "epochs")
    for epoch in range(epochs):
        progress.advance(epoch)
        order = torch.randperm(features.shape[0], generator=order_rng).to(device)
        for start in range(0, features.shape[0], batch_size):
            batch = order[start : start + batch_size]
            if batch.numel() < 2:  # BatchNorm cannot normalise a single example
                continue
            loss = F.cross_entropy(probe(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()


@torch.no_grad()
def probe_predict(probe: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return probe(features.float()).argmax(dim=1)


def linear_probe_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes: int, **probe_kwargs
) -> float:
    _check_bank(test_features, test_labels, "test")
    probe = train_linear_probe(train_features, train_labels, num_classes, **probe_kwargs)
    predictions = probe_predict(probe, test_features.to(train_features.device))
    return (predictions.cpu() == test_labels.cpu()).float().mean().item()


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `encode` over (images, labels) batches; features stay on `device` (default: where
    `encode` put them). Reports the images done to the current stage (soda.progress)."""
    features, labels = [], []
    done = 0
    for images, batch_labels in batches:
        batch_features = encode(images).float()
        features.append(batch_features if device is None else batch_features.to(device))
        labels.append(batch_labels.to(features[-1].device))
        done += batch_labels.shape[0]
        progress.advance(done)
    if not features:
        raise ValueError("no batches to extract features from: the data set is empty")
    return torch.cat(features), torch.cat(labels)


def evaluate_probes(
    encode: Callable[[torch.Tensor], torch.Tensor],
    train_batches: Iterable,
    test_batches: Iterable,
    num_classes: int,
    knn_k: int = 20,
    knn_vote: str = "uniform",
    knn_temperature: float = 0.07,
    probe_epochs: int = 15,
    probe_lr: float = 1e-3,
    probe_batch_size: int = 128,
    probe_augmented_batches: Iterable[Iterable] = (),
    seed: int = 0,
    device: torch.device | str | None = None,
    linear: bool = True,
    train_count: int | None = None,  # images in train_batches and test_batches, for the stage lines
    test_count: int | None = None,
) -> dict[str, float]:
    """k-NN and linear-probe top-1 accuracy of `encode` (images -> L2-normalised features);
    k-NN only (no "linear_acc") when `linear` is false.

    The k-NN bank is the training set as given (deterministic views); the probe trains on that
    bank plus one extra copy per entry of `probe_augmented_batches` (augmented passes over the
    training set). The test set is then streamed once: each batch is classified by both probes
    and dropped.
    """
    # The k-NN bank, and the linear probe trained on it and its augmented copies.
    progress.stage("k-NN features", train_count, "images")
    bank, bank_labels = extract_features(encode, train_batches, device)
    probe = None
    if linear:
        probe_features, probe_labels = [bank], [bank_labels]
        for copy, augmented in enumerate(probe_augmented_batches, start=1):
            progress.stage(f"probe features, augmented copy {copy}", train_count, "images")
            extra, extra_labels = extract_features(encode, augmented, bank.device)
            probe_features.append(extra)
            probe_labels.append(extra_labels)
        probe_bank = torch.cat(probe_features) if len(probe_features) > 1 else bank
        probe = train_linear_probe(
            probe_bank,
            torch.cat(probe_labels) if len(probe_labels) > 1 else bank_labels,
            num_classes,
            epochs=probe_epochs,
            lr=probe_lr,
            batch_size=probe_batch_size,
            seed=seed,
        )
        del probe_bank, probe_features, probe_labels

    # Both probes on each test batch, streamed once.
    progress.stage("k-NN and linear test" if probe is not None else "k-NN test", test_count, "images")
    knn_correct = linear_correct = total = 0
    for images, labels in test_batches:
        features = encode(images).float().to(bank.device)
        labels = labels.to(bank.device)
        knn = knn_predict(
            bank, bank_labels, features, k=knn_k, vote=knn_vote, temperature=knn_temperature, num_classes=num_classes
        )
        knn_correct += (knn == labels).sum().item()
        if probe is not None:
            linear_correct += (probe_predict(probe, features) == labels).sum().item()
        total += labels.numel()
        progress.advance(total)
    if total == 0:
        raise ValueError("no test batches to evaluate: the test set is empty")
    if probe is None:
        return {"knn_acc": knn_correct / total}
    return {"knn_acc": knn_correct / total, "linear_acc": linear_correct / total}


@torch.no_grad()
def latent_errors(
    model,
    images: torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
    dropped: bool = False,
) -> dict[int, dict[str, float]]:
    """The decoder's noise-prediction error on `images` (in [0, 1]) at each of `timesteps`, with
    each image's own latent ("own"), with another image's ("shuffled": a derangement of the
    batch, no image keeps its own) and, if `dropped`, with the latent zeroed ("dropped"). `model` is a SODA model (encode, decoder, diffusion);
    it is used as it is (call .eval() first for a deterministic decoder).

    The noise and the derangement come from a CPU generator seeded with `seed`, so the same
    images get the same noise on every device and at every evaluation of a run: differences
    between evaluations are the model's, not the draw's. The decoder runs in fp32.
    """
    count = images.shape[0]
    if count < 2:
        raise ValueError(f"the latent gap needs at least 2 images to swap latents; got {count}")
    device = images.device
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator)
    other = torch.empty_like(order)
    other[order] = order.roll(-1)  # image order[i] gets the latent of order[i + 1]: never its own
    latents = model.encode(images, normalize=False).float()
    candidates = {"own": latents, "shuffled": latents[other.to(device)]}
    if dropped:
        candidates["dropped"] = torch.zeros_like(latents)
    x0 = images * 2 - 1
    errors: dict[int, dict[str, float]] = {}
    progress.stage("latent gap", len(timesteps), "timesteps")
    for done, step in enumerate(timesteps):
        progress.advance(done)
        if not 0 <= step < model.diffusion.timesteps:
            raise ValueError(f"timestep {step} is outside 0..{model.diffusion.timesteps - 1}")
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.full((count,), step, device=device, dtype=torch.long)
        noisy = model.diffusion.q_sample(x0, t, noise)
        fraction = t.float() / model.diffusion.timesteps
        errors[step] = {
            name: torch.mean((model.decoder(noisy, fraction, latent).float() - noise) ** 2).item()
            for name, latent in candidates.items()
        }
    return errors


def latent_gap(errors: dict[int, dict[str, float]]) -> float:
    """How much worse the decoder predicts the noise with another image's latent than with the
    image's own, relative to its own, over all timesteps of `errors` (from `latent_errors`):
    0 when the latent carries nothing image-specific, 0.1 when swapping it costs 10 %."""
    own = sum(e["own"] for e in errors.values())
    shuffled = sum(e["shuffled"] for e in errors.values())
    return shuffled / own - 1


def ridge_fit(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Closed-form ridge regression of `targets` [N, k] on `features` [N, d], both standardised
    with the training rows' mean and standard deviation; `ridge` times N is the penalty on the
    weights (not on the bias). Returns a predictor of targets from new features."""
    features, targets = features.double(), targets.double()
    mean, std = features.mean(0), features.std(0, correction=0).clamp_min(1e-8)
    x = (features - mean) / std
    target_mean = targets.mean(0)
    gram = x.T @ x + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weights = torch.linalg.solve(gram, x.T @ (targets - target_mean))
    return lambda new: ((new.double() - mean) / std) @ weights + target_mean


def factor_probes(
    train_features: torch.Tensor,
    train_factors: dict[str, torch.Tensor],
    test_features: torch.Tensor,
    test_factors: dict[str, torch.Tensor],
    ridge: float = 1e-2,
) -> dict[str, float]:
    """How well a linear read-out of the features predicts each factor of variation on held-out
    images: {name: score}. A discrete factor (int64 [N]) is fitted as one-hot targets and scored
    by accuracy (the largest output); a continuous one (float [N] or [N, k]) is scored by R^2, over
    its standardised dimensions together: 1 - squared error / the test set's variance, so 0 is no
    better than predicting the mean and 1 is exact. Rows where a factor is NaN (undefined, such
    as a disk's rotation) are left out of that factor. Deterministic: no training loop."""
    scores: dict[str, float] = {}
    for name, train_values in train_factors.items():
        if name not in test_factors:
            raise ValueError(f"factor {name!r} is in the training set's factors but not the test set's")
        for split, features, values in (
            ("train", train_features, train_values),
            ("test", test_features, test_factors[name]),
        ):
            if features.dim() != 2 or values.shape[0] != features.shape[0]:
                raise ValueError(
                    f"{split} factor {name!r} has {values.shape[0]} rows for features of shape "
                    f"{tuple(features.shape)}; they must be [count, dim] and [count, ...]"
                )
        test_values = test_factors[name].to(test_features.device)
        train_values = train_values.to(train_features.device)
        if not train_values.dtype.is_floating_point:
            classes = int(max(train_values.max(), test_values.max())) + 1
            predict = ridge_fit(train_features, F.one_hot(train_values, classes).double(), ridge)
            scores[name] = (predict(test_features).argmax(1) == test_values).double().mean().item()
            continue
        train_values = train_values.reshape(train_values.shape[0], -1).double()
        test_values = test_values.reshape(test_values.shape[0], -1).double()
        train_rows, test_rows = ~train_values.isnan().any(1), ~test_values.isnan().any(1)
        if train_rows.sum() < 2 or test_rows.sum() < 2:
            raise ValueError(f"factor {name!r} is defined for fewer than 2 images of a split")
        scale = train_values[train_rows].std(0).clamp_min(1e-8)
        predict = ridge_fit(train_features[train_rows], train_values[train_rows] / scale, ridge)
        truth = test_values[test_rows] / scale
        error = ((predict(test_features[test_rows]) - truth) ** 2).sum()
        variance = ((truth - truth.mean(0)) ** 2).sum().clamp_min(1e-12)
        scores[name] = (1 - error / variance).item()
    return scores
