"""How much privacy a DP-SGD run spends: sampling rate, step counts, noise calibration, accounting.

The record that states a guarantee (privacy.json) is `dpnb.privacy.guarantee`; the plan of a
fine-tuning run, which feeds these functions its N, batch size, epochs and target, is
`dpnb.training.plan`.

The mechanism
-------------
DP-SGD repeats one step `T` times. Each step is the *Poisson-subsampled Gaussian mechanism*:

1. every one of the `N` training records joins the batch independently with probability `q`
   (the sample rate), so batch sizes vary, with mean `N q`;
2. each record's gradient is clipped to norm at most `C` (`max_grad_norm`);
3. the clipped gradients are summed and Gaussian noise `N(0, sigma^2 C^2 I)` is added, where `sigma`
   is the noise multiplier; the result is divided by the expected batch size `N q`.

A randomised algorithm `M` is (epsilon, delta)-differentially private when, for any two data sets
`D, D'` that differ in one record and any set of outcomes `S`,

    P[M(D) in S] <= exp(epsilon) * P[M(D') in S] + delta.

In words: whether any one record was in the data changes the probability of anything an attacker
can observe by a factor of at most `e^epsilon`, except with probability `delta`.

What sets epsilon
-----------------
Epsilon after `T` steps is a function of `(sigma, q, T, delta)` only: the model, the data and the
clipping norm do not enter (clipping makes `C` the sensitivity, and the noise scales with it).
More noise (larger `sigma`) lowers epsilon; more steps and larger `q` raise it.

An *accountant* turns `(sigma, q, T)` into epsilon at a given delta. All of them here are Opacus's:

- `rdp`: Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019). Composes the Renyi divergence of
  each step exactly (`T` times the one-step value at each order alpha), then converts to
  (epsilon, delta) with a bound that is loose by a margin: a valid upper bound, not a tight one.
- `prv`: privacy loss random variables (Gopi, Lee, Wutschitz 2021). Discretises the distribution
  of the privacy loss and composes it numerically with FFTs; reports the upper end of an error
  interval of width `PRV_EPS_ERROR`. A valid upper bound and usually 5-15% below RDP's.
- `gdp`: Gaussian DP via the central limit theorem (Dong, Roth, Su 2019). An approximation that
  can *under*-estimate epsilon; shown in the teaching notebook for comparison, never used to
  calibrate or to report a guarantee.

Why delta must be well below 1/N
--------------------------------
The mechanism "publish one record chosen at random" is (0, 1/N)-DP, yet it leaks a whole record.
So delta >= 1/N permits a total breach of some record; the usual choice is `delta = 1 / N^1.1`
(`default_delta`), just below 1/N.

Sampling rate and step counts
-----------------------------
Opacus's `DPDataLoader.from_data_loader` sets `q = 1 / len(data_loader)`, i.e. `1 / ceil(N / B)`
for a loader of batch size `B` without `drop_last`: the expected batch is `N q`, which is at most
`B` (for N = 25,000 and B = 1028: q = 1/25 and an expected batch of 1,000). One epoch is
`len(DPDataLoader) = int(1 / q)` steps (Opacus's own float arithmetic). Functions here return exactly
those numbers so the accountant sees what the loop does.

For some batch counts k = ceil(N / B) that float arithmetic loses one: `1 / (1 / k)` rounds to just
below k and `int` gives k - 1 (k = 93, 99, 105, 117, 123, 186, ...; about 6% of the k up to 200,000).
The sampler then draws at q = 1 / k while `make_private` hands the accountant 1 / len(DPDataLoader) =
1 / (k - 1) and divides by int(N / (k - 1)): a mechanism other than the one accounted.
`poisson_sample_rate` refuses such a logical batch size in planning, before any model is loaded,
naming the nearest sizes that work (`opacus_counts_epoch`); it never adjusts the size silently.

PRV cost
--------
The PRV accountant's cost grows with its grid, about `sqrt(T)` times the range of the privacy
loss, which grows as `sigma` shrinks. Measured on a shared 2-core CPU: 0.3-0.6 s per epsilon at
the paper's setting (q = 0.04, T = 125, sigma ~ 0.66), 1-2 s at T = 1,000, ~3 s at T = 2,000,
5-11 s at T = 5,000 (0.6 GB), ~30 s at T = 20,000 (18 M points); sigma = 0.05 at T = 125 needs
167 M points and runs out of memory. Every PRV call here first checks the grid against
`MAX_PRV_GRID` (the check itself costs ~0.15 s) and raises a `DpnbError` that suggests the RDP
accountant instead of exhausting memory. RDP costs ~0.1-0.15 s per call regardless of `T`, and
`EpsilonTracker` makes it ~4 ms per step. Calibration takes ~3-5 s (RDP or PRV, T = 125).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
from opacus.accountants.utils import get_noise_multiplier

from dpnb.errors import DpnbError, require

ACCOUNTANTS = ("rdp", "prv")  # accountants that may calibrate noise and report a guarantee
ALL_ACCOUNTANTS = ("rdp", "prv", "gdp")  # gdp only for comparison: it can under-estimate epsilon

# PRV settings, used by every call in this package so that a recomputation takes the same path and
# gives the same number. They are Opacus's own defaults, so `PrivacyEngine.get_epsilon(delta)` on a
# PRV accountant with the same history returns the same value too.
PRV_EPS_ERROR = 0.01  # width of PRV's error interval on epsilon; the upper end is reported
PRV_DELTA_ERROR_DIVISOR = 1000  # PRV's delta_error = delta / this, written as Opacus's default is
MAX_PRV_GRID = 12_000_000  # grid points (~170 bytes each at peak): above this PRV is refused (~2 GB)

MAX_NOISE_MULTIPLIER = 1e6  # as in Opacus's get_noise_multiplier: beyond it the budget is unreachable


# --------------------------------------------------------------------------- delta


def default_delta(n: int) -> float:
    """The default delta for `n` records: `1 / n^1.1`, a little below the 1/n that allows a full leak."""
    require(isinstance(n, int) and n >= 1, f"the data set size must be a positive integer, got {n!r}")
    return 1.0 / n**1.1


def validate_delta(delta: float, n: int) -> None:
    """Refuse a delta that permits leaking a whole record: 0 < delta < 1/n is required."""
    require(n >= 1, f"the data set size must be a positive integer, got {n!r}")
    require(
        isinstance(delta, (int, float)) and 0 < delta < 1,
        f"delta must be a number in (0, 1), got {delta!r}; leave it unset for the default 1/N^1.1 "
        f"= {default_delta(n):.3g}",
    )
    require(
        delta < 1.0 / n,
        f"delta = {delta:.3g} is not below 1/N = {1.0 / n:.3g} for N = {n} records: with delta >= 1/N "
        f"a mechanism that publishes a whole random record is 'private'; use a smaller delta, e.g. the "
        f"default 1/N^1.1 = {default_delta(n):.3g}",
    )


# --------------------------------------------------------------------------- sampling and steps


def poisson_sample_rate(n: int, logical_batch_size: int) -> float:
    """The sample rate q that `DPDataLoader.from_data_loader` uses for `n` records and batch size B.

    Opacus sets `q = 1 / len(data_loader)`; a DataLoader with `drop_last=False` has `ceil(n / B)`
    batches, so `q = 1 / ceil(n / B)` and the expected batch size `n q` is at most B. A batch count
    Opacus would turn into another step count (`opacus_counts_epoch`) is refused, with the nearest
    logical batch sizes that work.
    """
    require(isinstance(n, int) and n >= 1, f"the data set size must be a positive integer, got {n!r}")
    require(
        isinstance(logical_batch_size, int) and logical_batch_size >= 1,
        f"logical_batch_size must be a positive integer, got {logical_batch_size!r}",
    )
    require(
        logical_batch_size <= n,
        f"logical_batch_size ({logical_batch_size}) is larger than the data set ({n} records); "
        f"use a logical_batch_size of at most {n}",
    )
    batches = math.ceil(n / logical_batch_size)
    if not opacus_counts_epoch(batches):
        below, above = (_nearest_working_batch_size(n, logical_batch_size, step) for step in (-1, 1))
        fixes = " or ".join(str(b) for b in (below, above) if b is not None)
        raise DpnbError(
            f"logical_batch_size {logical_batch_size} over {n} records makes {batches} batches per epoch, a count "
            f"Opacus's float arithmetic turns into {int(1 / (1 / batches))} (int(1 / (1 / {batches}))): it would "
            f"sample at q = 1/{batches} but account q = 1/{batches - 1}; use logical_batch_size {fixes}"
        )
    return 1.0 / batches


def opacus_counts_epoch(batches: int) -> bool:
    """Whether Opacus gets `batches` back from q = 1 / batches: `int(1 / (1 / k)) == k` in float64.

    `DPDataLoader.from_data_loader` sets q = 1 / k for a loader of k batches, its sampler runs
    int(1 / q) steps, and `make_private` accounts 1 / len(DPDataLoader) and divides by
    int(N / len(DPDataLoader)): all three agree exactly when this holds (false for k = 93, 99, 105, ...).
    """
    return int(1 / (1 / batches)) == batches


def _nearest_working_batch_size(n: int, logical_batch_size: int, step: int) -> int | None:
    """The nearest logical batch size below (`step` -1) or above (+1) whose batch count Opacus keeps."""
    size = logical_batch_size + step
    while 1 <= size <= n:
        if opacus_counts_epoch(math.ceil(n / size)):
            return size
        size += step
    return None


def steps_per_epoch(n: int, logical_batch_size: int) -> int:
    """Logical steps in one pass of the DPDataLoader: `len(DPDataLoader) = int(1 / q)`, as Opacus computes it."""
    return int(1 / poisson_sample_rate(n, logical_batch_size))


def planned_steps(n: int, logical_batch_size: int, epochs: float, max_steps: int | None = None) -> int:
    """Noise-adding steps a run takes: `ceil(epochs * steps_per_epoch)`, capped by `max_steps`.

    A fractional epoch is rounded up to whole steps (0.5 epoch of 25 steps is 13 steps), and the
    noise is calibrated for exactly this count. The product is rounded to 9 decimals before the
    ceiling so that float error (0.1 * 30 = 3.0000000000000004) does not add a step.
    """
    require(
        isinstance(epochs, (int, float)) and epochs > 0 and math.isfinite(epochs),
        f"epochs must be a positive number, got {epochs!r}",
    )
    steps = math.ceil(round(epochs * steps_per_epoch(n, logical_batch_size), 9))
    if max_steps is not None:
        require(isinstance(max_steps, int) and max_steps >= 1, f"max_steps must be a positive integer or None, "
                f"got {max_steps!r}")
        steps = min(steps, max_steps)
    return max(steps, 1)


# --------------------------------------------------------------------------- accountants


def check_mechanism(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str,
                     allowed: Sequence[str] = ALL_ACCOUNTANTS) -> None:
    require(accountant in allowed, f"unknown accountant {accountant!r}; use one of {', '.join(allowed)}")
    require(
        isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0 and math.isfinite(noise_multiplier),
        f"the noise multiplier must be a positive number, got {noise_multiplier!r}",
    )
    require(
        isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1,
        f"the sample rate must be in (0, 1], got {sample_rate!r}",
    )
    require(isinstance(steps, int) and steps >= 0, f"steps must be a non-negative integer, got {steps!r}")
    require(isinstance(delta, (int, float)) and 0 < delta < 1, f"delta must be in (0, 1), got {delta!r}")


def new_accountant(name: str):
    """A fresh Opacus accountant ("rdp", "prv" or "gdp"; gdp's experimental-warning silenced)."""
    require(name in ALL_ACCOUNTANTS, f"unknown accountant {name!r}; use one of {', '.join(ALL_ACCOUNTANTS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GaussianAccountant warns on construction; the docs say why
        return create_accountant(mechanism=name)


def prv_grid_size(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> int:
    """Points of the grid Opacus's PRV accountant would discretise the privacy loss on (its memory cost).

    Uses the accountant's own domain computation, so the figure is exact, at the cost of two RDP
    evaluations (~0.3 s).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" hint
        domain = PRVAccountant()._get_domain(
            prvs=[PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)],
            num_self_compositions=[steps],
            eps_error=PRV_EPS_ERROR,
            delta_error=delta / PRV_DELTA_ERROR_DIVISOR,
        )
    return int(domain.size)


def check_prv_feasible(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    """Refuse a PRV computation whose grid would exceed `MAX_PRV_GRID` (slow, and gigabytes of memory)."""
    size = prv_grid_size(noise_multiplier, sample_rate, steps, delta)
    if size > MAX_PRV_GRID:
        raise DpnbError(
            f"the PRV accountant needs a grid of {size:,} points (about {size * 170 / 2**30:.1f} GB) for "
            f"sigma = {noise_multiplier:.4g}, q = {sample_rate:.4g}, {steps} steps; use accountant 'rdp', "
            f"or fewer steps / a larger noise multiplier (limit: dpnb.privacy.accounting.MAX_PRV_GRID = "
            f"{MAX_PRV_GRID:,})"
        )


def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon from a fresh Opacus accountant with history [(sigma, q, steps)]; no checks (see epsilon_spent)."""
    if steps == 0:
        return 0.0
    acc = new_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return accountant_epsilon(acc, delta)


def accountant_epsilon(acc: Any, delta: float) -> float:
    """Epsilon of an accountant's history at delta, with this package's fixed PRV settings."""
    settings = {}
    if acc.mechanism() == "prv":
        settings = {"eps_error": PRV_EPS_ERROR, "delta_error": delta / PRV_DELTA_ERROR_DIVISOR}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" hint
            return float(acc.get_epsilon(delta, **settings))
    except (ValueError, RuntimeError, FloatingPointError) as exc:
        raise DpnbError(
            f"the {acc.mechanism()} accountant could not compute epsilon for history {acc.history} at "
            f"delta = {delta:.3g} ({exc}); use accountant 'rdp', or a larger noise multiplier or delta"
        ) from None


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "prv") -> float:
    """Epsilon after `steps` steps of the Poisson-subsampled Gaussian mechanism (sigma, q), at delta.

    Computed by a fresh Opacus accountant with history `[(sigma, q, steps)]`, exactly as its
    `get_epsilon` would after `steps` calls to `step`; 0.0 for zero steps. PRV uses `PRV_EPS_ERROR`
    and refuses grids above `MAX_PRV_GRID`.
    """
    check_mechanism(noise_multiplier, sample_rate, steps, delta, accountant)
    if steps == 0:
        return 0.0
    if accountant == "prv":
        check_prv_feasible(noise_multiplier, sample_rate, steps, delta)
    return _epsilon(noise_multiplier, sample_rate, steps, delta, accountant)


# --------------------------------------------------------------------------- calibration


def epsilon_tolerance(target_epsilon: float, accountant: str) -> float:
    """How far below the target the calibrated epsilon may land.

    0.2% of the target, at most Opacus's default 0.01. PRV's reported epsilon moves in steps of
    about its grid spacing (at most ~0.004), so its tolerance stays above 0.005: a bisection
    with a finer tolerance could chase a value the discretisation never produces.
    """
    floor = 0.005 if accountant == "prv" else 1e-4
    return min(0.01, max(0.002 * target_epsilon, floor))


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv") -> float:
    """The constant noise multiplier sigma whose epsilon after exactly `steps` steps is at most the target.

    Epsilon falls as sigma grows, so a one-dimensional search on sigma finds the smallest sigma whose
    epsilon is within a small tolerance below the target (`epsilon_tolerance`; 0.2% of it, at most
    0.01; 0.005 at least for PRV).

    - RDP: Opacus's `get_noise_multiplier(steps=...)`.
    - PRV: Opacus's `get_noise_multiplier` bisects from sigma in [0, 20] with an unbounded loop; on
      PRV that can visit sigmas whose grid needs gigabytes, and it need not stop when the
      tolerance is finer than PRV's discretisation. So the RDP answer (whose PRV epsilon is below
      the target, PRV being the tighter bound) is the upper end of a bracket, 0.8 times it the
      lower end (each widened if needed), the grid is checked once at the lower end, and a
      false-position search of at most 60 steps runs on the same PRV computation as
      `epsilon_spent`, keeping an upper end whose epsilon is at most the target throughout.

    The returned sigma's epsilon is recomputed by `epsilon_spent` and is never above the target.
    Remembered (`lru_cache`): a function of its five numbers that takes seconds, asked again when a run
    resumes or trains twice in one process (the audit's twins, torchrun's check before training).
    """
    require(accountant in ACCOUNTANTS, f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
    require(
        isinstance(target_epsilon, (int, float)) and target_epsilon > 0 and math.isfinite(target_epsilon),
        f"target epsilon must be a positive number, got {target_epsilon!r}",
    )
    require(isinstance(steps, int) and steps >= 1, f"steps must be a positive integer, got {steps!r}")
    require(
        isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1,
        f"the sample rate must be in (0, 1], got {sample_rate!r}",
    )
    require(isinstance(delta, (int, float)) and 0 < delta < 1, f"delta must be in (0, 1), got {delta!r}")

    tolerance = epsilon_tolerance(target_epsilon, accountant)
    if accountant == "rdp":
        sigma = _calibrate_rdp(target_epsilon, delta, sample_rate, steps, tolerance)
    else:  # a coarse RDP answer is enough for the bracket (each RDP evaluation costs ~0.15 s)
        bracket = _calibrate_rdp(target_epsilon, delta, sample_rate, steps, 0.05 * target_epsilon)
        sigma = _calibrate_prv(target_epsilon, delta, sample_rate, steps, tolerance, bracket)
    epsilon = epsilon_spent(sigma, sample_rate, steps, delta, accountant)
    if epsilon > target_epsilon:  # cannot happen with a monotone accountant; never hand out such a sigma
        raise RuntimeError(f"calibrated sigma = {sigma} gives epsilon {epsilon} above the target {target_epsilon}")
    return sigma


def _calibrate_rdp(target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float) -> float:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                accountant="rdp", epsilon_tolerance=tolerance,
            ))
    except ValueError:  # "The privacy budget is too low."
        raise DpnbError(
            f"epsilon = {target_epsilon:g} at delta = {delta:.3g} is out of reach for {steps} steps at sample "
            f"rate {sample_rate:.4g} even with noise multiplier {MAX_NOISE_MULTIPLIER:g}; raise target_epsilon "
            f"or take fewer steps"
        ) from None


def _calibrate_prv(target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float,
                   sigma_rdp: float, max_iterations: int = 60) -> float:
    """The PRV noise multiplier, searched inside [0.8 sigma_rdp, sigma_rdp] (widened if ever needed).

    PRV's sigma is typically 5-10% below RDP's (and the coarse RDP answer is at most a few percent
    above RDP's exact one), so the bracket is narrow. Inside it, log epsilon is close to linear in
    log sigma, so false position on that scale (Illinois variant: an end that stays put twice has its
    weight halved, which keeps convergence fast) needs 3-5 PRV evaluations where bisection needs ~10.
    """
    def excess(log_sigma: float) -> tuple[float, float]:  # (log epsilon - log target, epsilon)
        eps = _epsilon(math.exp(log_sigma), sample_rate, steps, delta, "prv")
        return math.log(max(eps, 1e-300)) - math.log(target_epsilon), eps

    high = sigma_rdp
    f_high, eps_high = excess(math.log(high))
    while f_high > 0:  # PRV above RDP would be unusual; widen upwards to stay valid
        high *= 2
        require(high <= MAX_NOISE_MULTIPLIER, f"epsilon = {target_epsilon:g} is out of reach with PRV accounting")
        f_high, eps_high = excess(math.log(high))
    low = 0.8 * high
    check_prv_feasible(low, sample_rate, steps, delta)  # the grid is largest at the smallest sigma visited
    while (found := excess(math.log(low)))[0] <= 0:  # PRV far below RDP: widen downwards
        high, (f_high, eps_high), low = low, found, 0.8 * low
        check_prv_feasible(low, sample_rate, steps, delta)
    a, f_a, b, f_b = math.log(low), found[0], math.log(high), f_high  # f_a > 0 >= f_b
    kept = 0  # +1: the low end stayed put last time, -1: the high end did
    for _ in range(max_iterations):
        if target_epsilon - eps_high <= tolerance or b - a <= 1e-9:
            break
        c = b - f_b * (b - a) / (f_b - f_a)
        c = min(max(c, a + 0.02 * (b - a)), b - 0.02 * (b - a))  # stay strictly inside the bracket
        f_c, eps_c = excess(c)
        if f_c <= 0:
            b, f_b, eps_high = c, f_c, eps_c
            f_a = f_a / 2 if kept == 1 else f_a
            kept = 1
        else:
            a, f_a = c, f_c
            f_b = f_b / 2 if kept == -1 else f_b
            kept = -1
    return math.exp(b)


# --------------------------------------------------------------------------- per-step epsilon


@dataclass
class EpsilonTracker:
    """Epsilon after each logical step of one run (constant sigma and q), cheap enough to call every step.

    `epsilon(t)` is the chosen accountant's epsilon after t steps, computed once and cached. With
    `exact_every = k > 1`, only steps that are multiples of k (and `planned_steps`) are computed;
    another step t reports the epsilon of the next such step g >= t. That is still a valid guarantee
    for t steps, not an estimate: the first t steps' outputs are a function of the first g steps'
    outputs, and post-processing cannot increase privacy loss. `is_exact(t)` says which it is.
    A final guarantee (privacy.json) should use `epsilon_spent` with the steps actually taken.

    Cost. RDP: Opacus's RDP of T steps is T times the RDP of one step (`compute_rdp` returns
    `rdp * steps`), so the one-step RDP is computed once (~0.15 s) and each step's epsilon is only
    the conversion to (epsilon, delta): about a millisecond, bit-identical to `RDPAccountant`.
    PRV: each new step is a fresh composition, 0.3-0.4 s at T ~ 125 and ~1 s at T ~ 1,000 (2-core CPU).

    Choice: `exact_every = 1` (every step exact) is the default, since at the paper's scale an exact
    PRV epsilon costs well under a second against a logical step of many seconds; raise it for runs of
    thousands of short steps. The PRV grid is checked once, at `planned_steps` (its largest point).
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    planned_steps: int
    exact_every: int = 1
    _cache: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _rdp_one_step: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_mechanism(self.noise_multiplier, self.sample_rate, self.planned_steps, self.delta, self.accountant,
                         ACCOUNTANTS)
        require(isinstance(self.exact_every, int) and self.exact_every >= 1, "exact_every must be a positive integer")
        if self.accountant == "prv" and self.planned_steps > 0:
            check_prv_feasible(self.noise_multiplier, self.sample_rate, self.planned_steps, self.delta)

    def computed_at(self, step: int) -> int:
        """The step whose exact epsilon is reported for `step` (itself, or the next grid step)."""
        require(isinstance(step, int) and step >= 0, f"step must be a non-negative integer, got {step!r}")
        if step == 0 or step >= self.planned_steps:
            return step
        return min(math.ceil(step / self.exact_every) * self.exact_every, self.planned_steps)

    def is_exact(self, step: int) -> bool:
        return self.computed_at(step) == step

    def epsilon(self, step: int) -> float:
        at = self.computed_at(step)
        if at not in self._cache:
            if self.accountant == "prv" and at > self.planned_steps:
                check_prv_feasible(self.noise_multiplier, self.sample_rate, at, self.delta)
            if self.accountant == "rdp" and at > 0:
                self._cache[at] = self._rdp_epsilon(at)
            else:
                self._cache[at] = _epsilon(self.noise_multiplier, self.sample_rate, at, self.delta, self.accountant)
        return self._cache[at]

    def _rdp_epsilon(self, steps: int) -> float:
        """RDPAccountant's epsilon for `steps` steps, from the cached one-step RDP (the same arithmetic)."""
        orders = RDPAccountant.DEFAULT_ALPHAS
        if self._rdp_one_step is None:
            self._rdp_one_step = rdp_analysis.compute_rdp(
                q=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=1, orders=orders)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha"
            eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=self._rdp_one_step * steps, delta=self.delta)
        return float(eps)


