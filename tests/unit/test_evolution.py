"""Private Evolution's mechanism: the votes' sensitivity, the noise, the calibrated epsilon, the selection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpnb.generation import evolution
from dpnb.privacy import accounting, guarantee, independent_accounting


def unit_rows(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    rows = rng.normal(size=(n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("nearest", [1, 4, 16])
def test_one_record_moves_the_histogram_by_exactly_one(nearest):
    """Add/remove adjacency: the histograms with and without any one record differ by L2 norm 1 (the
    sensitivity the noise is calibrated for), for every record of a random population."""
    rng = np.random.default_rng(0)
    private, labels = unit_rows(40, 8, rng), rng.integers(0, 2, 40)
    population, population_labels = unit_rows(40, 8, rng), np.arange(40) % 2  # 20 texts per label
    everyone = evolution.vote_histogram(private, labels, population, population_labels, nearest)
    for i in range(len(private)):
        keep = np.arange(len(private)) != i
        without = evolution.vote_histogram(private[keep], labels[keep], population, population_labels, nearest)
        assert np.linalg.norm(everyone - without) == pytest.approx(1.0)
    # fewer texts than k in a label: a record's votes cover them all, and move H by less than 1
    few = evolution.vote_histogram(private, labels, population[:6], population_labels[:6], nearest)
    fewer = evolution.vote_histogram(private[1:], labels[1:], population[:6], population_labels[:6], nearest)
    assert np.linalg.norm(few - fewer) == pytest.approx(math.sqrt(min(nearest, 3) / nearest))
    # each record's votes land on texts of its own label only
    per_label = {c: everyone[population_labels == c].sum() for c in (0, 1)}
    assert per_label[0] == pytest.approx((labels == 0).sum() * nearest / math.sqrt(nearest))
    assert per_label[1] == pytest.approx((labels == 1).sum() * nearest / math.sqrt(nearest))


def test_votes_go_to_the_nearest_texts():
    population = np.eye(3)
    private = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.98]])
    histogram = evolution.vote_histogram(private, [0, 0], population, [0, 0, 0], nearest=1)
    assert histogram.tolist() == [1.0, 0.0, 1.0]


def test_noise_has_std_sigma():
    """The noisy histogram minus the histogram: N(0, sigma^2) per coordinate (a 1e-6 false-failure check
    on the sample variance of 200,000 draws: chi-square, about 5 standard errors of 0.3%)."""
    sigma, n = 0.7, 200_000
    histogram = np.arange(n, dtype=np.float64)
    noise = evolution.add_noise(histogram, sigma, torch.Generator().manual_seed(1)) - histogram
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
    assert abs(noise.var() / sigma**2 - 1) < 5 * math.sqrt(2 / n)
    assert np.array_equal(evolution.add_noise(histogram, None, torch.Generator()), histogram)


@pytest.mark.parametrize(("target", "iterations"), [(8.0, 1), (8.0, 3), (1.0, 2)])
def test_the_plan_spends_the_target_and_google_agrees(target, iterations):
    plan = evolution.plan_evolution(iterations, 4, target, None, dataset_size=1024)
    assert plan.delta == pytest.approx(accounting.default_delta(1024))
    epsilon = accounting.epsilon_spent(plan.noise_multiplier, 1.0, iterations, plan.delta, "prv")
    assert target - 0.02 <= epsilon <= target
    record = guarantee.privacy_fields(plan.noise_multiplier, 1.0, iterations, plan.delta, "prv")
    check = independent_accounting.cross_check({**record, "dp": True})
    assert check["google_pld"] == pytest.approx(epsilon, abs=0.05)
    assert plan.history == [(plan.noise_multiplier, 1.0, iterations)]
    more = evolution.plan_evolution(iterations + 1, 4, target, None, dataset_size=1024)
    assert more.noise_multiplier > plan.noise_multiplier  # more iterations, more noise each


def test_selection_keeps_the_largest_noisy_counts_per_label():
    noisy = np.array([0.1, 5.0, 2.0, 3.0, -1.0, 4.0])
    labels = [0, 0, 0, 1, 1, 1]
    assert evolution.select(noisy, labels, keep=2).tolist() == [1, 2, 5, 3]


def test_a_variation_continues_the_opening():
    text = "one two three four five six seven eight nine ten"
    assert evolution.opening(text, 0.3) == "one two three"
    assert evolution.opening("short text", 0.3) == "short text"  # at least two words


def test_one_iteration_keeps_what_the_records_vote_for_and_refills_each_label():
    """Texts are points on a circle; the private records sit near texts 0 and 5. Without noise the voted
    texts are kept, each label is refilled with variations of its kept texts, and the log (shareable)
    holds counts of the noisy histogram only."""
    def embed(texts: list[str]) -> np.ndarray:
        angles = np.array([float(t.split()[0]) for t in texts])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)

    population = evolution.Population([f"{a} text" for a in np.linspace(0, 3, 8)], [0, 0, 0, 0, 1, 1, 1, 1])
    private = embed(["0.0 x", "0.01 x", "2.15 x", "2.2 x"])
    plan = evolution.plan_evolution(1, 1, None, None, dataset_size=4)
    varied = []

    def vary(texts: list[str], labels: list[int]) -> list[str | None]:
        varied.extend(zip(texts, labels, strict=True))
        return [f"{t.split()[0]} variation" for t in texts]

    nxt, clean, noisy, log = evolution.evolve_once(population, private, [0, 0, 1, 1], plan, {0: 2, 1: 2}, embed, vary,
                                            torch.Generator().manual_seed(0), iteration=1)
    assert clean.tolist() == [2, 0, 0, 0, 0, 2, 0, 0] == noisy.tolist()  # no DP: the noisy histogram is exact
    assert nxt.labels.count(0) == nxt.labels.count(1) == 4  # kept 2 + 2 variations per label
    assert population.texts[0] in nxt.texts[:4] and population.texts[5] in nxt.texts[:4]
    assert all(label == population.labels[population.texts.index(text)] for text, label in varied)
    assert log["per_label"]["0"]["kept"] == 2 and log["varied"] == 4 and log["dropped_variations"] == 0
    assert not any(text in json.dumps(log) for text in population.texts)  # no text in the log

    last, _, _, _ = evolution.evolve_once(population, private, [0, 0, 1, 1], plan, {0: 1, 1: 1}, embed, None,
                                       torch.Generator().manual_seed(0), iteration=2)
    assert last.texts == [population.texts[0], population.texts[5]]  # the last iteration only selects
