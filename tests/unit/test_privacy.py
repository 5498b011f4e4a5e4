"""Privacy accounting: sample rates as Opacus samples, calibration, accounting, checkpoints, records.

Every epsilon here comes from Opacus (dpnb.privacy); the tests check it against something that shares
no code with Opacus: Google's dp_accounting (`dpnb.privacy.independent_accounting`: PLD for PRV, RDP for RDP,
tolerance max(2%, 0.02) as `cross_check` uses) or the exact epsilon of the Gaussian mechanism without
subsampling (Balle & Wang 2018), so that a wrong step count or sampling rate would fail them.
"""

from __future__ import annotations

import functools
import json
import math
from itertools import pairwise

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from scipy.optimize import brentq
from scipy.stats import norm
from torch.utils.data import DataLoader, TensorDataset

from dpnb.errors import DpnbError
from dpnb.privacy import accounting, guarantee
from dpnb.privacy.independent_accounting import DEFAULT_SLACK, MIN_SLACK, cross_check, google_epsilons

DELTA = 1e-5
KIND = {"prv": "pld", "rdp": "rdp"}  # the Google number each Opacus accountant is compared with


@functools.cache
def google_both(sigma: float, rate: float, steps: int, delta: float) -> dict:
    return google_epsilons(sigma, rate, steps, delta)


