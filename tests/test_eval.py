import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from soda.eval import (
    evaluate_probes,
    factor_probes,
    knn_accuracy,
    knn_predict,
    latent_errors,
    latent_gap,
    linear_probe_accuracy,
    train_linear_probe,
)


def _random_bank(n_bank=600, n_query=300, dim=16, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n_bank, dim, generator=g), dim=1)
    query = F.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    bank_labels = torch.randint(0, classes, (n_bank,), generator=g)
    return bank, bank_labels, query


@pytest.mark.parametrize("chunk_size", [7, 512])
def test_uniform_knn_agrees_exactly_with_scikit_learn(chunk_size):
    bank, bank_labels, query = _random_bank()
    reference = KNeighborsClassifier(n_neighbors=20).fit(bank.double().numpy(), bank_labels.numpy())
    expected = reference.predict(query.double().numpy())
    ours = knn_predict(bank, bank_labels, query, k=20, vote="uniform", chunk_size=chunk_size)
    assert np.array_equal(ours.numpy(), expected)


def test_weighted_knn_agrees_with_a_brute_force_temperature_vote():
    bank, bank_labels, query = _random_bank(seed=1)
    similarity = query.double() @ bank.double().T
    expected = []
    for row in similarity:
        top = row.argsort(descending=True)[:20]
        votes = np.zeros(7)
        for j in top:
            votes[bank_labels[j]] += np.exp(row[j].item() / 0.07)
        expected.append(votes.argmax())
    ours = knn_predict(bank, bank_labels, query, k=20, vote="weighted", temperature=0.07, chunk_size=50)
    assert np.array_equal(ours.numpy(), np.array(expected))


def test_knn_classifies_clustered_features():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(5, 32, generator=g), dim=1)
    labels = torch.arange(5).repeat(100)
    features = F.normalize(centers[labels] + 0.05 * torch.randn(500, 32, generator=g), dim=1)
    assert knn_accuracy(features[:400], labels[:400], features[400:], labels[400:]) == 1.0


