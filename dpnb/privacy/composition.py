"""One guarantee for data that several DP mechanisms made: composition, and the budget left for the last one.

A Private Evolution set that starts from the DP fine-tuned model's samples depends on the private data
through two mechanisms: DP-SGD's T1 Poisson-subsampled Gaussian steps (sigma_1, q_1) and PE's T2 Gaussian
votes (sigma_2, q = 1). Both are Gaussian mechanisms on the same records, so one accountant fed both
histories,

    history = [(sigma_1, q_1, T1), (sigma_2, 1, T2)],

gives the (epsilon, delta) of the pair (adaptive composition: PE's population is the fine-tuned model's
output, its votes are computed after). PRV (and RDP) compose such histories exactly as they compose the
steps of one run, and give a far smaller epsilon than adding the two epsilons (basic composition, also
valid, looser). `calibrate_last` finds the noise of the last mechanism so that the whole history spends
exactly a total target: "PE spends what fine-tuning left of the budget".

A record (`composed_record`) lists every mechanism; `dpnb.privacy.guarantee.recompute_epsilon` and `dpnb verify`
(with Google's dp-accounting, `dpnb.privacy.independent_accounting`) recompute its epsilon from that list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dpnb.errors import DpnbError, require
from dpnb.privacy import accounting


@dataclass(frozen=True)
class Mechanism:
    """One Gaussian mechanism run `steps` times: noise multiplier sigma, each record taken with probability q."""

    name: str  # what it was, in words ("DP-SGD fine-tuning", "Private Evolution votes")
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def step(self) -> tuple[float, float, int]:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))

    @classmethod
    def of_record(cls, name: str, record: dict[str, Any]) -> list[Mechanism]:
        """The mechanisms a privacy.json record states (one, or the list of a composed record)."""
        if record.get("mechanisms"):
            return [cls(**m) for m in record["mechanisms"]]
        return [cls(name, float(record["noise_multiplier"]), float(record["sample_rate"]), int(record["steps"]))]


def epsilon_of(mechanisms: Sequence[Mechanism], delta: float, accountant: str = "prv", check: bool = True) -> float:
    """Epsilon at delta of all `mechanisms` composed, by one fresh Opacus accountant over their histories.

    `check`: refuse settings outside the accountants' range, and PRV grids too large (`dpnb.privacy`)."""
    require(len(mechanisms) > 0, "there is no mechanism to compose")
    if check:
        for m in mechanisms:
            accounting.check_mechanism(m.noise_multiplier, m.sample_rate, m.steps, delta, accountant)
            if accountant == "prv" and m.steps:
                accounting.check_prv_feasible(m.noise_multiplier, m.sample_rate, m.steps, delta)
    history = [m.step for m in mechanisms if m.steps > 0]
    if not history:
        return 0.0
    acc = accounting.new_accountant(accountant)
    acc.history = history
    return accounting.accountant_epsilon(acc, delta)


def calibrate_last(target_epsilon: float, delta: float, spent: Sequence[Mechanism], name: str, sample_rate: float,
                   steps: int, accountant: str = "prv", max_iterations: int = 40) -> Mechanism:
    """The last mechanism (its sigma) such that `spent` and it together spend at most `target_epsilon`.

    The composed epsilon falls as sigma grows. A bracket [low, high] (epsilon above the target at low,
    at most the target at high) is found by halving and doubling, then narrowed by false position on
    log epsilon against log sigma (nearly linear there), keeping `high` within the target throughout:
    a few accountant evaluations. Refused when `spent` alone already reaches the target.
    """
    already = epsilon_of(spent, delta, accountant) if spent else 0.0
    require(already < target_epsilon,
            f"the mechanisms before {name} already spend epsilon {already:.3f} of the total {target_epsilon:g}: "
            f"raise the total, or give them less")
    tolerance = accounting.epsilon_tolerance(target_epsilon, accountant)

    def excess(log_sigma: float) -> tuple[float, float]:  # (log epsilon - log target, epsilon)
        mechanism = Mechanism(name, math.exp(log_sigma), sample_rate, steps)
        eps = epsilon_of([*spent, mechanism], delta, accountant, check=False)
        return math.log(max(eps, 1e-300)) - math.log(target_epsilon), eps

    high = 1.0
    while (f_high := excess(math.log(high)))[0] > 0:
        high *= 2
        require(high <= accounting.MAX_NOISE_MULTIPLIER, f"a total epsilon of {target_epsilon:g} is out of reach")
    low = high / 2
    while (f_low := excess(math.log(low)))[0] <= 0:
        high, f_high, low = low, f_low, low / 2
    epsilon_of([*spent, Mechanism(name, low, sample_rate, steps)], delta, accountant)  # the checks, once
    a, fa, b, (fb, eps_b) = math.log(low), f_low[0], math.log(high), f_high
    for _ in range(max_iterations):
        if target_epsilon - eps_b <= tolerance or b - a <= 1e-9:
            break
        c = b - fb * (b - a) / (fb - fa)
        c = min(max(c, a + 0.02 * (b - a)), b - 0.02 * (b - a))  # strictly inside the bracket
        fc, eps_c = excess(c)
        if fc <= 0:
            b, fb, eps_b = c, fc, eps_c
        else:
            a, fa = c, fc
    if eps_b > target_epsilon:  # cannot happen: b only moves to values within the target
        raise DpnbError(f"calibration of {name} overshot the total epsilon {target_epsilon}")
    return Mechanism(name, math.exp(b), sample_rate, steps)


def composed_record(mechanisms: Sequence[Mechanism], delta: float, accountant: str = "prv") -> dict[str, Any]:
    """privacy.json's accounting fields for the composition: epsilon by each accountant, and every mechanism."""
    epsilon = epsilon_of(mechanisms, delta, accountant)
    epsilons = {accountant: epsilon}
    for other in accounting.ACCOUNTANTS:
        if other != accountant:
            try:
                epsilons[other] = epsilon_of(mechanisms, delta, other)
            except DpnbError:  # PRV may refuse a grid too large; the chosen accountant must succeed
                continue
    return {"dp": True, "epsilon": epsilon, "epsilons": epsilons, "delta": delta, "accountant": accountant,
            "composition": "one accountant over every mechanism's history (adaptive composition)",
            "mechanisms": [asdict(m) for m in mechanisms]}
