"""The one table (dpnb.evaluation.one_table): every source of a run side by side, with the epsilon it carries."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dpnb.evaluation.one_table import one_table
from dpnb.evaluation.standard_errors import standard_errors
from dpnb.privacy.guarantee import round_up


def entry(accuracy: float, **more) -> dict:
    return {"n_train": 40, "n_test": 200, "accuracy": accuracy, "f1": accuracy - 0.01, **more}


def generated(accuracy: float, fidelity: float, mauve: float, **more) -> dict:
    return entry(accuracy, mauve=mauve, mauve_details={"n_source": 40, "n_heldout": 200},
                 label_fidelity={"overall": fidelity}, **more)


METRICS = {
    "real": entry(0.8, mauve=0.9, mauve_details={"n_source": 40}),
    "dp_classifier": entry(0.7, epsilon=7.9961, privacy={"dp": True, "epsilon": 7.9961}),
    "synthetic": generated(0.6, 0.55, 0.3, epsilon=None),  # fine-tuned without DP: evaluate stored None
    "pe": generated(0.65, 0.7, 0.8),  # an older metrics.json: no epsilon of its own
    "zero_shot": generated(0.62, 0.68, 0.5, epsilon=0.0),
    "meta": {"label_names": ["negative", "positive"]},
}


def test_one_row_per_source_in_order_with_the_metrics_own_numbers():
    table = one_table(METRICS, {"synthetic": {"dp": False, "epsilon": None}, "pe": {"dp": True, "epsilon": 3.0012}})
    assert list(table.index) == ["real", "dp_classifier", "synthetic", "pe", "zero_shot"]
    errors = standard_errors(METRICS)["accuracy"]
    for source in table.index:
        assert table.loc[source, "accuracy"] == METRICS[source]["accuracy"]
        assert table.loc[source, "accuracy_se"] == pytest.approx(errors[source]["se"])
        assert table.loc[source, "f1"] == METRICS[source]["f1"]
    assert table.loc["pe", "label_fidelity"] == 0.7 and table.loc["pe", "mauve"] == 0.8
    assert table.loc["pe", "mauve_n"] == 40 and table.loc["real", "mauve"] == 0.9
    assert pd.isna(table.loc["dp_classifier", "label_fidelity"]) and pd.isna(table.loc["dp_classifier", "mauve"])
    # epsilon: metrics.json's own (rounded up), else the privacy record's; no DP: inf; zero-shot: 0
    assert table.loc["dp_classifier", "epsilon"] == round_up(7.9961) == 8.0
    assert table.loc["pe", "epsilon"] == round_up(3.0012) == 3.01  # never shown smaller than it is
    assert table.loc["synthetic", "epsilon"] == math.inf and table.loc["real", "epsilon"] == math.inf
    assert table.loc["zero_shot", "epsilon"] == 0.0


def test_no_record_claims_no_epsilon_and_missing_sources_have_no_row():
    metrics = {source: METRICS[source] for source in ("real", "pe", "meta")}
    table = one_table(metrics, {"pe": None})
    assert list(table.index) == ["real", "pe"]
    assert pd.isna(table.loc["pe", "epsilon"])  # shown as NaN: nothing claimed
    assert one_table(metrics, {"pe": {"dp": True, "epsilon": 4.0}}).loc["pe", "epsilon"] == 4.0