def _separable(n=2000, dim=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    features = directions[labels] * 3 + torch.randn(n, dim, generator=g)
    return features, labels


def test_linear_probe_separates_linearly_separable_features():
    features, labels = _separable()
    accuracy = linear_probe_accuracy(
        features[:1500], labels[:1500], features[1500:], labels[1500:], 10, epochs=15, lr=1e-2
    )
    assert accuracy > 0.95


def test_linear_probe_is_near_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(3000, 32, generator=g), torch.randint(0, 10, (3000,), generator=g)
    accuracy = linear_probe_accuracy(features[:2000], labels[:2000], features[2000:], labels[2000:], 10, epochs=5)
    assert 0.05 < accuracy < 0.16


def test_linear_probe_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    features, labels = _separable(n=500)
    torch.manual_seed(42)
    state = torch.get_rng_state()
    first = train_linear_probe(features, labels, 10, epochs=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    second = train_linear_probe(features, labels, 10, epochs=3, seed=7)
    third = train_linear_probe(features, labels, 10, epochs=3, seed=8)
    assert torch.equal(first[1].weight, second[1].weight)
    assert not torch.equal(first[1].weight, third[1].weight)


def test_evaluate_probes_streams_test_batches_against_one_bank():
    features, labels = _separable(n=1200, classes=4)
    images = features.view(1200, 2, 4, 4)  # "images" whose encoder is a reshape + normalise

    def encode(batch):
        return F.normalize(batch.flatten(1), dim=1)

    def batches(start, stop):
        return [(images[i : i + 100], labels[i : i + 100]) for i in range(start, stop, 100)]

    augmented = [[(x + 0.1 * torch.randn_like(x), y) for x, y in batches(0, 1000)]]
    result = evaluate_probes(
        encode,
        batches(0, 1000),
        batches(1000, 1200),
        num_classes=4,
        probe_epochs=5,
        probe_lr=1e-2,
        probe_augmented_batches=augmented,
    )
    assert set(result) == {"knn_acc", "linear_acc"}
    assert result["knn_acc"] > 0.9 and result["linear_acc"] > 0.9
    # The same figures as computing everything at once.
    bank = encode(images[:1000])
    assert result["knn_acc"] == knn_accuracy(bank, labels[:1000], encode(images[1000:]), labels[1000:], num_classes=4)


def test_mismatched_feature_banks_are_value_errors():
    bank, bank_labels, query = _random_bank()
    with pytest.raises(ValueError, match=r"bank_labels has 599 entries but bank_features has 600 rows"):
        knn_predict(bank, bank_labels[:-1], query)
    with pytest.raises(ValueError, match=r"query_features has shape \(300, 8\)"):
        knn_predict(bank, bank_labels, query[:, :8])
    with pytest.raises(ValueError, match=r"vote='majority'.*uniform, weighted"):
        knn_predict(bank, bank_labels, query, vote="majority")
    with pytest.raises(ValueError, match=r"k=601 must be between 1 and the bank size \(600\)"):
        knn_predict(bank, bank_labels, query, k=601)
    with pytest.raises(ValueError, match=r"train_labels has 10 entries but train_features has 600 rows"):
        train_linear_probe(bank, bank_labels[:10], 7)


# The latent gap.


class _OracleModel(torch.nn.Module):
    """A stand-in SODA whose latent is the image itself and whose decoder inverts q_sample with
    it: exact with an image's own latent, wrong with any other. It records the latents it gets."""

    def __init__(self):
        super().__init__()
        from tests.models.helpers import diffusion as make_diffusion

        self.diffusion = make_diffusion()
        self.seen: list[torch.Tensor] = []
        self.decoder = self._decode

    def encode(self, images, normalize=True):
        return images.flatten(1)

    def _decode(self, noisy, fraction, latent):
        self.seen.append(latent)
        t = (fraction * self.diffusion.timesteps).round().long()
        x0 = latent.view(noisy.shape) * 2 - 1
        signal = self.diffusion.q_sample(x0, t, torch.zeros_like(x0))  # sqrt(alpha_bar) x0
        noise_scale = self.diffusion.q_sample(torch.zeros_like(x0), t, torch.ones_like(x0))
        return (noisy - signal) / noise_scale


def test_latent_errors_swap_every_latent_for_another_images():
    model = _OracleModel()
    images = torch.rand(9, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = latent_errors(model, images, [500, 700], seed=3, dropped=True)
    own, shuffled, dropped = model.seen[:3]
    assert torch.equal(own, images.flatten(1))
    assert not (shuffled == own).all(dim=1).any()  # no image keeps its own latent
    assert sorted(shuffled.sum(1).tolist()) == pytest.approx(sorted(own.sum(1).tolist()))  # a permutation
    assert torch.equal(dropped, torch.zeros_like(own))
    for step in (500, 700):
        assert errors[step]["own"] < 1e-10 and errors[step]["shuffled"] > 1e-4
    # Fixed noise and fixed swap: the same numbers again, whatever else drew from the global RNG.
    torch.rand(100)
    assert latent_errors(_OracleModel(), images, [500, 700], seed=3, dropped=True) == errors
    assert set(latent_errors(_OracleModel(), images, [500], seed=3)[500]) == {"own", "shuffled"}


def test_latent_gap_is_the_relative_increase_over_all_timesteps():
    errors = {500: {"own": 1.0, "shuffled": 1.1, "dropped": 2.0}, 700: {"own": 3.0, "shuffled": 3.3, "dropped": 4.0}}
    assert latent_gap(errors) == pytest.approx(0.1)
    assert latent_gap({500: errors[500]}) == pytest.approx(0.1)


def test_latent_gap_of_a_decoder_that_ignores_its_latent_is_zero():
    from tests.models.helpers import tiny_soda

    model = tiny_soda(dropout=0.0).eval()
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    uses_latent = latent_gap(latent_errors(model, images, [50, 70]))
    assert uses_latent != 0.0
    for block in model.decoder.modules():
        if hasattr(block, "latent_proj"):
            torch.nn.init.zeros_(block.latent_proj.weight)  # the shift/scale no longer depend on z
    assert latent_gap(latent_errors(model, images, [50, 70])) == pytest.approx(0.0, abs=1e-6)


def test_latent_errors_need_two_images_and_known_timesteps():
    with pytest.raises(ValueError, match="at least 2 images"):
        latent_errors(_OracleModel(), torch.rand(1, 3, 4, 4), [500])
    with pytest.raises(ValueError, match="timestep 1000 is outside"):
        latent_errors(_OracleModel(), torch.rand(2, 3, 4, 4), [1000])


def _factors(count, seed):
    g = torch.Generator().manual_seed(seed)
    position = torch.rand(count, 2, generator=g)
    shape = torch.randint(0, 3, (count,), generator=g)
    hidden = torch.rand(count, 1, generator=g)  # never shown to the features
    angle = torch.rand(count, generator=g) * 6.28
    rotation = torch.stack([angle.cos(), angle.sin()], dim=1)
    rotation[shape == 0] = float("nan")  # undefined for one class, as a disk's
    return {"position": position, "shape": shape, "hidden": hidden, "rotation": rotation}


def _features(factors, seed, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    count = factors["shape"].shape[0]
    angle = factors["rotation"].nan_to_num(0.0)
    encoded = [factors["position"] * 3 - 1, F.one_hot(factors["shape"], 3).float(), angle]
    return torch.cat([*encoded, torch.randn(count, 5, generator=g)], dim=1) + noise * torch.randn(
        count, 12, generator=g
    )


def test_factor_probes_read_what_the_features_encode_and_nothing_else():
    train, test = _factors(800, 0), _factors(400, 1)
    scores = factor_probes(_features(train, 2), train, _features(test, 3), test)
    assert scores["shape"] == 1.0  # discrete: accuracy
    assert scores["position"] > 0.97 and scores["rotation"] > 0.97  # continuous: R^2, NaN rows left out
    assert abs(scores["hidden"]) < 0.05  # a factor the features do not carry: R^2 near 0


def test_factor_probe_r2_matches_scikit_learns_ridge():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    train, test = _factors(500, 4), _factors(300, 5)
    x_train, x_test = _features(train, 6, noise=0.5), _features(test, 7, noise=0.5)
    scores = factor_probes(x_train, {"position": train["position"]}, x_test, {"position": test["position"]}, ridge=0.1)
    scaler = StandardScaler().fit(x_train.double().numpy())
    scale = train["position"].double().std(0).numpy()
    model = Ridge(alpha=0.1 * 500).fit(
        scaler.transform(x_train.double().numpy()), train["position"].double().numpy() / scale
    )
    predicted = model.predict(scaler.transform(x_test.double().numpy()))
    truth = test["position"].double().numpy() / scale
    expected = r2_score(truth, predicted, multioutput="variance_weighted")
    assert scores["position"] == pytest.approx(expected, abs=1e-6)


def test_factor_probes_refuse_mismatched_factors():
    train, test = _factors(50, 0), _factors(40, 1)
    with pytest.raises(ValueError, match="not the test set's"):
        factor_probes(torch.randn(50, 4), train, torch.randn(40, 4), {"shape": test["shape"]})
    with pytest.raises(ValueError, match="rows"):
        factor_probes(torch.randn(49, 4), train, torch.randn(40, 4), test)
