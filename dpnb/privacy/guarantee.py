"""privacy.json: the record that states a guarantee, written alike by every mechanism, recomputed and checked.

Each DP mechanism writes its own record (DP-SGD fine-tuning: `dpnb.training.plan.privacy_record`; the
direct DP classifier: `dpnb.evaluation.dp_classifier`; Private Evolution and a composition of several:
`dpnb.generation.evolution`, `dpnb.privacy.composition`), and every one of them holds the fields of
`privacy_fields`: the guarantee's numbers (noise_multiplier, sample_rate, steps, delta, accountant)
and the epsilon they give, computed on the one path `recompute_epsilon` retraces. Anyone can then
recompute the epsilon from the numbers (`verify_privacy`, and `dpnb verify`, which adds Google's
accountant: `dpnb.privacy.independent_accounting`). A record never holds a hash, index or offset of
private records, or a seed that determines the noise.

Displayed, a privacy parameter is rounded up (`round_up`), never shown smaller than it is; a DP
record without a finite epsilon and delta is refused (`check_privacy_record`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from dpnb.errors import DpnbError, require
from dpnb.privacy import accounting, composition


def privacy_fields(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                   accountant: str) -> dict[str, Any]:
    """The accounting part of privacy.json, computed on the same path `recompute_epsilon` takes.

    `epsilons` holds the epsilon of every guarantee-giving accountant, for comparison. PRV refuses
    settings whose grid would take gigabytes: when it is not the chosen accountant it is left out
    rather than failing a finished training; the chosen one must succeed.
    """
    epsilon = accounting.epsilon_spent(noise_multiplier, sample_rate, steps, delta, accountant)
    epsilons = {}
    for name in accounting.ACCOUNTANTS:
        if name == accountant:
            epsilons[name] = epsilon
            continue
        with contextlib.suppress(DpnbError):
            epsilons[name] = accounting.epsilon_spent(noise_multiplier, sample_rate, steps, delta, name)
    return {
        "epsilon": epsilon,
        "epsilons": epsilons,
        "delta": delta, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps,
        "accountant": accountant,
    }


def recompute_epsilon(privacy: dict[str, Any], accountant: str | None = None) -> float:
    """Epsilon of a privacy.json record, recomputed from its noise_multiplier, sample_rate, steps, delta and
    accountant (or, for a set several mechanisms made, from its `mechanisms`: `dpnb.privacy.composition`)."""
    require(privacy.get("dp", True), "this run was trained without DP: it has no epsilon to recompute")
    if privacy.get("mechanisms"):
        mechanisms = [composition.Mechanism(**m) for m in privacy["mechanisms"]]
        return composition.epsilon_of(mechanisms, float(privacy["delta"]), accountant or str(privacy["accountant"]))
    missing = [k for k in ("noise_multiplier", "sample_rate", "steps", "delta", "accountant") if privacy.get(k) is None]
    require(not missing, f"privacy record lacks {', '.join(missing)}; it was not written by dpnb finetune")
    return accounting.epsilon_spent(float(privacy["noise_multiplier"]), float(privacy["sample_rate"]),
                                    int(privacy["steps"]), float(privacy["delta"]),
                                    accountant or str(privacy["accountant"]))


def verify_privacy(privacy: dict[str, Any], rel_tol: float = 1e-6) -> None:
    """Raise DpnbError unless the record's epsilon (and its `epsilons`) match a fresh recomputation.

    A non-DP record (`dp` false) must have a null epsilon.
    """
    if not privacy.get("dp", True):
        require(privacy.get("epsilon") is None,
                f"privacy record says dp = false but claims epsilon = {privacy.get('epsilon')!r}; "
                f"a run without noise has no finite epsilon: rerun the finetune stage")
        return
    saved = privacy.get("epsilon")
    require(saved is not None, "privacy record of a DP run has no epsilon; rerun the finetune stage")
    recomputed = recompute_epsilon(privacy)
    _require_close(float(saved), recomputed, rel_tol, "epsilon")
    for name, value in (privacy.get("epsilons") or {}).items():
        _require_close(float(value), recompute_epsilon(privacy, name), rel_tol, f"epsilons.{name}")


def _require_close(saved: float, recomputed: float, rel_tol: float, what: str) -> None:
    require(
        math.isclose(saved, recomputed, rel_tol=rel_tol, abs_tol=1e-12),
        f"privacy record's {what} = {saved!r} but its noise multiplier, sample rate, steps and delta give "
        f"{recomputed!r}: the record is inconsistent; rerun the finetune stage (do not publish this epsilon)",
    )


# --------------------------------------------------------------------------- display and checks of privacy.json


def round_up(value: float, significant: int = 3) -> float:
    """`value` rounded UP to `significant` digits: a privacy parameter is never shown smaller than it is."""
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10 ** (significant - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale  # the tolerance keeps 3.21 from becoming 3.22


def check_privacy_record(privacy: dict[str, Any]) -> None:
    """A DP run's privacy.json must state a finite epsilon and a delta: never describe a missing guarantee."""
    epsilon, delta = privacy.get("epsilon"), privacy.get("delta")
    require(
        isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0
        and isinstance(delta, (int, float)) and 0 <= delta < 1,
        f"privacy.json says dp is true but has no finite epsilon and delta (epsilon={epsilon!r}, "
        f"delta={delta!r}); rerun the finetune stage",
    )
