"""An independent check of a run's epsilon with Google's `dp_accounting`, a second implementation.

Every epsilon this package reports comes from Opacus (`dpnb.privacy`). A bug there, or a privacy.json
whose numbers do not belong together, would be invisible if Opacus also checked itself. This module
recomputes epsilon for a record's `(noise_multiplier, sample_rate, steps, delta)` with Google's
accountants, which share no code with Opacus, and compares.

The mechanism
-------------
One DP-SGD step is the *Poisson-subsampled Gaussian mechanism*: each record joins the batch
independently with probability `q`, each per-example gradient is clipped to norm `C`, and the sum
gets `N(0, sigma^2 C^2 I)` noise. Epsilon depends only on `(sigma, q, T, delta)`; scaling by `C`,
the worst case reduces to one dimension with sensitivity 1. Under *add/remove-one adjacency* (the
neighbouring data set has one record more or fewer; both Opacus and dp_accounting's default
`ADD_OR_REMOVE_ONE`), the worst-case pair of output distributions for one step is

    P = N(0, sigma^2)   and   Q = (1 - q) N(0, sigma^2) + q N(1, sigma^2),

compared in both orders (removing a record: Q against P; adding one: P against Q). After `T` steps
the pair is the product `P^T, Q^T`. The mechanism is (epsilon, delta)-DP exactly when the hockey-stick
divergence `H_{e^eps}(A || B) = integral (a - e^eps b)_+` is at most delta for both orders; the
smallest such epsilon at the given delta is the *true* epsilon.

What the accountants compute
----------------------------
- PLD (`google_epsilons()["pld"]`; Meiser & Mohammadi 2018, Koskela et al. 2020, Doroshenko et al.
  2022 "connect the dots"): the privacy loss `L = log (dP/dQ)(Y)`, `Y ~ P`, is discretised on a grid
  of spacing `pld_discretization(T)` and the `T`-fold sum is computed by FFT convolution; delta(eps)
  follows from the loss distribution and is inverted for epsilon. Both adjacency directions are
  composed and the worse taken. With `pessimistic_estimate` (dp_accounting's default, kept here)
  every rounding moves loss upwards and truncated tail mass is counted as infinite loss, so the
  result is an *upper bound* on the true epsilon that converges to it as the spacing shrinks. It is
  the tight number: Opacus's PRV accountant (Gopi, Lee, Wutschitz 2021) computes the same object with
  another discretisation and reports the upper end of an interval of width `PRV_EPS_ERROR = 0.01`.
- RDP (`google_epsilons()["rdp"]`; Mironov 2017, Mironov, Talwar, Zhang 2019): the Renyi divergence
  of the pair at each order alpha, which composes additively, then the conversion to
  (epsilon, delta) of Canonne, Kamath, Steinke 2020 / Balle et al. 2020, minimised over orders. Also a
  valid upper bound, but the conversion loses: 10-50% above PLD in the grid below. Google's default
  orders (used here) are Opacus's `RDPAccountant.DEFAULT_ALPHAS` plus 11 and 128-1024; the same
  formulas, so Opacus RDP and Google RDP agree to ~0.1% (but see the exception below).

So for any setting: true epsilon <= PLD <= RDP, and PLD ~ PRV.

Discretisation
--------------
`PLD_DISCRETIZATION = 1e-3` up to `PLD_REFERENCE_STEPS = 1000` steps, then `1e-3 * sqrt(1000 / T)`
(`pld_discretization`; dp_accounting's default is 1e-4). The pessimistic error (how far above its
limit the result lands) scales as spacing^2 * T: measured against 1e-4 over the grid below it was
1e-6 to 1e-5 at T = 8, up to 2e-4 at T = 125 and 1.6e-3 at T = 1,000 (largest at small epsilon and
large sigma); halving the spacing quarters it (checked at T = 1,000 and 10,000). Shrinking the
spacing as 1/sqrt(T) keeps it at ~2e-3 or less at any T, a tenth of the smallest tolerance below.
Cost on a shared 2-core CPU: 0.02-0.6 s per epsilon in the grid (1.2 s at T = 100,000), against
0.2-6 s at 1e-4. Being pessimistic, a coarser grid can only make the floor check stricter (PLD
higher), never let an under-claim through.

The comparison rule (`cross_check`)
-----------------------------------
The record's claimed epsilon (its chosen accountant's, "prv" or "rdp") is compared with Google's
number of the same kind: PLD for a PRV claim, RDP for an RDP claim. With tolerance
`tol = max(slack * reference, MIN_SLACK)` (relative `slack`, default `DEFAULT_SLACK = 0.02`):

1. the claim must not be below Google's PLD by more than `tol` (Google's PLD is an upper bound on
   the true epsilon, so a claim below it under-states the privacy loss: the dangerous direction);
2. the claim must be within `tol` of Google's same-kind number in both directions (a claim far above
   is not unsafe, but it means the record's epsilon does not belong to its settings, e.g. a step
   count that was not the one accounted for).

Why 2% and 0.02: over the grid (q in {0.004, 0.04, 0.125}, T in {8, 125, 1000}, sigma calibrated
with RDP to epsilon 1, 3, 8, delta = 1e-5; `python -m dpnb.privacy.independent_accounting` prints it),
Opacus PRV minus Google PLD was +0.008 to +0.011 in epsilon: an absolute gap (PRV reports the upper
end of its 0.01-wide interval; PLD is within 1.6e-3 of its limit), 0.14% at epsilon ~7 but
5.5% at epsilon 0.18, hence the absolute floor `MIN_SLACK = 0.02`. Opacus RDP and Google RDP
differed by at most 0.13% (same formulas, different series numerics). So an honest record passes
with a margin of 2x or more, leaving room for other platforms' floating point. The errors it must
catch are far larger: a 20% under-claim; halving the steps (epsilon falls by 9-33% in the grid) or
doubling them (it rises by 9-52%). A tighter slack would buy little; a looser one (above ~8%) would
miss a halved or doubled step count at small q and few steps.

One exception, for RDP claims only: dp_accounting gives up on fractional RDP orders near 1 at small
sigma (it warns and excludes them), which only raises its RDP epsilon. When an excluded order is next
to its optimum (large epsilon: e.g. sigma = 0.5, q = 0.125, T = 125 gives Google RDP 54.7 against
Opacus RDP 47.3), Google's RDP is no reference from below, and a claim below it passes if it is
above the PLD floor (it is then still a valid bound); the note says so.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

from dpnb.errors import DpnbError, require
from dpnb.privacy.accounting import calibrate_noise, epsilon_spent

PLD_DISCRETIZATION = 1e-3  # PLD grid spacing in privacy loss up to PLD_REFERENCE_STEPS; pessimistic
PLD_REFERENCE_STEPS = 1000  # beyond it the spacing shrinks as 1/sqrt(T): the error grows as spacing^2 * T
DEFAULT_SLACK = 0.02  # relative tolerance, claim vs Google (measured: PRV-PLD +0.008..0.011, RDP <= 0.13%)
MIN_SLACK = 0.02  # absolute floor on the tolerance: PRV's own error interval is 0.01 wide

GOOGLE_KIND = {"prv": "pld", "rdp": "rdp"}  # the Google number each Opacus accountant is compared with


class _CollectWarnings(logging.Filter):
    """Keeps (and silences) absl's warnings, e.g. RDP orders excluded after a failed series."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