def google(sigma: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    return google_both(sigma, rate, steps, delta)[KIND[accountant]]


def assert_agrees_with_google(epsilon: float, sigma: float, rate: float, steps: int, delta: float,
                              accountant: str) -> None:
    reference = google(sigma, rate, steps, delta, accountant)
    assert abs(epsilon - reference) <= max(DEFAULT_SLACK * reference, MIN_SLACK), (epsilon, reference)


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Exact epsilon of `steps` Gaussian steps without subsampling (q = 1): one Gaussian mechanism with
    noise sigma / sqrt(T), whose delta(eps) is Phi(1/2s - eps s) - e^eps Phi(-1/2s - eps s) (Balle & Wang 2018)."""
    s = sigma / math.sqrt(steps)

    def delta_at(eps: float) -> float:
        return norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps + norm.logcdf(-1 / (2 * s) - eps * s))

    return brentq(lambda eps: delta_at(eps) - delta, 0.0, 500.0, xtol=1e-12)


# --------------------------------------------------------------------------- sampling and steps


@pytest.mark.parametrize("n, batch", [(100, 10), (101, 10), (940, 10), (25_000, 1028), (7, 7)])
def test_sample_rate_and_epoch_length_are_what_a_dp_data_loader_uses(n, batch):
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch, drop_last=False)
    dp_loader = DPDataLoader.from_data_loader(loader)
    assert accounting.poisson_sample_rate(n, batch) == dp_loader.sample_rate
    assert accounting.steps_per_epoch(n, batch) == len(dp_loader)


def opacus_mechanism(n: int, batch: int) -> tuple[float, int, float, float]:
    """What Opacus does for n records and logical batch `batch`: the sampler's q and steps per epoch, then,
    after one step of `make_private`'s optimizer, the q its accountant counted and the divisor E it used."""
    model = torch.nn.Linear(1, 1)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    module, optimizer, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    module(torch.zeros(2, 1)).sum().backward()
    optimizer.step()
    return dp_loader.sample_rate, len(dp_loader), engine.accountant.history[0][1], optimizer.expected_batch_size


@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
def test_a_batch_count_opacus_loses_is_refused_in_planning_over_a_range_of_sizes():
    """Every logical batch size of the paper's 25,000 records (316 batch counts k = ceil(25000 / B)):
    planning refuses exactly those where Opacus's sampler q (1/k) is not the q make_private accounts
    (1 / len(DPDataLoader)), and accepts the rest with Opacus's own q and steps per epoch."""
    n, refused = 25_000, []
    for batch in range(1, n + 1):
        dp_loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
        consistent = 1 / len(dp_loader) == dp_loader.sample_rate
        try:
            rate = accounting.poisson_sample_rate(n, batch)
        except DpnbError as why:
            assert not consistent, batch
            refused.append((batch, str(why)))
            continue
        assert consistent, batch
        assert rate == dp_loader.sample_rate and accounting.steps_per_epoch(n, batch) == len(dp_loader)
    assert {93, 99, 105, 117} <= {math.ceil(n / b) for b, _ in refused}
    # on a refused size, Opacus really runs another mechanism: it samples at 1/k and accounts 1/(k - 1)
    batch, message = next((b, why) for b, why in refused if math.ceil(n / b) == 93)
    k = 93
    sampled, per_epoch, accounted, divisor = opacus_mechanism(n, batch)
    assert (sampled, per_epoch, accounted, divisor) == (1 / k, k - 1, 1 / (k - 1), int(n / (k - 1)))
    # the message names the nearest sizes that work, and they do: Opacus samples and accounts the plan's q
    below, above = (int(x) for x in message.rsplit("use logical_batch_size ", 1)[1].split(" or "))
    assert below < batch < above
    assert all(accounting.opacus_counts_epoch(math.ceil(n / b)) is False for b in range(below + 1, above))
    for fixed in (below, above):
        q = accounting.poisson_sample_rate(n, fixed)
        assert opacus_mechanism(n, fixed) == (q, accounting.steps_per_epoch(n, fixed), q, int(n * q))


@pytest.mark.parametrize(("n", "batch", "k"), [(930, 10, 93), (25_000, 270, 93), (9_900, 100, 99), (1_050, 10, 105),
                                               (1_170, 10, 117)])
def test_the_batch_counts_the_issue_names_are_refused(n, batch, k):
    assert math.ceil(n / batch) == k and int(1 / (1 / k)) == k - 1
    with pytest.raises(DpnbError, match=f"logical_batch_size {batch} over {n} records makes {k} batches"):
        accounting.poisson_sample_rate(n, batch)


def test_batch_larger_than_data_is_refused():
    with pytest.raises(DpnbError, match="larger than the data set"):
        accounting.poisson_sample_rate(10, 11)


def test_planned_steps_round_fractional_epochs_up_and_respect_max_steps():
    per_epoch = accounting.steps_per_epoch(1000, 100)
    assert accounting.planned_steps(1000, 100, 2.0, None) == 2 * per_epoch
    assert accounting.planned_steps(1000, 100, 0.25, None) == math.ceil(0.25 * per_epoch)
    assert accounting.planned_steps(1000, 100, 0.1 * 3, None) == 3  # 0.30000000000000004 epochs: no extra step
    assert accounting.planned_steps(1000, 100, 5.0, 7) == 7
    assert accounting.planned_steps(1000, 100, 0.5, 70) == math.ceil(0.5 * per_epoch)


# --------------------------------------------------------------------------- delta


def test_default_delta_is_below_one_over_n_and_accepted():
    for n in (10, 800, 25_000):
        assert accounting.default_delta(n) < 1 / n
        accounting.validate_delta(accounting.default_delta(n), n)


@pytest.mark.parametrize("delta", [1 / 100, 0.5, 0.0, -1e-6])
def test_delta_not_below_one_over_n_is_refused(delta):
    with pytest.raises(DpnbError, match="delta"):
        accounting.validate_delta(delta, 100)


def test_delta_error_names_the_default():
    with pytest.raises(DpnbError, match=f"{accounting.default_delta(100):.3g}"):
        accounting.validate_delta(0.02, 100)


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_grows_with_steps_and_falls_with_noise(accountant):
    by_steps = [accounting.epsilon_spent(1.0, 0.04, t, DELTA, accountant) for t in (0, 1, 10, 50, 200)]
    assert by_steps[0] == 0.0
    assert all(a < b for a, b in pairwise(by_steps))
    by_sigma = [accounting.epsilon_spent(s, 0.04, 50, DELTA, accountant) for s in (0.6, 1.0, 2.0)]
    assert all(a > b for a, b in pairwise(by_sigma))


CALIBRATION_SETTINGS = [(1.0, 0.1, 10), (8.0, 0.04, 40)]  # (target epsilon, sample rate, steps)


@functools.cache
def calibrated(target: float, rate: float, steps: int, accountant: str) -> float:
    return accounting.calibrate_noise(target, DELTA, rate, steps, accountant)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target, rate, steps", CALIBRATION_SETTINGS)
def test_calibrated_noise_meets_the_target_closely(accountant, target, rate, steps):
    sigma = calibrated(target, rate, steps, accountant)
    spent = accounting.epsilon_spent(sigma, rate, steps, DELTA, accountant)
    assert spent <= target
    assert spent >= 0.99 * target
    # independently: Google's accountant of the same kind puts the calibrated sigma at the target too
    assert_agrees_with_google(target, sigma, rate, steps, DELTA, accountant)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target, steps", [(1.0, 10), (4.0, 3)])
def test_calibration_without_subsampling_meets_the_exact_gaussian_epsilon(accountant, target, steps):
    # q = 1: the exact epsilon has a closed form; both accountants are upper bounds on it, PRV a tight one
    sigma = accounting.calibrate_noise(target, DELTA, 1.0, steps, accountant)
    exact = exact_gaussian_epsilon(sigma, steps, DELTA)
    assert exact <= accounting.epsilon_spent(sigma, 1.0, steps, DELTA, accountant) <= target
    if accountant == "prv":
        assert exact >= target - 0.03  # PRV: upper end of a 0.01-wide interval, calibrated 0.2% below target
    else:
        assert exact < target  # RDP's conversion loses: it calibrates more noise than needed


@pytest.mark.parametrize("target, rate, steps", CALIBRATION_SETTINGS)
def test_prv_is_calibrated_with_less_noise_than_rdp(target, rate, steps):
    # PRV's bound is tighter than RDP's, so the same target needs less noise
    assert calibrated(target, rate, steps, "prv") < calibrated(target, rate, steps, "rdp")


@pytest.mark.parametrize("sigma, rate, steps", [(1.0, 0.04, 125), (0.8, 0.01, 50), (1.0, 0.1, 10)])
def test_accountants_order_gdp_below_prv_below_rdp_when_subsampled(sigma, rate, steps):
    # RDP and PRV are upper bounds, PRV the tighter; GDP's CLT approximation under-estimates here
    eps = {name: accounting.epsilon_spent(sigma, rate, steps, DELTA, name) for name in ("gdp", "prv", "rdp")}
    assert eps["gdp"] < eps["prv"] < eps["rdp"]


@pytest.mark.parametrize("delta", [DELTA, accounting.default_delta(25_000), accounting.default_delta(800)])
def test_epsilon_equals_what_an_opacus_accountant_reports_after_stepping(delta):
    # the same number PrivacyEngine.get_epsilon(delta) prints during training, to the last bit, and the
    # number Google's accountant gives for 12 steps at q = 0.05 (beyond the tolerance from 6 or 24 steps')
    for accountant in (RDPAccountant(), PRVAccountant()):
        for _ in range(12):
            accountant.step(noise_multiplier=0.9, sample_rate=0.05)
        spent = accounting.epsilon_spent(0.9, 0.05, 12, delta, accountant.mechanism())
        assert accountant.get_epsilon(delta) == spent
        assert_agrees_with_google(spent, 0.9, 0.05, 12, delta, accountant.mechanism())
        for wrong in (6, 24):
            assert abs(google(0.9, 0.05, wrong, delta, accountant.mechanism()) - spent) > max(0.05 * spent, MIN_SLACK)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_privacy_fields_has_both_accountants_and_google_agrees(accountant):
    fields = guarantee.privacy_fields(1.0, 0.04, 20, DELTA, accountant)
    assert set(fields["epsilons"]) == {"rdp", "prv"} and fields["epsilon"] == fields["epsilons"][accountant]
    assert (fields["noise_multiplier"], fields["sample_rate"], fields["steps"], fields["delta"],
            fields["accountant"]) == (1.0, 0.04, 20, DELTA, accountant)
    reference = google_both(1.0, 0.04, 20, DELTA)
    assert abs(fields["epsilons"]["prv"] - reference["pld"]) <= MIN_SLACK  # measured +0.008..0.011
    assert fields["epsilons"]["rdp"] == pytest.approx(reference["rdp"], rel=0.005)  # measured <= 0.13%
    assert reference["pld"] < reference["rdp"]
    checked = cross_check({"dp": True, **fields})
    assert checked["agrees"] and checked["others"][{"rdp": "prv", "prv": "rdp"}[accountant]]["agrees"]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("wrong", [{"steps": 40}, {"steps": 10}, {"sample_rate": 0.08}, {"sample_rate": 0.02}])
def test_a_record_whose_steps_or_sample_rate_are_not_its_epsilons_fails_the_cross_check(accountant, wrong):
    # epsilon computed for 20 steps at q = 0.04, the record claiming other numbers: Google catches it
    record = {"dp": True, **guarantee.privacy_fields(1.0, 0.04, 20, DELTA, accountant), **wrong}
    with pytest.raises(DpnbError, match="disagrees with Google"):
        cross_check(record)


def test_privacy_fields_leaves_out_a_refusing_comparison_accountant_but_not_the_chosen_one(monkeypatch):
    monkeypatch.setattr(accounting, "MAX_PRV_GRID", 0)  # PRV now refuses every setting
    fields = guarantee.privacy_fields(1.0, 0.04, 20, DELTA, "rdp")
    assert fields["epsilons"] == {"rdp": fields["epsilon"]}
    with pytest.raises(DpnbError, match="PRV accountant needs a grid"):
        guarantee.privacy_fields(1.0, 0.04, 20, DELTA, "prv")


@pytest.mark.parametrize("kwargs, match", [
    ({"target_epsilon": 0.0}, "target epsilon"),
    ({"target_epsilon": float("inf")}, "target epsilon"),
    ({"steps": 0}, "steps"),
    ({"sample_rate": 0.0}, "sample rate"),
    ({"sample_rate": 1.5}, "sample rate"),
    ({"accountant": "gdp"}, "accountant"),
])
def test_calibration_refuses_bad_inputs(kwargs, match):
    args = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.1, "steps": 10, "accountant": "rdp", **kwargs}
    with pytest.raises(DpnbError, match=match):
        accounting.calibrate_noise(**args)


