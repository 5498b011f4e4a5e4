"""The one table: every source of one run side by side, with the epsilon each carries.

Rows, in `SOURCE_NAMES` order (those metrics.json holds): `real` (the classifier trained on the real
records without DP: the ceiling), `dp_classifier` (the same kind of classifier trained with DP-SGD directly
on the private records), `synthetic` (the DP fine-tuned generator's set), `pe` (the Private Evolution set)
and `zero_shot` (the base model's set: no private data read, the baseline).

Columns: `accuracy` on the real test set and its standard error `accuracy_se` = sqrt(p (1 - p) / n_test)
(`dpnb.evaluation.standard_errors`), `f1`, `mauve` against held-out real texts (the real row: real
training texts, the ceiling) with `mauve_n`, the source's texts it compared (noisy below a few hundred),
`label_fidelity` (generated sets only: the share of texts the real-data classifier labels as prompted) and
`epsilon`:
- the source's own `epsilon` in metrics.json when it stored one (evaluate writes it for dp_classifier and
  for each generated set), else the epsilon of its privacy record (privacy.json, pe/privacy.json,
  dp_classifier/privacy.json), rounded UP to 3 digits (`dpnb.privacy.guarantee.round_up`);
- inf for a source trained on the private records without DP (`real`, or a record with `dp: false`);
- 0 for `zero_shot`, which reads no private data;
- None where no record states one: no epsilon is claimed.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from dpnb.config import SOURCE_NAMES
from dpnb.evaluation.standard_errors import standard_errors
from dpnb.privacy.guarantee import round_up

TITLES = {"real": "real records, no DP (ceiling)", "dp_classifier": "direct DP classifier",
          "synthetic": "DP fine-tuned generator", "pe": "Private Evolution", "zero_shot": "zero-shot (no private data)"}
COLUMNS = ["what", "n_train", "accuracy", "accuracy_se", "f1", "mauve", "mauve_n", "label_fidelity", "epsilon"]


def source_epsilon(source: str, entry: dict[str, Any], record: dict[str, Any] | None) -> float | None:
    """The epsilon a source carries: metrics.json's, else its privacy record's (module docstring)."""
    if source == "real":
        return math.inf
    if source == "zero_shot":
        return 0.0
    if entry.get("epsilon") is not None:
        return round_up(float(entry["epsilon"]))
    record = record or entry.get("privacy")
    if not record:
        return None
    if not record.get("dp", True):
        return math.inf
    return round_up(float(record["epsilon"])) if record.get("epsilon") is not None else None


def one_table(metrics: dict[str, Any], privacy: dict[str, dict[str, Any] | None]) -> pd.DataFrame:
    """One row per evaluated source (module docstring); `privacy` holds each source's privacy record, if any."""
    errors = standard_errors(metrics)["accuracy"]
    rows = {}
    for source in SOURCE_NAMES:
        entry = metrics.get(source)
        if not isinstance(entry, dict):
            continue
        fidelity = entry.get("label_fidelity") or {}
        rows[source] = {"what": TITLES[source], "n_train": entry.get("n_train"), "accuracy": entry.get("accuracy"),
                        "accuracy_se": errors.get(source, {}).get("se"), "f1": entry.get("f1"),
                        "mauve": entry.get("mauve"), "mauve_n": (entry.get("mauve_details") or {}).get("n_source"),
                        "label_fidelity": fidelity.get("overall"),
                        "epsilon": source_epsilon(source, entry, privacy.get(source))}
    return pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
