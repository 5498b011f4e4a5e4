"""The audit's maths against independent computations, then the audit on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from dpnb import audit

# --------------------------------------------------------------------------- exposure


def brute_force_exposure(canary: float, references: list[float]) -> float:
    """log2(n + 1) - log2(rank), rank = 1 + references scoring at least as high, counted one by one."""
    rank = 1 + sum(1 for r in references if r >= canary)
    return math.log2(len(references) + 1) - math.log2(rank)


def test_exposure_matches_a_rank_counted_by_hand():
    rng = np.random.default_rng(0)
    references = rng.normal(size=200).tolist()
    canaries = [-5.0, 0.0, 0.3, 1.7, 10.0, references[7]]
    got = audit.exposure(canaries, references)
    want = [brute_force_exposure(c, references) for c in canaries]
    np.testing.assert_allclose(got, want)
    assert got[-2] == pytest.approx(math.log2(201))  # beats every reference: the largest exposure
    assert got[0] == pytest.approx(0.0)  # beaten by every reference


def test_exposure_of_unseen_canaries_averages_one_over_ln2_bits():
    rng = np.random.default_rng(1)
    references = rng.normal(size=999)
    unseen = rng.normal(size=4000)  # drawn like the references: rank uniform, exposure ~ -log2(U)
    assert np.mean(audit.exposure(unseen, references)) == pytest.approx(1 / math.log(2), abs=0.1)


def test_extrapolated_exposure_follows_the_fitted_tail():
    rng = np.random.default_rng(2)
    references = rng.normal(size=20000)
    want = -stats.norm.logsf(3.0) / math.log(2)  # about 9.4 bits
    assert audit.exposure_extrapolated([3.0], references)[0] == pytest.approx(want, abs=0.4)
    far = audit.exposure_extrapolated([8.0], references)[0]
    assert far > math.log2(20001)  # not capped by the number of references


# --------------------------------------------------------------------------- one-run bound


def perfect_guess_bound(r: int, confidence: float) -> float:
    """All r guesses right: the eps where P[Binomial(r, q) >= r] = q^r equals 1 - confidence, by root finding."""
    return optimize.brentq(lambda e: stats.binom.sf(r - 1, r, 1 / (1 + math.exp(-e))) - (1 - confidence), 0, 50)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_perfect_guesses_give_the_binomial_bound(r):
    got = audit.epsilon_lower_bound(r, r, r, confidence=0.95)
    assert got == pytest.approx(perfect_guess_bound(r, 0.95), abs=1e-3)


def test_bound_is_where_the_binomial_tail_crosses_the_significance():
    m, r, v = 500, 200, 150
    want = optimize.brentq(lambda e: stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-e))) - 0.05, 0, 20)
    assert audit.epsilon_lower_bound(m, r, v, confidence=0.95) == pytest.approx(want, abs=1e-3)


def test_p_value_with_delta_adds_the_papers_term():
    m, r, v, eps, delta = 1000, 100, 80, 1.0, 1e-5
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [stats.binom.pmf(x, r, q) for x in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max(sum(pmf[v - i: v]) / i for i in range(1, v + 1))  # P[v - i <= X < v] / i
    want = tail + 2 * m * delta * alpha
    assert audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(want, rel=1e-9)
    assert audit.one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-9)


def test_delta_can_only_lower_the_bound():
    pure = audit.epsilon_lower_bound(1000, 100, 95, 0.95, delta=0.0)
    bounds = [audit.epsilon_lower_bound(1000, 100, 95, 0.95, delta=d) for d in (1e-8, 1e-5, 1e-4)]
    assert pure > 0
    assert all(b <= pure + 1e-9 for b in bounds)
    assert bounds == sorted(bounds, reverse=True)
    assert audit.epsilon_lower_bound(1000, 100, 95, 0.95, delta=0.01) == 0.0  # 2 m delta = 20: nothing rejected


def test_random_guesses_rarely_give_a_positive_bound():
    """No signal: the bound is 0 except with probability at most 1 - confidence."""
    positives, bounds = 0, []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        result = audit.one_run_audit(rng.normal(size=200), rng.random(200) < 0.5, n_guesses=100, seed=seed)
        bounds.append(result["epsilon_lower_bound"])
        positives += result["epsilon_lower_bound"] > 0
    assert positives <= 9  # expected at most 3 of 60; 9 or more has probability about 0.1%
    assert np.median(bounds) == 0.0


def test_separated_scores_give_the_perfect_guess_bound():
    rng = np.random.default_rng(3)
    inserted = rng.random(400) < 0.5
    scores = np.where(inserted, 5.0, 0.0) + rng.normal(scale=0.1, size=400)
    result = audit.one_run_audit(scores, inserted, n_guesses=100)
    assert result["n_correct"] == 100
    assert result["epsilon_lower_bound"] == pytest.approx(perfect_guess_bound(100, 0.95), abs=1e-3)


def test_trying_several_guess_counts_pays_a_bonferroni_correction():
    rng = np.random.default_rng(4)
    inserted = rng.random(400) < 0.5
    scores = np.where(inserted, 5.0, 0.0) + rng.normal(scale=0.1, size=400)
    result = audit.one_run_audit(scores, inserted)  # every count of guess_counts(400)
    tries = len(audit.guess_counts(400))
    assert result["confidence_per_test"] == pytest.approx(1 - 0.05 / tries)
    best = max(audit.guess_counts(400))
    correct = [t["n_correct"] for t in result["trials"] if t["n_guesses"] == best][0]
    want = audit.epsilon_lower_bound(400, best, correct, 1 - 0.05 / tries)
    assert result["epsilon_lower_bound"] >= want - 1e-9


def test_guesses_take_the_extremes():
    scores = np.array([0.5, 3.0, -2.0, 1.0, 2.0, -1.0])
    guesses = audit.guess_membership(scores, 4)
    assert guesses.tolist() == [0, 1, -1, 0, 1, -1]


def test_group_privacy():
    assert audit.group_privacy(1.0, 1e-6, 1) == (1.0, 1e-6)
    eps, delta = audit.group_privacy(0.5, 1e-6, 3)
    assert eps == pytest.approx(1.5)
    assert delta == pytest.approx(3 * math.exp(1.0) * 1e-6)


# --------------------------------------------------------------------------- membership metrics


def brute_force_tpr_at_fpr(members, others, target):
    """Best TPR over every threshold t (predict member when score >= t) with FPR <= target."""
    best = 0.0
    for t in sorted(set(members) | set(others)) + [math.inf]:
        fpr = sum(s >= t for s in others) / len(others)
        if fpr <= target:
            best = max(best, sum(s >= t for s in members) / len(members))
    return best


def test_roc_summary_against_brute_force():
    rng = np.random.default_rng(5)
    members = (rng.normal(size=300) + 1.0).tolist()
    others = rng.normal(size=400).tolist()
    got = audit.roc_summary(members, others, fprs=(0.01, 0.1))
    pairs = sum((a > b) + 0.5 * (a == b) for a in members for b in others) / (300 * 400)
    assert got["auc"] == pytest.approx(pairs)
    for f in (0.01, 0.1):
        assert got["tpr_at_fpr"][str(f)] == pytest.approx(brute_force_tpr_at_fpr(members, others, f))


def test_roc_summary_extremes():
    separated = audit.roc_summary([5, 6, 7], [1, 2, 3])
    assert separated["auc"] == 1.0 and separated["tpr_at_fpr"]["0.001"] == 1.0
    rng = np.random.default_rng(6)
    same = audit.roc_summary(rng.normal(size=2000), rng.normal(size=2000))
    assert same["auc"] == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------- n-gram model


def test_ngram_probabilities_are_smoothed_counts():
    model = audit.NgramModel(order=2, vocab_size=10, smoothing=0.5).fit([[1, 2, 1, 2, 3]])
    # bigrams: (S,1) (1,2) (2,1) (1,2) (2,3); contexts: S once, 1 twice, 2 twice
    logp = model.token_log_probs([1, 2, 4])
    want = [math.log((1 + 0.5) / (1 + 5)), math.log((2 + 0.5) / (2 + 5)), math.log((0 + 0.5) / (2 + 5))]
    np.testing.assert_allclose(logp, want)
    assert model.span_log_prob([1, 2, 4], 1) == pytest.approx(np.mean(want[1:]))


def test_ngram_probabilities_sum_to_one():
    model = audit.NgramModel(order=3, vocab_size=6, smoothing=0.1).fit([[0, 1, 2, 3], [1, 2, 5, 5, 4]])
    for context in ([1, 2], [5, 5], [3, 3]):
        total = sum(math.exp(model.token_log_probs(context + [w])[-1]) for w in range(6))
        assert total == pytest.approx(1.0)