def test_prv_refuses_a_grid_that_would_exhaust_memory():
    # sigma = 0.05 at q = 0.04, 125 steps needs a grid of ~167 M points (tens of GB)
    with pytest.raises(DpnbError, match="rdp"):
        accounting.epsilon_spent(0.05, 0.04, 125, DELTA, "prv")


# --------------------------------------------------------------------------- per-step tracking


def test_tracker_reports_exact_epsilon_or_the_next_computed_steps():
    sigma, rate, steps = 1.0, 0.04, 12
    exact = accounting.EpsilonTracker(sigma, rate, DELTA, "prv", steps)
    assert exact.epsilon(0) == 0.0
    assert exact.epsilon(7) == accounting.epsilon_spent(sigma, rate, 7, DELTA, "prv")
    assert_agrees_with_google(exact.epsilon(7), sigma, rate, 7, DELTA, "prv")  # 7 steps' epsilon, not 6's or 8's
    assert all(abs(google(sigma, rate, t, DELTA, "prv") - exact.epsilon(7)) > MIN_SLACK for t in (6, 8))
    coarse = accounting.EpsilonTracker(sigma, rate, DELTA, "prv", steps, exact_every=5)
    assert not coarse.is_exact(7) and coarse.computed_at(7) == 10
    assert coarse.epsilon(7) == accounting.epsilon_spent(sigma, rate, 10, DELTA, "prv") > exact.epsilon(7)
    assert coarse.computed_at(11) == steps and coarse.is_exact(steps)
    assert coarse.epsilon(steps) == exact.epsilon(steps)


