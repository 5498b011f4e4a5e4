"""Differential privacy: how much a mechanism spends, and the record that states it.

`accounting` (the Poisson-subsampled Gaussian mechanism: delta, sampling rate and step counts,
Opacus's accountants, epsilon, noise calibration, the per-step tracker), `composition` (several
mechanisms under one accountant), `guarantee` (privacy.json: the fields every mechanism writes,
recomputed, verified and displayed), `independent_accounting` (epsilon recomputed with Google's
dp-accounting, for `dpnb verify`).

The accounting functions a reader calls are importable from here too, as the notebooks use them
(`from dpnb import privacy; privacy.epsilon_spent(...)`); the package's own modules import them from
`dpnb.privacy.accounting`.
"""

from dpnb.privacy.accounting import (
    EpsilonTracker,
    calibrate_noise,
    default_delta,
    epsilon_spent,
    planned_steps,
    poisson_sample_rate,
    steps_per_epoch,
    validate_delta,
)

__all__ = ["EpsilonTracker", "calibrate_noise", "default_delta", "epsilon_spent", "planned_steps",
           "poisson_sample_rate", "steps_per_epoch", "validate_delta"]
