"""Text statistics: distinct-n, duplicates and lengths checked by hand; the one length figure."""

from __future__ import annotations

import numpy as np
import pytest

from dpnb.data import textstats

# --------------------------------------------------------------------------- diversity


def test_distinct_n_on_a_tiny_corpus():
    # words: [the cat sat] [the cat ran] [hi]
    # unigrams: 7 in all, unique {the, cat, sat, ran, hi} = 5        -> distinct-1 = 5/7
    # bigrams: (the cat) (cat sat) (the cat) (cat ran): 4, unique 3  -> distinct-2 = 3/4
    # ("hi" has no bigram, and none runs across texts)
    texts = ["the cat sat", "The cat ran", "hi"]
    assert textstats.distinct_n(texts, 1) == pytest.approx(5 / 7)
    assert textstats.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert textstats.distinct_n(["hi"], 2) is None


def test_duplicate_share_ignores_case_and_spacing():
    # "a b", "A  b" and "a b" are one text written three ways: 2 unique of 4 -> 1 - 2/4
    assert textstats.duplicate_share(["a b", "A  b", "c", "a b"]) == pytest.approx(0.5)
    assert textstats.duplicate_share(["x", "y"]) == 0
    assert textstats.duplicate_share([]) is None


def test_length_summary_histogram():
    summary = textstats.length_summary([3, 1, 3, 0])
    assert summary["counts"] == [1, 1, 0, 2]
    assert summary["mean"] == pytest.approx(7 / 4)
    assert summary["max"] == 3




def test_split_stats_counts_a_prepared_split():
    columns = {"text": ["a", "b", "a", "c"], "label": [0, 1, 0, 1], "n_tokens": [10, 20, 30, 40],
               "truncated": [False, True, False, False]}
    stats = textstats.split_stats(columns, ["neg", "pos"], rows_read=6, dropped={"empty_text": 2})
    assert stats["records"] == 4 and stats["rows_read"] == 6 and stats["dropped"] == {"empty_text": 2}
    assert stats["per_label"] == {"neg": 2, "pos": 2}
    assert stats["token_length"]["p50"] == 25.0 and stats["token_length"]["max"] == 40
    assert stats["fraction_truncated"] == 0.25 and stats["duplicate_texts"] == 1


def test_lengths_round_trip_through_a_histogram():
    lengths = [3, 1, 3, 0]
    assert textstats.lengths_from_counts(textstats.length_summary(lengths)["counts"]).tolist() == sorted(lengths)
    by_label = textstats.lengths_by_label([5, 6, 7], [1, 0, 1], ["neg", "pos"])
    assert {name: values.tolist() for name, values in by_label.items()} == {"neg": [6], "pos": [5, 7]}


def test_one_length_figure_draws_panels_series_and_the_limit():
    figure = textstats.plot_length_histograms(
        {"train": {"neg": [1, 2, 2, 9], "pos": [3, 4]}, "test": {"neg": [], "pos": [5]}},
        unit="tokens", counted="records", limit=12, bins=6, share=True)
    left, right = figure.axes
    assert left.get_title() == "train" and right.get_title() == "test"
    assert left.get_ylabel() == "share of records" and left.get_xlabel() == "tokens"
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["neg (4)", "pos (2)", "max_length"]
    heights = [patch.get_height() for patch in left.patches]
    assert sum(heights) == pytest.approx(2.0)  # two series, each as shares summing to 1
    assert left.get_xlim()[1] >= 12  # the limit line is inside the axes
    figure = textstats.token_lengths_figure(
        {"train": {"n_tokens": [4, 8, 8], "label": [0, 1, 1]}}, ["neg", "pos"], max_length=8)
    assert figure.axes[0].get_title() == "train: 3 records"
    assert np.isclose(sum(p.get_height() for p in figure.axes[0].patches), 3)