def test_rdp_tracker_matches_the_accountant_at_every_step():
    tracker = accounting.EpsilonTracker(0.7, 0.04, DELTA, "rdp", 300)
    for step in (0, 1, 2, 25, 299, 300, 301):
        assert tracker.epsilon(step) == accounting.epsilon_spent(0.7, 0.04, step, DELTA, "rdp")
    # the train log's per-step epsilon is Google's RDP epsilon of that many steps (0.5%: measured <= 0.13%;
    # one step more moves it by 5% or more at 1 or 2 steps)
    assert tracker.epsilon(0) == 0.0
    for step in (1, 2, 5, 25):
        assert tracker.epsilon(step) == pytest.approx(google(0.7, 0.04, step, DELTA, "rdp"), rel=0.005)
    for step in (1, 2):
        assert tracker.epsilon(step) != pytest.approx(google(0.7, 0.04, step + 1, DELTA, "rdp"), rel=0.05)


# --------------------------------------------------------------------------- checkpoints and records


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_restored_accountant_after_json_round_trip_continues_identically(name):
    original = accounting.new_accountant(name)
    for _ in range(9):
        original.step(noise_multiplier=0.8, sample_rate=0.03)
    saved = json.loads(json.dumps(accounting.accountant_history(original)))
    restored = accounting.restore_accountant(name, saved)
    assert restored.get_epsilon(DELTA) == original.get_epsilon(DELTA)
    original.step(noise_multiplier=0.8, sample_rate=0.03)
    restored.step(noise_multiplier=0.8, sample_rate=0.03)
    assert restored.history == original.history == [(0.8, 0.03, 10)]  # merged, not a second entry


