"""The audit's maths against independent computations, then the audit on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats
from testkit import TINY_AUDIT, TINY_FINETUNE

from dpnb.auditing import attacks
from dpnb.auditing.canaries import exposure, exposure_extrapolated, with_canaries
from dpnb.data.prepared import to_dataset
from dpnb.errors import DpnbError
from dpnb.stages import audit
from dpnb.training import loop

# --------------------------------------------------------------------------- exposure


def brute_force_exposure(canary: float, references: list[float]) -> float:
    """log2(n + 1) - log2(rank), rank = 1 + references scoring at least as high, counted one by one."""
    rank = 1 + sum(1 for r in references if r >= canary)
    return math.log2(len(references) + 1) - math.log2(rank)


def test_exposure_matches_a_rank_counted_by_hand():
    rng = np.random.default_rng(0)
    references = rng.normal(size=200).tolist()
    canaries = [-5.0, 0.0, 0.3, 1.7, 10.0, references[7]]
    got = exposure(canaries, references)
    want = [brute_force_exposure(c, references) for c in canaries]
    np.testing.assert_allclose(got, want)
    assert got[-2] == pytest.approx(math.log2(201))  # beats every reference: the largest exposure
    assert got[0] == pytest.approx(0.0)  # beaten by every reference


def test_exposure_of_unseen_canaries_averages_one_over_ln2_bits():
    rng = np.random.default_rng(1)
    references = rng.normal(size=999)
    unseen = rng.normal(size=4000)  # drawn like the references: rank uniform, exposure ~ -log2(U)
    assert np.mean(exposure(unseen, references)) == pytest.approx(1 / math.log(2), abs=0.1)


def test_extrapolated_exposure_follows_the_fitted_tail():
    rng = np.random.default_rng(2)
    references = rng.normal(size=20000)
    want = -stats.norm.logsf(3.0) / math.log(2)  # about 9.4 bits
    assert exposure_extrapolated([3.0], references)[0] == pytest.approx(want, abs=0.4)
    far = exposure_extrapolated([8.0], references)[0]
    assert far > math.log2(20001)  # not capped by the number of references


# --------------------------------------------------------------------------- one-run bound


def perfect_guess_bound(r: int, confidence: float) -> float:
    """All r guesses right: the eps where P[Binomial(r, q) >= r] = q^r equals 1 - confidence, by root finding."""
    return optimize.brentq(lambda e: stats.binom.sf(r - 1, r, 1 / (1 + math.exp(-e))) - (1 - confidence), 0, 50)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_perfect_guesses_give_the_binomial_bound(r):
    got = attacks.epsilon_lower_bound(r, r, r, confidence=0.95)
    assert got == pytest.approx(perfect_guess_bound(r, 0.95), abs=1e-3)


def test_bound_is_where_the_binomial_tail_crosses_the_significance():
    m, r, v = 500, 200, 150
    want = optimize.brentq(lambda e: stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-e))) - 0.05, 0, 20)
    assert attacks.epsilon_lower_bound(m, r, v, confidence=0.95) == pytest.approx(want, abs=1e-3)


def test_p_value_with_delta_adds_the_papers_term():
    m, r, v, eps, delta = 1000, 100, 80, 1.0, 1e-5
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [stats.binom.pmf(x, r, q) for x in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max(sum(pmf[v - i: v]) / i for i in range(1, v + 1))  # P[v - i <= X < v] / i
    want = tail + 2 * m * delta * alpha
    assert attacks.one_run_p_value(m, r, v, eps, delta) == pytest.approx(want, rel=1e-9)
    assert attacks.one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-9)


def test_delta_can_only_lower_the_bound():
    pure = attacks.epsilon_lower_bound(1000, 100, 95, 0.95, delta=0.0)
    bounds = [attacks.epsilon_lower_bound(1000, 100, 95, 0.95, delta=d) for d in (1e-8, 1e-5, 1e-4)]
    assert pure > 0
    assert all(b <= pure + 1e-9 for b in bounds)
    assert bounds == sorted(bounds, reverse=True)
    assert attacks.epsilon_lower_bound(1000, 100, 95, 0.95, delta=0.01) == 0.0  # 2 m delta = 20: nothing rejected


def test_random_guesses_rarely_give_a_positive_bound():
    """No signal: the bound is 0 except with probability at most 1 - confidence."""
    positives, bounds = 0, []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        result = attacks.one_run_audit(rng.normal(size=200), rng.random(200) < 0.5, n_guesses=100, seed=seed)
        bounds.append(result["epsilon_lower_bound"])
        positives += result["epsilon_lower_bound"] > 0
    assert positives <= 9  # expected at most 3 of 60; 9 or more has probability about 0.1%
    assert np.median(bounds) == 0.0


def test_separated_scores_give_the_perfect_guess_bound():
    rng = np.random.default_rng(3)
    inserted = rng.random(400) < 0.5
    scores = np.where(inserted, 5.0, 0.0) + rng.normal(scale=0.1, size=400)
    result = attacks.one_run_audit(scores, inserted, n_guesses=100)
    assert result["n_correct"] == 100
    assert result["epsilon_lower_bound"] == pytest.approx(perfect_guess_bound(100, 0.95), abs=1e-3)


def test_trying_several_guess_counts_pays_a_bonferroni_correction():
    rng = np.random.default_rng(4)
    inserted = rng.random(400) < 0.5
    scores = np.where(inserted, 5.0, 0.0) + rng.normal(scale=0.1, size=400)
    result = attacks.one_run_audit(scores, inserted)  # every count of guess_counts(400)
    tries = len(attacks.guess_counts(400))
    assert result["confidence_per_test"] == pytest.approx(1 - 0.05 / tries)
    best = max(attacks.guess_counts(400))
    correct = [t["n_correct"] for t in result["trials"] if t["n_guesses"] == best][0]
    want = attacks.epsilon_lower_bound(400, best, correct, 1 - 0.05 / tries)
    assert result["epsilon_lower_bound"] >= want - 1e-9


def test_guesses_take_the_extremes():
    scores = np.array([0.5, 3.0, -2.0, 1.0, 2.0, -1.0])
    guesses = attacks.guess_membership(scores, 4)
    assert guesses.tolist() == [0, 1, -1, 0, 1, -1]


def test_tie_breaks_come_from_a_stream_apart_from_the_coins():
    """Every score tied: the guesses are the tie-break order alone. It must come from a stream of its own (a
    spawned child of the seed's SeedSequence), not from default_rng(seed), the stream plan_audit draws the
    canaries and their coins from."""
    m, seed = 200, 5

    def guesses_ranked_by(draws: np.ndarray) -> np.ndarray:
        rank = np.argsort(np.argsort(draws, kind="stable"), kind="stable")
        return np.where(rank < m - m // 2, -1, 1)

    guesses = attacks.guess_membership(np.zeros(m), m, seed=seed)
    assert not np.array_equal(guesses, guesses_ranked_by(np.random.default_rng(seed).random(m)))
    child = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0]).random(m)
    assert np.array_equal(guesses, guesses_ranked_by(child))
    assert np.array_equal(guesses, attacks.guess_membership(np.zeros(m), m, seed=seed))  # still seeded


def test_group_privacy():
    assert attacks.group_privacy(1.0, 1e-6, 1) == (1.0, 1e-6)
    eps, delta = attacks.group_privacy(0.5, 1e-6, 3)
    assert eps == pytest.approx(1.5)
    assert delta == pytest.approx(3 * math.exp(1.0) * 1e-6)


def test_canaries_are_inserted_once_by_default():
    from dpnb.config import AuditConfig

    assert AuditConfig().canary_repeats == 1  # the per-record claim, not a group's


# --------------------------------------------------------------------------- the ceiling


def closed_form_ceiling(m: int, confidence: float = 0.95) -> float:
    """All m guesses right, delta 0, confidence split over the counts tried: logit(s^(1/m)), s = (1 - c) / J."""
    q = ((1 - confidence) / len(attacks.guess_counts(m))) ** (1 / m)
    return max(0.0, math.log(q / (1 - q)))


@pytest.mark.parametrize(("m", "want"), [(64, 2.65), (1000, 5.43)])
def test_ceiling_of_a_perfect_attacker(m, want):
    got = attacks.audit_ceiling(m, confidence=0.95)
    assert got == pytest.approx(want, abs=0.005)
    assert got == pytest.approx(closed_form_ceiling(m), abs=1e-3)
    assert got == pytest.approx(perfect_guess_bound(m, 1 - 0.05 / len(attacks.guess_counts(m))), abs=1e-3)
    assert attacks.audit_ceiling(m, n_guesses=m) == pytest.approx(perfect_guess_bound(m, 0.95), abs=1e-3)


def test_ceiling_grows_with_the_canaries_and_falls_with_delta():
    counts = [*range(2, 60), 64, 100, 200, 500, 1000, 2000]
    ceilings = [attacks.audit_ceiling(m) for m in counts]
    assert ceilings == sorted(ceilings)
    assert ceilings[0] == 0.0  # 2 canaries: even 2 right guesses have chance 1/4 at eps = 0
    pure = attacks.audit_ceiling(256)
    with_delta = [attacks.audit_ceiling(256, delta=d) for d in (1e-6, 1e-4, 1e-3, 0.1, 1.0)]
    assert all(c <= pure + 1e-9 for c in with_delta)
    assert with_delta == sorted(with_delta, reverse=True)
    assert with_delta[-1] == 0.0  # delta = 1 promises nothing: no outcome rejects anything


@pytest.mark.parametrize("epsilon", [1.0, 2.65, 4.0, 8.0])
def test_canaries_to_certify_inverts_the_ceiling(epsilon):
    n = attacks.canaries_to_certify(epsilon)
    assert attacks.audit_ceiling(n) >= epsilon > attacks.audit_ceiling(n - 1)
    # m >= ln(1/s) / ln(1 + e^-eps) with s = 0.05 / 4 (the 4 counts of guess_counts), up to the bisection's 1e-4
    assert n == pytest.approx(math.log(80) / math.log1p(math.exp(-epsilon)), abs=3)


def test_certifying_epsilon_8_needs_about_13000_canaries():
    assert 12_500 < attacks.canaries_to_certify(8.0) < 13_500
    assert attacks.canaries_to_certify(8.0, max_canaries=10_000) is None


def test_a_positive_delta_needs_more_canaries_or_cannot_certify_at_all():
    pure = attacks.canaries_to_certify(2.0)
    with_delta = attacks.canaries_to_certify(2.0, delta=1e-4)
    assert with_delta >= pure
    assert attacks.audit_ceiling(with_delta, delta=1e-4) >= 2.0 > attacks.audit_ceiling(with_delta - 1, delta=1e-4)
    # 2 m delta grows with m: at delta 1e-3 the ceiling peaks near 2.4 (m ~ 128) and falls after
    assert attacks.canaries_to_certify(3.0, delta=1e-3) is None


def test_no_outcome_beats_the_ceiling():
    rng = np.random.default_rng(7)
    for m, delta in ((40, 0.0), (64, 1e-5), (100, 1e-3)):
        inserted = rng.random(m) < 0.5
        for signal in (0.0, 1.0, 3.0, 100.0):
            result = attacks.one_run_audit(np.where(inserted, signal, 0.0) + rng.normal(size=m), inserted,
                                           delta=delta)
            assert result["epsilon_lower_bound"] <= result["ceiling"] + 1e-12
        balanced = np.arange(m) % 2 == 0  # half inserted, perfectly separated: every guess right at every count
        result = attacks.one_run_audit(balanced.astype(float), balanced, delta=delta)
        assert result["epsilon_lower_bound"] == pytest.approx(result["ceiling"])


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
    got = attacks.roc_summary(members, others, fprs=(0.01, 0.1))
    pairs = sum((a > b) + 0.5 * (a == b) for a in members for b in others) / (300 * 400)
    assert got["auc"] == pytest.approx(pairs)
    for f in (0.01, 0.1):
        assert got["tpr_at_fpr"][str(f)] == pytest.approx(brute_force_tpr_at_fpr(members, others, f))


def test_roc_summary_extremes():
    separated = attacks.roc_summary([5, 6, 7], [1, 2, 3])
    assert separated["auc"] == 1.0 and separated["tpr_at_fpr"]["0.001"] == 1.0
    rng = np.random.default_rng(6)
    same = attacks.roc_summary(rng.normal(size=2000), rng.normal(size=2000))
    assert same["auc"] == pytest.approx(0.5, abs=0.03)


# --------------------------------------------------------------------------- the ROC figure


def test_roc_line_joins_tied_scores_by_the_straight_line_their_auc_counts():
    tied = attacks.roc_summary([0.0] * 9, [0.0] * 11)  # every score alike: sklearn gives (0, 0) and (1, 1)
    fpr, tpr = audit.roc_line(tied["curve"])
    assert np.interp([0.01, 0.3, 0.9], fpr, tpr) == pytest.approx([0.01, 0.3, 0.9])  # chance, not 0 until FPR 1
    assert audit.largest_tie(tied) == 1.0
    separated = attacks.roc_summary([5, 6, 7], [1, 2, 3])
    assert audit.largest_tie(separated) == 0.0
    # two of three members tied with one of three non-members: 3 of 6 records share a score
    assert audit.largest_tie(attacks.roc_summary([9, 5, 5], [5, 1, 2])) == pytest.approx(0.5)


def roc_details(claim_epsilon: float, repeats: int) -> dict:
    """The two twins' details as the stage saves them, with scores chosen by the test (synthetic ones all tied)."""
    rng = np.random.default_rng(3)
    claim = audit.claimed_guarantee({"dp": True, "epsilon": claim_epsilon, "delta": 1e-5}, repeats)
    twins = {}
    for name, shift, privacy in (("dp", 0.2, {"epsilon": claim_epsilon}), ("nodp", 3.0, {"epsilon": None})):
        twins[name] = {
            "privacy": privacy, "claim": claim if name == "dp" else None,
            "canaries": {"roc": attacks.roc_summary(rng.normal(size=40) + shift, rng.normal(size=40))},
            "synthetic": {"roc": attacks.roc_summary([-4.0] * 40, [-4.0] * 40)},
            "mia": {"loss": attacks.roc_summary(rng.normal(size=64) + shift, rng.normal(size=64))},
        }
    return twins


def test_roc_figure_draws_the_region_the_dp_twins_claim_allows_and_names_tied_scores():
    figure = audit.plot_roc_curves(roc_details(1.0, repeats=1))
    canaries, synthetic, real = figure.axes
    label = "allowed by dp's claim (eps 1, delta 1e-05)"
    assert label in canaries.get_legend_handles_labels()[1]
    assert "allowed by dp's claim per record (eps 1, delta 1e-05)" in real.get_legend_handles_labels()[1]
    edge = next(line for line in canaries.lines if line.get_color() == "tab:green")
    at = 0.01  # TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta, at FPR 0.01
    bound = min(1.0, math.e * at + 1e-5, 1 - (1 - 1e-5 - at) / math.e)
    assert np.interp(at, edge.get_xdata(), edge.get_ydata()) == pytest.approx(bound, rel=1e-3)
    notes = " ".join(text.get_text() for text in synthetic.texts)
    assert "dp: all 80 scores tied, a coin toss" in notes and "nodp: all 80 scores tied" in notes
    dp = next(line for line in synthetic.lines if line.get_label() == "dp (eps 1)")
    assert dp.get_drawstyle() == "default"  # straight lines between the ROC points, not steps
    # canaries inserted 4 times: the group claim's delta reaches 1, and the figure says it allows every curve
    grouped = audit.plot_roc_curves(roc_details(8.0, repeats=4))
    assert "dp's claim for 4 copies has delta >= 1: it allows any curve" in grouped.axes[0].texts[0].get_text()
    assert not [lbl for lbl in grouped.axes[0].get_legend_handles_labels()[1] if lbl.startswith("allowed")]


# --------------------------------------------------------------------------- n-gram model


def test_ngram_probabilities_are_smoothed_counts():
    model = attacks.NgramModel(order=2, vocab_size=10, smoothing=0.5).fit([[1, 2, 1, 2, 3]])
    # bigrams: (S,1) (1,2) (2,1) (1,2) (2,3); contexts: S once, 1 twice, 2 twice
    logp = model.token_log_probs([1, 2, 4])
    want = [math.log((1 + 0.5) / (1 + 5)), math.log((2 + 0.5) / (2 + 5)), math.log((0 + 0.5) / (2 + 5))]
    np.testing.assert_allclose(logp, want)
    assert model.span_log_prob([1, 2, 4], 1) == pytest.approx(np.mean(want[1:]))


def test_ngram_probabilities_sum_to_one():
    model = attacks.NgramModel(order=3, vocab_size=6, smoothing=0.1).fit([[0, 1, 2, 3], [1, 2, 5, 5, 4]])
    for context in ([1, 2], [5, 5], [3, 3]):
        total = sum(math.exp(model.token_log_probs(context + [w])[-1]) for w in range(6))
        assert total == pytest.approx(1.0)


def test_a_lower_bound_above_the_claim_stops_the_audit(tmp_path):
    one_run = attacks.one_run_audit(np.r_[np.ones(50), np.zeros(50)], np.r_[np.ones(50), np.zeros(50)] > 0)
    result = {"claim": {"epsilon": one_run["epsilon_lower_bound"] / 2, "delta": 1e-5},
              "canaries": {"one_run": one_run}}
    with pytest.raises(DpnbError, match="privacy audit failed"):
        audit.check_lower_bound(result, tmp_path / "audit.json")
    assert audit.judge(result["claim"], one_run, 1)["safeguard_can_fire"]
    result["claim"]["epsilon"] = one_run["epsilon_lower_bound"] * 2
    audit.check_lower_bound(result, tmp_path / "audit.json")  # below the claim: fine
    audit.check_lower_bound({"claim": None, "canaries": {"one_run": one_run}}, tmp_path / "audit.json")


def perfect_one_run(m: int, delta: float) -> dict:
    inserted = np.arange(m) % 2 == 0
    return attacks.one_run_audit(inserted.astype(float), inserted, delta=delta)


def record_claim(epsilon: float, delta: float, k: int = 1) -> dict:
    group_epsilon, group_delta = attacks.group_privacy(epsilon, delta, k)
    return {"epsilon": group_epsilon, "delta": group_delta, "group_size": k, "record_epsilon": epsilon,
            "record_delta": delta}


def test_verdict_a_claim_above_the_ceiling_cannot_be_tested():
    one_run = perfect_one_run(64, 1e-5)  # ceiling about 2.64
    verdict = audit.judge(record_claim(8.0, 1e-5), one_run, 1)
    assert verdict["status"] == "out_of_reach" and not verdict["safeguard_can_fire"]
    assert verdict["verdict"].startswith("ceiling below the claim: this audit cannot test the claim")
    assert f"{one_run['ceiling']:.3f}" in verdict["verdict"]
    assert verdict["canaries_to_certify"] == attacks.canaries_to_certify(8.0)
    assert f"{verdict['canaries_to_certify']:,} canaries" in verdict["verdict"]


def test_verdict_a_claim_within_reach_says_whether_the_bound_exceeded_it():
    one_run = perfect_one_run(64, 1e-5)
    below = audit.judge(record_claim(1.0, 1e-5), one_run, 1)
    assert below["status"] == "within_reach" and below["safeguard_can_fire"]
    assert "exceeded it: the claim is wrong" in below["verdict"]  # a perfect attacker beats epsilon 1
    above = audit.judge(record_claim(2.64, 1e-5), attacks.one_run_audit(np.zeros(64), np.arange(64) % 2 == 0,
                                                                        delta=1e-5), 1)
    assert above["status"] == "within_reach" and "did not exceed it" in above["verdict"]


def test_verdict_repeated_canaries_are_a_vacuous_group_claim():
    # the committed demo's case: epsilon 8 per record, 4 copies: (32, 4 e^24 delta) -> delta clamped to 1
    claim = record_claim(8.0, 7.8e-4, 4)
    assert claim["delta"] == 1.0
    one_run = perfect_one_run(64, claim["delta"])
    assert one_run["ceiling"] == 0.0 and one_run["epsilon_lower_bound"] == 0.0
    verdict = audit.judge(claim, one_run, 4)
    assert verdict["status"] == "vacuous" and not verdict["safeguard_can_fire"]
    assert "group claim" in verdict["verdict"] and "canary_repeats = 1" in verdict["verdict"]
    # a group claim with a small delta but far above the ceiling: vacuous too
    far = record_claim(2.0, 1e-9, 4)
    assert audit.judge(far, perfect_one_run(64, far["delta"]), 4)["status"] == "vacuous"
    near = record_claim(0.25, 1e-9, 4)  # group epsilon 1, below the ceiling: testable
    assert audit.judge(near, perfect_one_run(64, near["delta"]), 4)["status"] == "within_reach"


def test_verdict_without_a_claim_compares_nothing():
    verdict = audit.judge(None, perfect_one_run(64, 0.0), 1)
    assert verdict["status"] == "no_claim" and verdict["claim_epsilon"] is None
    assert verdict["audit_delta"] == 0.0 and not verdict["safeguard_can_fire"]
    assert "compared with nothing" in verdict["verdict"]


# --------------------------------------------------------------------------- on tiny models

@pytest.fixture(scope="module")
def tiny_prepared(toy_data_dir):
    """16 training and 40 held-out toy reviews, tokenised for tiny-llama (label | review, 16 tokens)."""
    from dpnb.config import PrepareConfig
    from dpnb.stages import prepare

    prepared = prepare.prepare_data(PrepareConfig(source=str(toy_data_dir), model="tiny-llama", n_train=16, n_test=40,
                                               max_length=16))
    return to_dataset(prepared.train), to_dataset(prepared.test), prepared.manifest


def test_canaries_are_shaped_like_training_records(tiny_prepared):
    from dpnb.config import AuditConfig
    from dpnb.data.prompts import PromptFormat
    from dpnb.models import load_tokenizer

    train, test, manifest = tiny_prepared
    tokenizer = load_tokenizer("tiny-llama")
    fmt = PromptFormat.from_dict(manifest["prompt"])
    cfg = AuditConfig(**TINY_AUDIT)
    plan = audit.plan_audit(train, test, manifest["label_names"], tokenizer, fmt, 16, cfg)
    assert len(plan.canaries) == 20 and len(plan.references) == 40
    for canary in plan.canaries + plan.references:
        ids = canary["input_ids"]
        assert ids == fmt.encode(canary["label_name"], canary["text"], tokenizer, 16)[0]
        assert ids[: canary["prompt_length"]] == fmt.prompt_ids(canary["label_name"], tokenizer)
        assert ids[canary["suffix_start"]: canary["suffix_end"]] == canary["suffix_ids"]
        assert canary["suffix_end"] == len(ids) - 1 and ids[-1] == tokenizer.eos_token_id
        assert canary["text"].startswith(canary["prefix"]) and len(canary["suffix"].split()) == 3
    assert plan.prefix_reuse  # 32 held-out openings for 60 canaries and references
    openings = {c["test_index"] for c in plan.canaries + plan.references}
    assert not openings & set(plan.non_members)  # a non-member never lends its opening to a canary
    assert len(plan.members) == len(plan.non_members) == 8
    augmented = with_canaries(train, plan.canaries, plan.inserted, repeats=3)
    assert len(augmented) == len(train) + 3 * int(plan.inserted.sum())
    assert augmented.features == train.features


def test_flipping_a_coin_leaves_the_twins_mechanism_unchanged(tiny_prepared, tmp_path, monkeypatch):
    """The one-run theorem assumes one mechanism whatever the coins: run_audit with one coin flipped plans the
    DP twin with the same q, steps, sigma, delta and divisor E; only the records it trains on differ. (Each
    run stops once planned: no twin is trained.)"""
    import dataclasses

    from dpnb.config import AuditConfig, FinetuneConfig
    from dpnb.data.prompts import PromptFormat
    from dpnb.models import load_tokenizer

    train, test, manifest = tiny_prepared
    cfg = AuditConfig(**TINY_AUDIT)
    drawn = audit.plan_audit(train, test, manifest["label_names"], load_tokenizer("tiny-llama"),
                             PromptFormat.from_dict(manifest["prompt"]), 16, cfg)
    plans, plan_training = [], loop.plan_training

    class Planned(Exception):
        pass

    def planned(*args, **kwargs):
        plans.append(plan_training(*args, **kwargs))
        raise Planned

    monkeypatch.setattr(loop, "plan_training", planned)
    for flip in (False, True):
        coins = drawn.inserted ^ (np.arange(cfg.n_canaries) == 0) if flip else drawn.inserted
        plan = dataclasses.replace(drawn, canaries=[{**c, "inserted": bool(k)} for c, k in zip(drawn.canaries, coins,
                                                                                               strict=True)])
        monkeypatch.setattr(audit, "plan_audit", lambda *args, plan=plan, **kwargs: plan)
        with pytest.raises(Planned):
            audit.run_audit("tiny-llama", train, test, manifest, FinetuneConfig(**TINY_FINETUNE), cfg,
                            tmp_path / str(flip))
    kept, flipped = plans
    assert abs(kept.dataset_size - flipped.dataset_size) == cfg.canary_repeats  # the records differ ...
    mechanism = [(p.sample_rate, p.steps, p.noise_multiplier, p.delta) for p in plans]
    assert mechanism[0] == mechanism[1]  # ... the mechanism does not
    assert kept.divisor == flipped.divisor == int(kept.plan_size * kept.sample_rate)
    assert kept.plan_size == flipped.plan_size == len(train) + cfg.canary_repeats * cfg.n_canaries
    assert kept.dp and kept.delta < 1 / kept.plan_size


def test_synthetic_text_that_echoes_canaries_gives_them_away(tiny_prepared):
    """Released text containing the inserted canaries (a generator that regurgitates): AUC 1."""
    from dpnb.config import AuditConfig
    from dpnb.data.prompts import PromptFormat
    from dpnb.models import load_tokenizer

    train, test, manifest = tiny_prepared
    tokenizer = load_tokenizer("tiny-llama")
    plan = audit.plan_audit(train, test, manifest["label_names"], tokenizer,
                            PromptFormat.from_dict(manifest["prompt"]), 16, AuditConfig(**TINY_AUDIT))
    released = list(train["text"]) + [c["text"] for c in plan.canaries if c["inserted"]]
    echoed = attacks.synthetic_attack(released, plan.canaries, plan.inserted, tokenizer, order=3, smoothing=0.01)
    assert echoed["roc"]["auc"] == 1.0
    silent = attacks.synthetic_attack(list(train["text"]), plan.canaries, plan.inserted, tokenizer, order=3,
                                    smoothing=0.01)
    assert silent["roc"]["auc"] < 1.0


def test_batched_losses_match_one_sequence_at_a_time():
    import torch

    from dpnb.models import load_causal_lm

    model = load_causal_lm("tiny-llama")
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 49152, size=n).tolist() for n in (5, 9, 3, 12)]
    batched = attacks.token_losses(model, sequences, batch_size=3)
    for ids, got in zip(sequences, batched, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        want = [-torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(1, len(ids))]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    spans = attacks.span_losses(model, sequences, [(1, 5), (3, 9), (2, 3), (6, 12)], batch_size=2)
    assert spans[1] == pytest.approx(np.mean(batched[1][2:8]), rel=1e-5)


# --------------------------------------------------------------------------- a leaky model must be caught

LEAKY_CANARIES = 64  # ceiling at delta 0: 2.65
LEAKY_REPEATS = 8


def chance_threshold(m: int, confidence: float = 0.95, false_alarm: float = 1e-3) -> float:
    """A bound that a chance-level attacker exceeds with probability at most `false_alarm`.

    When the scores carry no information about the coins (fair, independent), the guesses are fixed
    before the coins are looked at, so the number right among r guesses is exactly Binomial(r, 1/2).
    For each of the J counts r of `guess_counts(m)`, v_r is the smallest count with
    P[Binomial(r, 1/2) >= v_r] <= false_alarm / J. The bound is non-decreasing in the number right, so
    a bound above t = max_r epsilon_lower_bound(m, r, v_r - 1) needs v_r or more right for some r:
    by the union bound, probability at most J * false_alarm / J = false_alarm.
    """
    counts = attacks.guess_counts(m)
    per_test = attacks.per_test_confidence(confidence, len(counts))
    threshold = 0.0
    for r in counts:
        v = int(stats.binom.isf(false_alarm / len(counts), r, 0.5)) + 1  # P[X >= v] <= false_alarm / J
        assert stats.binom.sf(v - 1, r, 0.5) <= false_alarm / len(counts)
        threshold = max(threshold, attacks.epsilon_lower_bound(m, r, min(v - 1, r), per_test))
    return threshold


def test_the_chance_threshold_is_well_inside_the_ceiling():
    threshold = chance_threshold(LEAKY_CANARIES)
    assert 0 < threshold < 0.25 * attacks.audit_ceiling(LEAKY_CANARIES)  # about 0.45 of 2.65: room to tell


def test_a_chance_level_attacker_stays_below_the_threshold():
    """Random scores (no information about the coins): below the threshold, for every seed tried."""
    threshold = chance_threshold(LEAKY_CANARIES)
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        inserted = rng.random(LEAKY_CANARIES) < 0.5
        result = attacks.one_run_audit(rng.normal(size=LEAKY_CANARIES), inserted, seed=seed)
        bounds.append(result["epsilon_lower_bound"])
    assert max(bounds) <= threshold  # each exceeds it with probability <= 1e-3 (all 20 pass with prob >= 98%)


@pytest.mark.slow
def test_a_model_that_memorised_its_canaries_is_caught(tiny_prepared, tmp_path):
    """No noise and canaries repeated 8 times: the non-DP twin memorises them, and the audit must say so.

    The bound (at delta 0: the twin claims nothing) must exceed what a chance-level attacker reaches
    with probability <= 1e-3 (`chance_threshold`, about 0.45 for 64 canaries; the ceiling is 2.65).
    """
    from dpnb.config import AuditConfig, FinetuneConfig
    from dpnb.data.prompts import PromptFormat
    from dpnb.models import load_base_model, load_tokenizer, load_trained

    train, test, manifest = tiny_prepared
    tokenizer = load_tokenizer("tiny-llama")
    cfg = AuditConfig(**{**TINY_AUDIT, "n_canaries": LEAKY_CANARIES, "canary_repeats": LEAKY_REPEATS,
                         "n_reference": 8, "n_mia": 4, "batch_size": 64})
    plan = audit.plan_audit(train, test, manifest["label_names"], tokenizer,
                            PromptFormat.from_dict(manifest["prompt"]), 16, cfg)
    augmented = with_canaries(train, plan.canaries, plan.inserted, LEAKY_REPEATS)
    # 6 steps of 64 records: each inserted canary is seen about 6 * 64 * 8 / (16 + 8 * 32), 11 times
    leaky = FinetuneConfig(**{**TINY_FINETUNE, "dp": False, "max_steps": 6, "logical_batch_size": 64,
                              "physical_batch_size": 64})
    privacy = audit.train_twin("tiny-llama", augmented, "leaky", leaky, tmp_path / "nodp", tokenizer, verbose=False)
    groups = audit.plan_sequences(plan, train, test)
    model, _ = load_trained(tmp_path / "nodp" / "model", device="cpu")
    losses = attacks.model_losses(model, groups, batch_size=64, device="cpu")
    base_model = load_base_model("tiny-llama", mode=leaky.mode, dtype=leaky.dtype, device="cpu", seed=leaky.seed)
    base = attacks.model_losses(base_model, groups, batch_size=64, device="cpu")
    result = audit.audit_twin("nodp", tokenizer, privacy, losses, base, plan, cfg=cfg, synthetic_texts=None)

    one_run, judgement = result["canaries"]["one_run"], result["judgement"]
    assert result["claim"] is None and result["audit_delta"] == 0.0 and one_run["delta"] == 0.0
    assert judgement["status"] == "no_claim" and judgement["ceiling"] == pytest.approx(2.65, abs=0.005)
    threshold = chance_threshold(LEAKY_CANARIES)
    assert one_run["epsilon_lower_bound"] > threshold
    assert one_run["epsilon_lower_bound"] <= judgement["ceiling"]


@pytest.mark.slow
def test_audit_finds_memorised_canaries_without_dp_and_none_with_dp(tiny_prepared, tmp_path):
    """Canaries inserted once, the per-record claim: the non-DP twin memorises them, the DP twin (eps 0.5) does not.

    With 20 canaries and delta 1e-5 the ceiling (about 1.4) is above the claim, so the DP twin's
    bound could have exceeded it: the `bound <= claim` check below can fail.
    """
    from dpnb.config import AuditConfig, FinetuneConfig

    train, test, manifest = tiny_prepared
    cfg = AuditConfig(**{**TINY_AUDIT, "canary_repeats": 1})
    # about 26 records: batches of half of them, 10 epochs (each inserted canary is seen about 10 times)
    finetune_cfg = FinetuneConfig(**{**TINY_FINETUNE, "delta": 1e-5, "epochs": 10, "logical_batch_size": 16,
                                     "physical_batch_size": 16})
    summary = audit.run_audit("tiny-llama", train, test, manifest, finetune_cfg, cfg, tmp_path)
    dp, nodp = summary["twins"]["dp"], summary["twins"]["nodp"]
    top = math.log2(cfg.n_reference + 1)

    assert nodp["privacy"]["epsilon"] is None
    assert nodp["canaries"]["exposure"]["inserted"]["mean"] > 0.9 * top  # near the largest measurable
    assert nodp["canaries"]["roc"]["auc"] == 1.0
    # the non-DP twin is judged against its own claim (none): its bound at delta 0, not the DP twin's delta
    assert nodp["claim"] is None and nodp["canaries"]["one_run"]["delta"] == 0.0
    assert nodp["judgement"]["status"] == "no_claim" and nodp["judgement"]["claim_epsilon"] is None
    assert nodp["canaries"]["one_run"]["epsilon_lower_bound"] > 0

    record_epsilon = dp["privacy"]["epsilon"]
    assert record_epsilon == pytest.approx(0.5, rel=0.05)
    assert dp["privacy"]["dataset_size"] == summary["n_train_with_canaries"]  # the records trained on
    # the mechanism, planned as if every canary were inserted: q, delta and E from that N, whatever the coins
    planned = summary["n_train_planned"]
    assert planned == len(train) + cfg.canary_repeats * cfg.n_canaries == dp["privacy"]["planned_dataset_size"]
    assert dp["privacy"]["sample_rate"] == 1 / math.ceil(planned / 16)
    assert dp["privacy"]["divisor"] == int(planned * dp["privacy"]["sample_rate"])
    assert dp["canaries"]["exposure"]["inserted"]["mean"] < 0.5 * top
    assert dp["canaries"]["roc"]["auc"] < 0.9
    judgement = dp["judgement"]
    assert dp["claim"]["group_size"] == 1 and dp["claim"]["epsilon"] == pytest.approx(record_epsilon)
    assert judgement["claim_delta"] == dp["canaries"]["one_run"]["delta"] == pytest.approx(1e-5)
    assert judgement["status"] == "within_reach" and judgement["safeguard_can_fire"]
    assert judgement["ceiling"] == pytest.approx(attacks.audit_ceiling(20, delta=1e-5)) and judgement["ceiling"] > 1.3
    assert dp["canaries"]["one_run"]["epsilon_lower_bound"] <= dp["claim"]["epsilon"]
    assert dp["canaries"]["one_run_pure"]["epsilon_lower_bound"] < record_epsilon

    details = json.loads((tmp_path / "nodp" / "audit.json").read_text())
    assert len(details["canaries"]["per_canary"]["exposure"]) == cfg.n_canaries
    saved = json.loads((tmp_path / "canaries.json").read_text())
    n_inserted = sum(c["inserted"] for c in saved["canaries"])
    # had DP-SGD done nothing (the DP twin as leaky as the non-DP one), the safeguard would have fired
    as_leaky = attacks.one_run_audit(details["canary_scores"], [c["inserted"] for c in saved["canaries"]],
                                     confidence=cfg.confidence, delta=dp["claim"]["delta"], seed=cfg.seed)
    with pytest.raises(DpnbError, match="privacy audit failed"):
        audit.check_lower_bound({"claim": dp["claim"], "canaries": {"one_run": as_leaky}}, tmp_path / "x.json")
    assert n_inserted == summary["canaries"]["n_inserted"]
    assert summary["n_train_with_canaries"] == len(train) + cfg.canary_repeats * n_inserted