def _check_settings(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    require(
        isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0 and math.isfinite(noise_multiplier),
        f"the noise multiplier must be a positive number, got {noise_multiplier!r}",
    )
    require(isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1,
            f"the sample rate must be in (0, 1], got {sample_rate!r}")
    require(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0,
            f"steps must be a non-negative integer, got {steps!r}")
    require(isinstance(delta, (int, float)) and 0 < delta < 1, f"delta must be in (0, 1), got {delta!r}")


def pld_discretization(steps: int) -> float:
    """The PLD grid spacing for `steps` compositions: `PLD_DISCRETIZATION`, shrunk as 1/sqrt(T) past 1,000."""
    return PLD_DISCRETIZATION * min(1.0, math.sqrt(PLD_REFERENCE_STEPS / max(steps, 1)))


def google_epsilons(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> dict[str, Any]:
    """Epsilon after `steps` Poisson-subsampled Gaussian steps (sigma, q) at delta, by Google's dp_accounting.

    Returns `{"pld", "rdp", "rdp_order", "rdp_excluded_orders", "rdp_reliable", "seconds", "warnings"}`:
    the two epsilons, RDP's optimal order, the orders it could not evaluate and whether that can have
    raised its epsilon (`_rdp_order_report`), seconds per accountant, and dp_accounting's log warnings.
    The event is `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)` under
    add/remove-one adjacency; PLD at `pld_discretization(steps)` (pessimistic), RDP at Google's default
    orders. `sample_rate = 1` is the same event without subsampling (every step sees all data); zero
    steps spend nothing (epsilon 0.0; dp_accounting itself refuses a count of 0).

    Cost (shared 2-core CPU): PLD 0.02-0.6 s, RDP 0.02-0.3 s in the grid; PLD grows as sigma shrinks.
    """
    return google_epsilons_of([(noise_multiplier, sample_rate, steps)], delta)


def google_epsilons_of(history: list[tuple[float, float, int]], delta: float) -> dict[str, Any]:
    """`google_epsilons` of several mechanisms composed (`dpnb.privacy.composition`): one ComposedDpEvent of each
    (sigma, q, steps)'s self-composed Poisson-subsampled Gaussian event, PLD at the total step count's spacing."""
    for sigma, rate, count in history:
        _check_settings(sigma, rate, count, delta)
    history = [(float(sigma), float(rate), int(count)) for sigma, rate, count in history if count > 0]
    if not history:
        return {"pld": 0.0, "rdp": 0.0, "rdp_order": None, "rdp_excluded_orders": [], "rdp_reliable": True,
                "seconds": {"pld": 0.0, "rdp": 0.0}, "warnings": []}
    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), count)
        for sigma, rate, count in history]
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    steps = sum(count for _, _, count in history)
    noise_multiplier, sample_rate = history[0][0], history[0][1]  # named in errors
    accountants = {
        "pld": pld.PLDAccountant(value_discretization_interval=pld_discretization(steps)),
        "rdp": rdp.RdpAccountant(),
    }
    result: dict[str, Any] = {"seconds": {}}
    collector = _CollectWarnings()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(collector)
    try:
        for name, accountant in accountants.items():
            start = time.perf_counter()
            try:
                accountant.compose(event)
                if name == "rdp":
                    epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
                    result.update(rdp=float(epsilon), **_rdp_order_report(accountant, float(order)))
                else:
                    result[name] = float(accountant.get_epsilon(delta))
            except (ValueError, RuntimeError, FloatingPointError, MemoryError) as exc:
                raise DpnbError(
                    f"Google's {name.upper()} accountant could not compute epsilon for sigma = "
                    f"{noise_multiplier:.4g}, q = {sample_rate:.4g}, {steps} steps, delta = {delta:.3g} ({exc})"
                ) from None
            result["seconds"][name] = time.perf_counter() - start
    finally:
        absl_logger.removeFilter(collector)
    result["warnings"] = collector.messages
    return result


