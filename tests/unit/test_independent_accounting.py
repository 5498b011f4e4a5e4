"""Opacus's epsilons against Google's dp_accounting and against the exact Gaussian-mechanism formula.

Costs (shared 2-core CPU): Google PLD (spacing 1e-3) + RDP 0.1-0.9 s per setting; Opacus PRV 0.1-0.6 s,
except the demo's setting (q = 0.125, sigma ~ 0.5), where it takes ~4 s once (module fixture); the
paper's calibration ~3-5 s once. The whole file runs in ~20-30 s.
"""

from __future__ import annotations

import math

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from dpnb.errors import DpnbError
from dpnb.privacy.accounting import calibrate_noise, epsilon_spent
from dpnb.privacy.guarantee import privacy_fields
from dpnb.privacy.independent_accounting import DEFAULT_SLACK, MIN_SLACK, cross_check, google_epsilons

DEMO = {"noise_multiplier": 0.4971, "sample_rate": 0.125, "steps": 8, "delta": 1.05e-3}
PAPER_N = 25_000
PAPER = {"sample_rate": 0.04, "steps": 125, "delta": 1 / PAPER_N**1.1}


def _record(settings: dict, accountant: str) -> dict:
    """An honest privacy.json record (as dpnb finetune writes it) for `settings`."""
    return {"dp": True, **privacy_fields(settings["noise_multiplier"], settings["sample_rate"], settings["steps"],
                                         settings["delta"], accountant)}


def _as_rdp(record: dict) -> dict:
    """The same run accounted with RDP: privacy_fields already holds both epsilons."""
    return {**record, "accountant": "rdp", "epsilon": record["epsilons"]["rdp"]}


@pytest.fixture(scope="module")
def demo_record() -> dict:
    return _record(DEMO, "prv")


@pytest.fixture(scope="module")
def paper_record() -> dict:
    sigma = calibrate_noise(8.0, PAPER["delta"], PAPER["sample_rate"], PAPER["steps"], "prv")
    return _record({**PAPER, "noise_multiplier": sigma}, "prv")


# --------------------------------------------------------------------------- real settings agree


def test_demo_settings_agree_with_known_values(demo_record):
    # Known values for the demo (from an unrounded sigma; sigma = 0.4971 lands ~0.004 lower).
    prv = cross_check(demo_record)
    rdp = cross_check(_as_rdp(demo_record))
    assert prv["agrees"] and rdp["agrees"]
    assert prv["google_pld"] == pytest.approx(7.988, abs=0.01)
    assert prv["opacus"] == pytest.approx(7.999, abs=0.01)
    assert rdp["google_rdp"] == pytest.approx(10.206, abs=0.01)
    assert rdp["opacus"] == pytest.approx(10.199, abs=0.01)
    # PRV reports the upper end of its 0.01-wide interval: a little above the (tight) PLD, never far.
    assert 0 <= prv["difference"] <= 0.02
    assert abs(rdp["difference"]) <= 0.01 * rdp["google_rdp"]
    assert prv["google_pld"] < rdp["google_rdp"]  # PLD is the tighter bound


def test_paper_settings_agree(paper_record):
    assert paper_record["epsilon"] <= 8.0
    prv = cross_check(paper_record)
    rdp = cross_check(_as_rdp(paper_record))
    assert prv["agrees"] and rdp["agrees"]
    assert prv["google_pld"] == pytest.approx(8.0, abs=0.03)
    assert 0 <= prv["difference"] <= 0.02
    assert prv["others"]["rdp"]["agrees"]  # the record's epsilons.rdp is checked too
    assert abs(rdp["difference"]) <= 0.01 * rdp["google_rdp"]


# --------------------------------------------------------------------------- exact closed form (q = 1)


def _exact_delta(eps: float, s: float) -> float:
    """delta(eps) of one Gaussian mechanism, sensitivity 1, noise s (Balle & Wang 2018, Theorem 8)."""
    return norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps + norm.logcdf(-1 / (2 * s) - eps * s))


def _exact_gaussian_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """Exact epsilon of T Gaussian steps without subsampling = one Gaussian with s = sigma / sqrt(T), inverted."""
    s = noise_multiplier / math.sqrt(steps)
    return brentq(lambda eps: _exact_delta(eps, s) - delta, 0.0, 500.0, xtol=1e-12)


# measured: PLD (1e-3) exceeds the exact value by 2e-7..1e-4, Opacus PRV by 0.010-0.0135, RDP by 0.07-7
PLD_EXACT_TOL = 1e-3
PRV_EXACT_TOL = 0.02


@pytest.mark.parametrize("sigma, steps, delta", [(10.0, 4, 1e-6), (3.0, 25, 1e-5), (1.0, 10, 1e-5), (0.5, 1, 1e-3)])
def test_no_subsampling_matches_the_exact_gaussian_formula(sigma, steps, delta):
    exact = _exact_gaussian_epsilon(sigma, steps, delta)
    google = google_epsilons(sigma, 1.0, steps, delta)
    prv = epsilon_spent(sigma, 1.0, steps, delta, accountant="prv")
    # Both are upper bounds on the exact value, and tight to the stated tolerance.
    assert exact - 1e-9 <= google["pld"] <= exact + PLD_EXACT_TOL
    assert exact - 1e-9 <= prv <= exact + PRV_EXACT_TOL
    assert google["rdp"] >= exact  # RDP: valid, looser


