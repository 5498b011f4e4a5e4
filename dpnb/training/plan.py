"""The plan of a DP-SGD run, fixed before it starts, and the privacy.json that states its guarantee.

The guarantee of DP-SGD is made of a handful of numbers, all of them here, in one place:

- N (`plan_size`): the records the plan is made for (the training set; for the audit's twins, every
  canary counted as inserted, so that the coins change the data and never the mechanism);
- q = 1 / ceil(N / B): the Poisson sampling rate of each record at each step, for logical batch size B;
- T: the noise-adding steps, ceil(epochs x steps per epoch), capped by max_steps;
- delta: 1 / N^1.1 unless set, and always below 1/N;
- sigma: the noise multiplier, calibrated once so that the accountant reports at most the target
  epsilon after exactly T steps at exactly q (`dpnb.privacy.accounting.calibrate_noise`);
- E = int(N q): the public constant the noisy sum is divided by (Opacus's expected batch size).

`plan_training` checks them against N before any model is loaded; the session (`dpnb.training.dpsgd`)
then refuses to train on any other q, T or E. After training, `privacy_record` writes privacy.json
from the plan and the steps the accountant counted, through `dpnb.privacy.guarantee.privacy_fields`,
the path `dpnb verify` retraces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dpnb.errors import require
from dpnb.privacy import accounting
from dpnb.privacy.guarantee import privacy_fields
from dpnb.rundir import library_versions

if TYPE_CHECKING:
    from dpnb.config import FinetuneConfig


@dataclass(frozen=True)
class TrainingPlan:
    """What the loop will do, fixed before it starts: the numbers the privacy guarantee is made of.

    `plan_size` is the N that q, the steps, delta, sigma and the divisor E were planned for;
    `dataset_size` the records actually sampled from. They are equal except for the audit's twins,
    planned for every canary inserted so that their mechanism does not depend on the coins.
    """

    dp: bool
    dataset_size: int  # records the Poisson sampler draws from
    plan_size: int  # the N the plan below is made for (>= dataset_size)
    logical_batch_size: int
    physical_batch_size: int
    sample_rate: float  # q = 1 / ceil(plan_size / B), the Poisson sampling probability of each record at each step
    expected_batch_size: float  # dataset_size * q, the mean number of records in a logical batch
    steps_per_epoch: int
    steps: int  # logical steps the loop takes
    delta: float | None
    noise_multiplier: float | None  # sigma; None without DP
    accountant: str
    target_epsilon: float | None

    @property
    def divisor(self) -> int:
        """E = int(plan_size q): the public constant the noisy sum is divided by (Opacus's expected_batch_size)."""
        return int(self.plan_size * self.sample_rate)


def plan_training(cfg: FinetuneConfig, dataset_size: int, plan_size: int | None = None) -> TrainingPlan:
    """Check the N-dependent parameters and calibrate sigma for exactly the steps the loop will take.

    The plan is made for N = `plan_size` (default: `dataset_size`): q = 1 / ceil(N / B), the steps,
    delta (default 1 / N^1.1, and below 1/N) and sigma; E = int(N q). Training then samples the
    `dataset_size` <= N records it has at exactly that q, for those steps, divided by that E, and the
    accountant is fed that q: the guarantee of the Poisson-subsampled Gaussian mechanism depends on
    (q, sigma, T, delta) and on no data set size, and delta < 1/N <= 1/dataset_size.

    Refused here, before any model is loaded: a logical batch larger than N, a delta not below 1/N,
    and a logical batch size whose batch count Opacus's float arithmetic would turn into another
    step count and sampling rate (`accounting.opacus_counts_epoch`: k = 93, 99, 105, ...; the message
    names the nearest sizes that work; nothing is adjusted silently).
    """
    n, batch = dataset_size, cfg.logical_batch_size
    require(n > 0, "the training set is empty; prepare some records first")
    planned = n if plan_size is None else plan_size
    require(planned >= n, f"the plan is made for {planned} records but the training set has {n}; plan for at least {n}")
    require(batch <= planned, f"finetune.logical_batch_size ({batch}) is larger than the training set ({planned} "
                              f"records); make it at most {planned}")
    sample_rate = accounting.poisson_sample_rate(planned, batch)
    per_epoch = accounting.steps_per_epoch(planned, batch)
    steps = accounting.planned_steps(planned, batch, cfg.epochs, cfg.max_steps)
    delta = sigma = None
    if cfg.dp:
        delta = cfg.delta if cfg.delta is not None else accounting.default_delta(planned)
        accounting.validate_delta(delta, planned)
        sigma = accounting.calibrate_noise(cfg.target_epsilon, delta, sample_rate, steps, cfg.accountant)
    return TrainingPlan(dp=cfg.dp, dataset_size=n, plan_size=planned, logical_batch_size=batch,
                        physical_batch_size=cfg.physical_batch_size, sample_rate=sample_rate,
                        expected_batch_size=n * sample_rate, steps_per_epoch=per_epoch, steps=steps, delta=delta,
                        noise_multiplier=sigma, accountant=cfg.accountant,
                        target_epsilon=cfg.target_epsilon if cfg.dp else None)


def describe_plan(plan: TrainingPlan, trainable: int, cfg: FinetuneConfig) -> str:
    """One paragraph with the numbers of the run, for the log and the notebook."""
    lines = [
        f"{plan.steps} logical steps over {plan.dataset_size} records: each record is sampled with probability "
        f"q = {plan.sample_rate:.6g} per step (expected logical batch {plan.expected_batch_size:.1f}, physical "
        f"batches of at most {plan.physical_batch_size}); {trainable:,} trainable parameters ({cfg.mode})."
    ]
    if plan.plan_size != plan.dataset_size:
        lines.append(f"Planned for N = {plan.plan_size} records (q, steps, delta, sigma, and the divisor "
                     f"E = {plan.divisor}), whatever part of them is present.")
    if plan.dp:
        sigma = plan.noise_multiplier
        lines.append(
            f"DP-SGD: clip each record's gradient to C = {cfg.max_grad_norm:g}, add Gaussian noise with "
            f"sigma = {sigma:.4f} (std sigma*C = {sigma * cfg.max_grad_norm:.3g}); target epsilon "
            f"{plan.target_epsilon:g} at delta = {plan.delta:.3g} ({plan.accountant} accountant)."
        )
    else:
        lines.append("No DP: no clipping, no noise (epsilon = infinity).")
    return "\n".join(lines)


# =========================================================================== privacy.json


def noise_source(cfg: FinetuneConfig) -> dict[str, Any]:
    """Where the run's noise and Poisson sampling came from, and whether that makes it a DP release."""
    if not cfg.dp:
        return {"deterministic": cfg.deterministic, "noise_seeded_from": None, "dp_release": False}
    if cfg.deterministic:
        return {"deterministic": True, "noise_seeded_from": "the config seed", "dp_release": False,
                "release_note": "NOT a DP release: the noise and the batches were drawn from the config's seed, so "
                                "anyone who knows it can regenerate them and the (epsilon, delta) below does not hold "
                                "for this model (finetune.deterministic: true, meant for tests and teaching)"}
    return {"deterministic": False, "noise_seeded_from": "64 bits of OS entropy (not saved in any shareable file)",
            "dp_release": True,
            "release_note": "noise and Poisson sampling drawn from torch generators seeded with OS entropy: "
                            "unpredictable to anyone holding the config or the model; not a cryptographic RNG, and "
                            "the Gaussian samples are not hardened against floating-point attacks (Opacus's "
                            "secure_mode needs torchcsprng, which has no build for this torch)"}


def privacy_record(cfg: FinetuneConfig, plan: TrainingPlan, steps: int, trainable: int) -> dict[str, Any]:
    """privacy.json: the guarantee of a finished fine-tuning run that took `steps` noise-adding steps.

    Under DP `steps` must be what the accountant counted. Epsilon is computed by `privacy_fields`,
    the path `verify_privacy` retraces, so anyone can recompute it from (noise_multiplier,
    sample_rate, steps, delta, accountant). A run without DP has a null epsilon. The record is meant
    to be shared: it holds no hash, index or count of private records beyond N (the data set size,
    which the accounting needs), and no seed that determines the noise.

    The mechanism it states: each of the `dataset_size` records joins each of the `steps` logical
    batches with probability `sample_rate` (`expected_batch_size` records on average), each record's
    gradient is clipped to `max_grad_norm`, the sum gets Gaussian noise of std noise_multiplier *
    max_grad_norm and is divided by `divisor` (E = int(planned_dataset_size * sample_rate), a public
    constant). `planned_dataset_size` is the N the plan was made for: the dataset size, except for the
    audit's twins, planned as if every canary were inserted so that the mechanism is the same
    whichever canaries the coins inserted.
    """
    common = {
        "dp": cfg.dp, "mode": cfg.mode, "dataset_size": plan.dataset_size, "planned_dataset_size": plan.plan_size,
        "logical_batch_size": plan.logical_batch_size, "physical_batch_size": plan.physical_batch_size,
        "expected_batch_size": plan.expected_batch_size, "divisor": plan.divisor if cfg.dp else None,
        "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "planned_steps": plan.steps, "trainable_parameters": trainable, "versions": library_versions(),
        **noise_source(cfg),
    }
    if not cfg.dp:
        return {"epsilon": None, "epsilons": None, "delta": None, "noise_multiplier": None,
                "sample_rate": plan.sample_rate, "steps": steps, "accountant": None, "max_grad_norm": None,
                "grad_sample_mode": None, "target_epsilon": None, **common}
    return {
        **privacy_fields(plan.noise_multiplier, plan.sample_rate, steps, plan.delta, cfg.accountant),
        "max_grad_norm": cfg.max_grad_norm, "grad_sample_mode": cfg.grad_sample_mode,
        "target_epsilon": cfg.target_epsilon, **common,
    }