def _rdp_order_report(accountant: Any, optimal_order: float) -> dict[str, Any]:
    """Which RDP orders dp_accounting could not evaluate, and whether that can have moved its epsilon.

    dp_accounting sums a series for fractional orders and gives up (infinite RDP, order excluded) after
    1,000 terms; this happens at small sigma for orders near 1. Excluding orders can only raise its
    epsilon. Epsilon is unimodal in the order in practice, so an excluded order matters only when it is
    next to the optimal order found (e.g. sigma = 0.5, q = 0.125, T = 125: optimum 1.7 next to the
    excluded 1.1-1.6, Google RDP 54.7 against Opacus RDP 47.3); otherwise (the grid's cases: 1.1-1.6
    excluded, optimum 2.9-3.3) Google's RDP is reliable.
    """
    orders, values = list(accountant.orders), list(accountant.rdp)
    excluded = [float(o) for o, v in zip(orders, values, strict=True) if not math.isfinite(v)]
    reliable = True
    if excluded and optimal_order in orders:
        i = orders.index(optimal_order)
        neighbours = values[max(i - 1, 0):i + 2]
        reliable = all(math.isfinite(v) for v in neighbours)
    elif excluded:
        reliable = False
    return {"rdp_order": optimal_order, "rdp_excluded_orders": excluded, "rdp_reliable": reliable}