def test_closed_form_is_right():
    # by hand: s = 1, eps = 1: Phi(-0.5) - e Phi(-1.5) = 0.3085375 - 2.7182818 * 0.0668072 = 0.1269367
    assert _exact_delta(1.0, 1.0) == pytest.approx(0.1269367, abs=1e-6)
    # the classic bound: sigma = sqrt(2 ln(1.25/delta)) / eps is (eps, delta)-DP for eps < 1, so exact eps < eps
    eps, delta = 0.5, 1e-5
    assert _exact_gaussian_epsilon(math.sqrt(2 * math.log(1.25 / delta)) / eps, 1, delta) < eps


# --------------------------------------------------------------------------- wrong records are caught


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_under_claimed_epsilon_raises(paper_record, accountant):
    record = paper_record if accountant == "prv" else _as_rdp(paper_record)
    with pytest.raises(DpnbError, match="disagrees with Google"):
        cross_check({**record, "epsilon": 0.8 * record["epsilon"]})


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_halved_step_count_raises(paper_record, accountant):
    record = paper_record if accountant == "prv" else _as_rdp(paper_record)
    with pytest.raises(DpnbError, match="above Google"):
        cross_check({**record, "steps": record["steps"] // 2})


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_doubled_step_count_raises(paper_record, accountant):
    record = paper_record if accountant == "prv" else _as_rdp(paper_record)
    with pytest.raises(DpnbError, match="UNDER-CLAIM|below Google"):
        cross_check({**record, "steps": record["steps"] * 2})


def test_wrong_secondary_epsilon_is_caught(paper_record):
    record = {**paper_record, "epsilons": {**paper_record["epsilons"], "rdp": 0.8 * paper_record["epsilons"]["rdp"]}}
    with pytest.raises(DpnbError, match="epsilons.rdp"):
        cross_check(record)


def test_slack_is_what_decides(paper_record):
    truth = cross_check(paper_record)["google_pld"]
    tolerance = max(DEFAULT_SLACK * truth, MIN_SLACK)
    assert cross_check({**paper_record, "epsilon": truth - 0.9 * tolerance})["agrees"]
    with pytest.raises(DpnbError, match="UNDER-CLAIM"):
        cross_check({**paper_record, "epsilon": truth - 1.1 * tolerance})
    with pytest.raises(DpnbError, match="above Google"):
        cross_check({**paper_record, "epsilon": truth + 1.1 * tolerance})


def test_loose_google_rdp_does_not_fail_an_honest_record_but_pld_still_guards():
    # sigma = 0.5, q = 0.125, T = 125: dp_accounting cannot evaluate RDP orders 1.1-1.6, next to its
    # optimum 1.7, so its RDP (54.7) is far above Opacus's (47.3); PLD (42.7) is the guard.
    sigma, q, steps, delta = 0.5, 0.125, 125, 1e-5
    claim = epsilon_spent(sigma, q, steps, delta, "rdp")
    record = {"dp": True, "noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": delta,
              "accountant": "rdp", "epsilon": claim}
    result = cross_check(record)
    assert result["agrees"] and "loose" in result["note"]
    assert result["google_rdp"] > claim * 1.1 > claim > result["google_pld"]
    with pytest.raises(DpnbError, match="UNDER-CLAIM"):
        cross_check({**record, "epsilon": 0.9 * result["google_pld"]})


# --------------------------------------------------------------------------- edge cases


def test_non_dp_record_has_nothing_to_check():
    result = cross_check({"dp": False, "epsilon": None})
    assert result["agrees"] is None and "without DP" in result["note"]


def test_zero_steps_and_no_subsampling():
    assert google_epsilons(1.0, 0.04, 0, 1e-5)["pld"] == 0.0
    assert google_epsilons(1.0, 0.04, 0, 1e-5)["rdp"] == 0.0
    full = google_epsilons(2.0, 1.0, 3, 1e-5)
    assert 0 < full["pld"] < full["rdp"] < math.inf


@pytest.mark.parametrize("record, message", [
    ({"dp": True, "epsilon": 1.0}, "lacks"),
    ({"dp": True, "noise_multiplier": 1.0, "sample_rate": 0.04, "steps": 10, "delta": 1e-5, "accountant": "gdp",
      "epsilon": 1.0}, "cannot be cross-checked"),
    ({"dp": True, "noise_multiplier": -1.0, "sample_rate": 0.04, "steps": 10, "delta": 1e-5, "accountant": "prv",
      "epsilon": 1.0}, "noise multiplier"),
])
def test_malformed_records_are_refused(record, message):
    with pytest.raises(DpnbError, match=message):
        cross_check(record)


# --------------------------------------------------------------------------- monotonicity


def test_more_steps_or_less_noise_spend_more_in_both_libraries():
    q, delta = 0.04, 1e-5
    settings = [(1.0, 125), (1.0, 250), (0.8, 125)]  # base, more steps, less noise

    def all_epsilons(sigma: float, steps: int) -> dict[str, float]:
        google = google_epsilons(sigma, q, steps, delta)
        return {"google_pld": google["pld"], "google_rdp": google["rdp"],
                "opacus_prv": epsilon_spent(sigma, q, steps, delta, "prv"),
                "opacus_rdp": epsilon_spent(sigma, q, steps, delta, "rdp")}

    base, more_steps, less_noise = (all_epsilons(*s) for s in settings)
    for name in base:
        assert more_steps[name] > base[name] * 1.05, name
        assert less_noise[name] > base[name] * 1.05, name