def test_restore_refuses_a_damaged_history():
    with pytest.raises(DpnbError, match="damaged"):
        accounting.restore_accountant("rdp", [[0.8, 0.03]])
    with pytest.raises(DpnbError, match="damaged"):
        accounting.restore_accountant("rdp", [[0.8, 0.03, 2.5]])


def _record() -> dict:
    return {"dp": True, **guarantee.privacy_fields(0.9, 0.05, 8, DELTA, "prv")}


def test_record_survives_a_json_round_trip_and_google_agrees():
    record = _record()
    again = json.loads(json.dumps(record))
    assert again == record  # floats survive JSON exactly
    assert guarantee.recompute_epsilon(again) == record["epsilon"]
    guarantee.verify_privacy(again)
    checked = cross_check(again)  # the round-tripped record's epsilon is Google's for 8 steps at q = 0.05
    assert checked["agrees"] and 0 <= checked["difference"] <= MIN_SLACK


@pytest.mark.parametrize("tamper", [
    lambda r: r.update(epsilon=r["epsilon"] * 0.99),
    lambda r: r.update(steps=r["steps"] - 1),
    lambda r: r["epsilons"].update(rdp=r["epsilons"]["rdp"] * 0.9),
])
def test_tampered_record_fails_verification(tamper):
    record = _record()
    tamper(record)
    with pytest.raises(DpnbError, match="inconsistent"):
        guarantee.verify_privacy(record)


def test_non_dp_record_must_not_claim_an_epsilon():
    guarantee.verify_privacy({"dp": False, "epsilon": None})
    with pytest.raises(DpnbError, match="dp = false"):
        guarantee.verify_privacy({"dp": False, "epsilon": 3.0})
