"""Standard errors of the evaluation's accuracies, and of the differences between sources.

An accuracy p measured on n_test test texts has standard error sqrt(p (1 - p) / n_test) (binomial
sampling of the test set). A difference between two sources has standard error sqrt(se_1^2 + se_2^2),
about sqrt(2) se when the two are close; this treats the two as independent, which overstates it a
little when both are scored on the same test texts (their errors are positively correlated). Only the
test sampling is counted, not the spread over training seeds. The evaluate stage shows them for one
run (metrics.json), the report over many.
"""

from __future__ import annotations

import math
from typing import Any

from dpnb.config import SOURCE_NAMES

# accuracy differences shown with their standard error: (a, b) is "a - b"
DIFFERENCES = (("synthetic", "real"), ("pe", "real"), ("dp_classifier", "real"), ("zero_shot", "real"),
               ("synthetic", "zero_shot"), ("pe", "zero_shot"))


def accuracy_standard_error(accuracy: float | None, n_test: int | None) -> float | None:
    """sqrt(p (1 - p) / n) of an accuracy p on n test texts; None when either is missing."""
    if accuracy is None or not n_test or (isinstance(accuracy, float) and math.isnan(accuracy)):
        return None
    return math.sqrt(accuracy * (1 - accuracy) / n_test)


def standard_errors(metrics: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Standard errors of each source's accuracy and of the differences between sources.

    `accuracy[source]` = {accuracy p, n_test n, se = sqrt(p (1 - p) / n)}; `differences["a - b"]` =
    {difference p_a - p_b, se = sqrt(se_a^2 + se_b^2), z = difference / se} for the pairs of
    `DIFFERENCES` whose two accuracies exist (about 2 standard errors or more: unlikely to be test
    noise alone). The two sources are treated as independent, though both are scored on the same test
    texts (see the module docstring). Sources without an accuracy (nothing to train on) are left out.
    """
    per_source: dict[str, dict[str, Any]] = {}
    for source in SOURCE_NAMES:
        entry = metrics.get(source)
        if not isinstance(entry, dict):
            continue
        se = accuracy_standard_error(entry.get("accuracy"), entry.get("n_test"))
        if se is not None:
            per_source[source] = {"accuracy": entry["accuracy"], "n_test": entry["n_test"], "se": se}
    differences: dict[str, dict[str, Any]] = {}
    for a, b in DIFFERENCES:
        if a in per_source and b in per_source:
            difference = per_source[a]["accuracy"] - per_source[b]["accuracy"]
            se = math.sqrt(per_source[a]["se"] ** 2 + per_source[b]["se"] ** 2)
            differences[f"{a} - {b}"] = {"difference": difference, "se": se,
                                         "z": difference / se if se > 0 else None}
    return {"accuracy": per_source, "differences": differences}
