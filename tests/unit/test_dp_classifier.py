"""The direct DP classifier: it learns, its epsilon is the one accounted for, and its noise is fresh."""

from __future__ import annotations

import numpy as np
import pytest

from dpnb.evaluation.dp_classifier import DPClassifierSettings, train_dp_classifier
from dpnb.privacy import accounting, guarantee, independent_accounting


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two labelled clusters of unit-length 8-dimensional vectors, as sentence embeddings are."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    centre = np.zeros(8)
    centre[0] = 1.0
    x = rng.normal(0, 0.6, (n, 8)) + np.where(labels[:, None] == 1, centre, -centre)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def settings(**overrides) -> DPClassifierSettings:
    values = dict(target_epsilon=8.0, delta=1e-4, epochs=10, batch_size=64, lr=0.1, deterministic=True)
    values.update(overrides)
    return DPClassifierSettings(**values)


def test_it_learns_and_its_epsilon_is_recomputable():
    x, y = blobs(1000)
    test_x, test_y = blobs(500, seed=1)
    trained = train_dp_classifier(x, y, 2, settings())
    accuracy = (trained.predict_features(test_x) == test_y).mean()
    assert accuracy > 0.85, accuracy
    record = trained.privacy
    assert record["steps"] == accounting.planned_steps(1000, 64, 10) and record["sample_rate"] == 1 / 16
    assert record["epsilon"] <= 8.0 and record["epsilon"] > 7.9  # calibrated to the target, from below
    guarantee.verify_privacy(record)  # Opacus, from the record's own numbers
    check = independent_accounting.cross_check(record)  # Google's dp-accounting agrees
    assert check["google_pld"] == pytest.approx(record["epsilon"], abs=0.05)
    assert not record["dp_release"]  # deterministic: the noise came from the seed


def test_less_budget_costs_accuracy_and_more_noise():
    x, y = blobs(400)
    test_x, test_y = blobs(1000, seed=1)
    loose = train_dp_classifier(x, y, 2, settings(target_epsilon=8.0))
    tight = train_dp_classifier(x, y, 2, settings(target_epsilon=0.3))
    assert tight.privacy["noise_multiplier"] > 5 * loose.privacy["noise_multiplier"]
    assert (tight.predict_features(test_x) == test_y).mean() < (loose.predict_features(test_x) == test_y).mean()


def test_fresh_noise_unless_deterministic():
    x, y = blobs(200)
    same = [train_dp_classifier(x, y, 2, settings(epochs=2)).weight for _ in range(2)]
    assert np.array_equal(*same)
    fresh = [train_dp_classifier(x, y, 2, settings(epochs=2, deterministic=False)) for _ in range(2)]
    assert not np.array_equal(fresh[0].weight, fresh[1].weight)
    assert fresh[0].privacy["dp_release"] and "OS entropy" in fresh[0].privacy["noise_seeded_from"]