def _tolerance(reference: float, slack: float) -> float:
    return max(slack * abs(reference), MIN_SLACK)


def cross_check(privacy_record: dict[str, Any], slack: float = DEFAULT_SLACK) -> dict[str, Any]:
    """Compare a privacy.json record's epsilon with Google's PLD and RDP for the same settings.

    The claim (`epsilon`, from the record's `accountant`, "prv" or "rdp") passes when it is not below
    Google's PLD by more than the tolerance (an under-claim) and is within the tolerance of Google's
    number of the same kind (PLD for PRV, RDP for RDP); tolerance = max(slack * reference, MIN_SLACK),
    `slack` relative (default 2%; the module docstring gives the measurements behind it). An RDP claim
    below a Google RDP that is loose (orders it could not evaluate next to its optimum) passes if it is
    above the PLD floor, with a note. The other entries of the record's `epsilons` ("prv", "rdp") are
    checked by the same rule and reported under `others`; any failure fails the whole check.

    Returns `{"dp", "accountant", "opacus", "google_pld", "google_rdp", "reference", "difference",
    "slack", "tolerance", "agrees", "others", "note"}`, where `difference = opacus - reference`.
    Raises DpnbError when the claim disagrees beyond the tolerance. A non-DP record (`dp` false) has
    nothing to check: `agrees` is None and the note says so.
    """
    require(isinstance(slack, (int, float)) and 0 <= slack < 1, f"slack must be a fraction in [0, 1), got {slack!r}")
    if not privacy_record.get("dp", True):
        return {"dp": False, "accountant": None, "opacus": None, "google_pld": None, "google_rdp": None,
                "reference": None, "difference": None, "slack": slack, "tolerance": None, "agrees": None,
                "others": {}, "note": "trained without DP (dp = false): there is no epsilon to cross-check"}
    composed = bool(privacy_record.get("mechanisms"))
    needed = ("delta", "accountant", "epsilon") if composed else (
        "noise_multiplier", "sample_rate", "steps", "delta", "accountant", "epsilon")
    missing = [k for k in needed if privacy_record.get(k) is None]
    require(not missing, f"privacy record lacks {', '.join(missing)}; it was not written by dpnb finetune")
    accountant = str(privacy_record["accountant"])
    require(accountant in GOOGLE_KIND, f"privacy record's accountant {accountant!r} cannot be cross-checked; "
            f"only {', '.join(GOOGLE_KIND)} give a guarantee")
    history = _history(privacy_record)
    delta = float(privacy_record["delta"])
    google = google_epsilons_of(history, delta)
    sigma, rate, steps = history[0] if len(history) == 1 else (float("nan"), float("nan"), sum(h[2] for h in history))

    claims = {accountant: float(privacy_record["epsilon"])}
    for name, value in (privacy_record.get("epsilons") or {}).items():
        if name in GOOGLE_KIND and name != accountant and value is not None:
            claims[name] = float(value)
    verdicts = {name: _judge(name, claim, google, slack) for name, claim in claims.items()}
    main = verdicts[accountant]
    others = {name: verdict for name, verdict in verdicts.items() if name != accountant}
    notes = [main["note"]] + [f"epsilons.{name}: {v['note']}" for name, v in others.items() if not v["agrees"]]
    result = {
        "dp": True, "accountant": accountant, "opacus": main["claim"], "google_pld": google["pld"],
        "google_rdp": google["rdp"], "reference": main["reference"], "difference": main["difference"],
        "slack": slack, "tolerance": main["tolerance"], "agrees": all(v["agrees"] for v in verdicts.values()),
        "others": others, "note": "; ".join(notes),
    }
    if not result["agrees"]:
        raise DpnbError(
            f"privacy record's epsilon disagrees with Google's dp_accounting for sigma = {sigma:.6g}, "
            f"q = {rate:.6g}, {steps} steps, delta = {delta:.3g}: {result['note']}. Do not publish this epsilon: "
            f"check that the record's settings are the ones the run used (rerun the finetune stage)"
        )
    return result