# --------------------------------------------------------------------------- an accountant's history (checkpoints)


def accountant_history(accountant: Any) -> list[tuple[float, float, int]]:
    """An Opacus accountant's history as plain (noise_multiplier, sample_rate, num_steps) tuples (JSON-safe)."""
    return [(float(sigma), float(rate), int(count)) for sigma, rate, count in accountant.history]


def restore_accountant(name: str, history: Iterable[Sequence[Any]]) -> Any:
    """A fresh Opacus accountant of kind `name` holding `history` (as saved by `accountant_history`).

    JSON turns tuples into lists; they become tuples again, so `step` keeps merging equal steps.
    Floats survive a JSON round trip exactly, so the restored epsilon equals the original.
    """
    restored = []
    for entry in history:
        require(
            isinstance(entry, (list, tuple)) and len(entry) == 3,
            f"accountant history entries must be (noise_multiplier, sample_rate, steps), got {entry!r}; "
            f"the checkpoint is damaged: delete it to restart training",
        )
        sigma, rate, count = entry
        require(isinstance(count, int) or (isinstance(count, float) and count.is_integer()),
                f"accountant history step counts must be whole numbers, got {count!r}; the checkpoint is damaged")
        check_mechanism(sigma, rate, int(count), 0.5, name)
        restored.append((float(sigma), float(rate), int(count)))
    acc = new_accountant(name)
    acc.history = restored
    return acc
