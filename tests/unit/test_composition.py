"""Composition: the epsilon of several mechanisms together, the budget left for the last, and its re-derivation."""

from __future__ import annotations

import pytest

from dpnb.errors import DpnbError
from dpnb.privacy import accounting, composition, guarantee, independent_accounting
from dpnb.privacy.composition import Mechanism

DELTA = 1e-4
TUNING = Mechanism("DP-SGD fine-tuning", 0.9, 1 / 8, 32)


def test_composing_costs_more_than_either_and_less_than_their_sum():
    votes = Mechanism("Private Evolution votes", 2.0, 1.0, 1)
    alone = [composition.epsilon_of([m], DELTA) for m in (TUNING, votes)]
    both = composition.epsilon_of([TUNING, votes], DELTA)
    assert max(alone) < both < sum(alone)
    assert alone[0] == pytest.approx(accounting.epsilon_spent(0.9, 1 / 8, 32, DELTA, "prv"))  # one mechanism: as before


def test_the_last_mechanism_spends_what_is_left():
    votes = composition.calibrate_last(8.0, DELTA, [TUNING], "Private Evolution votes", 1.0, 2)
    total = composition.epsilon_of([TUNING, votes], DELTA)
    assert 8.0 - 0.02 <= total <= 8.0
    with pytest.raises(DpnbError, match="already spend"):
        composition.calibrate_last(1.0, DELTA, [TUNING], "votes", 1.0, 1)


def test_a_composed_record_is_recomputed_and_google_agrees():
    votes = composition.calibrate_last(8.0, DELTA, [TUNING], "Private Evolution votes", 1.0, 2)
    record = composition.composed_record([TUNING, votes], DELTA)
    guarantee.verify_privacy(record)
    check = independent_accounting.cross_check(record)
    assert check["agrees"] and check["google_pld"] == pytest.approx(record["epsilon"], abs=0.05)
    tampered = {**record, "mechanisms": [record["mechanisms"][0]]}  # the votes left out: a lower epsilon
    with pytest.raises(DpnbError, match="inconsistent"):
        guarantee.verify_privacy(tampered)