def _history(privacy_record: dict[str, Any]) -> list[tuple[float, float, int]]:
    """The (sigma, q, steps) of every mechanism a record states (one, or a composed record's list)."""
    mechanisms = privacy_record.get("mechanisms") or [privacy_record]
    history = []
    for m in mechanisms:
        steps = m["steps"]
        require(isinstance(steps, int) or (isinstance(steps, float) and steps.is_integer()),
                f"privacy record's steps must be a whole number, got {steps!r}")
        history.append((float(m["noise_multiplier"]), float(m["sample_rate"]), int(steps)))
    return history


def _judge(accountant: str, claim: float, google: dict[str, Any], slack: float) -> dict[str, Any]:
    """One claimed epsilon against Google: the PLD floor and the same-kind two-sided band."""
    kind = GOOGLE_KIND[accountant]
    reference, floor = google[kind], google["pld"]
    tolerance, floor_tolerance = _tolerance(reference, slack), _tolerance(floor, slack)
    difference = claim - reference
    label = f"{accountant.upper()} {claim:.4f} vs Google {kind.upper()} {reference:.4f}"
    if not math.isfinite(claim):
        agrees = False
        note = f"{accountant.upper()} epsilon {claim!r} is not a finite number: the record states no guarantee"
    elif claim < floor - floor_tolerance:
        agrees = False
        note = (f"UNDER-CLAIM: {accountant.upper()} epsilon {claim:.4f} is below Google's PLD {floor:.4f} (an upper "
                f"bound on the true epsilon, tight to ~2e-3) by {floor - claim:.4f} > tolerance {floor_tolerance:.4f}")
    elif kind == "rdp" and difference < -tolerance and not google["rdp_reliable"]:
        agrees = True  # Google's RDP is loose here; the PLD floor above is what guards the claim
        note = (f"{label}: the claim is {-difference:.4f} below Google's RDP, which is loose here (dp_accounting "
                f"could not evaluate orders {_orders_text(google['rdp_excluded_orders'])}, next to its optimum "
                f"{google['rdp_order']:g}); the claim is above Google's PLD {floor:.4f}, so it is a valid bound")
    elif abs(difference) > tolerance:
        agrees = False
        direction = "above" if difference > 0 else "below"
        note = (f"{label}: the claim is {abs(difference):.4f} {direction} Google's, beyond the tolerance "
                f"{tolerance:.4f}; the record's epsilon does not belong to its settings")
    else:
        agrees = True
        note = f"{label}: difference {difference:+.4f} within tolerance {tolerance:.4f}"
    return {"claim": claim, "reference": reference, "difference": difference, "tolerance": tolerance,
            "agrees": agrees, "note": note}


def _orders_text(orders: list[float]) -> str:
    return f"{orders[0]:g}-{orders[-1]:g}" if len(orders) > 2 else ", ".join(f"{o:g}" for o in orders)


# --------------------------------------------------------------------------- comparison table


def comparison_table(qs: tuple[float, ...] = (0.004, 0.04, 0.125), step_counts: tuple[int, ...] = (8, 125, 1000),
                     target_epsilons: tuple[float, ...] = (1.0, 3.0, 8.0), delta: float = 1e-5) -> list[dict[str, Any]]:
    """Opacus PRV/RDP against Google PLD/RDP over a grid, with timings (slow: 1-2 minutes; not for tests).

    sigma is calibrated with Opacus's RDP (`dpnb.privacy.accounting.calibrate_noise(..., "rdp")`) so that RDP's
    epsilon is the target; PLD and PRV then come out 10-50% lower. Settings where PRV would need too
    large a grid report PRV as None.
    """
    rows = []
    for q in qs:
        for steps in step_counts:
            for target in target_epsilons:
                row: dict[str, Any] = {"q": q, "steps": steps, "target": target}
                try:
                    sigma = calibrate_noise(target, delta, q, steps, "rdp")
                except DpnbError as exc:
                    row["error"] = str(exc)
                    rows.append(row)
                    continue
                row["sigma"] = sigma
                for name in ("prv", "rdp"):
                    start = time.perf_counter()
                    try:
                        row[f"opacus_{name}"] = epsilon_spent(sigma, q, steps, delta, name)
                    except DpnbError:
                        row[f"opacus_{name}"] = None
                    row[f"t_opacus_{name}"] = time.perf_counter() - start
                google = google_epsilons(sigma, q, steps, delta)
                row.update(google_pld=google["pld"], google_rdp=google["rdp"], t_google_pld=google["seconds"]["pld"],
                           t_google_rdp=google["seconds"]["rdp"], warnings=len(google["warnings"]))
                for factor in (0.5, 2):
                    changed = max(1, round(steps * factor))
                    row[f"google_pld_steps_x{factor}"] = google_epsilons(sigma, q, changed, delta)["pld"]
                rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of `comparison_table` as fixed-width text."""
    def num(value: Any, fmt: str = ".4f") -> str:
        return "-" if value is None else format(value, fmt)

    header = (f"{'q':>6} {'T':>5} {'sigma':>7} | {'PRV':>9} {'G-PLD':>9} {'PRV-PLD':>8} {'rel%':>6} | "
              f"{'O-RDP':>9} {'G-RDP':>9} {'rel%':>6} | {'PLD T/2':>8} {'PLD 2T':>8} | "
              f"{'tPRV':>5} {'tPLD':>5} {'tORDP':>5} {'tGRDP':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['q']:>6} {r['steps']:>5} target {r['target']}: {r['error'][:80]}")
            continue
        prv, pld, ordp, grdp = r["opacus_prv"], r["google_pld"], r["opacus_rdp"], r["google_rdp"]
        gap = None if prv is None else prv - pld
        rel = None if prv is None else 100 * gap / pld
        rel_rdp = 100 * (ordp - grdp) / grdp
        lines.append(
            f"{r['q']:>6} {r['steps']:>5} {r['sigma']:>7.4f} | {num(prv):>9} {pld:>9.4f} {num(gap, '+.4f'):>8} "
            f"{num(rel, '+.2f'):>6} | {ordp:>9.4f} {grdp:>9.4f} {rel_rdp:>+6.2f} | "
            f"{r['google_pld_steps_x0.5']:>8.3f} {r['google_pld_steps_x2']:>8.3f} | {r['t_opacus_prv']:>5.2f} "
            f"{r['t_google_pld']:>5.2f} {r['t_opacus_rdp']:>5.2f} {r['t_google_rdp']:>5.2f}"
            + (f"  ({r['warnings']} absl warnings)" if r["warnings"] else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m dpnb.privacy.independent_accounting: the grid behind DEFAULT_SLACK
    print(format_table(comparison_table()))
