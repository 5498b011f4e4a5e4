"""Statistics of a set of texts: diversity, lengths, the prepare stage's split figures, length histograms.

**distinct-n.** Over a corpus of texts, each split into lower-cased whitespace words (`words`),

    distinct-n = |{n-grams of all texts}| / sum over texts of (w_t - n + 1)^+

where w_t is the number of words of text t; n-grams never cross text boundaries. 1 means no n-gram
repeats anywhere; a set of near-copies tends to 0. It falls as a corpus grows, so only sets of equal
size compare.

**Duplicate share.** 1 - |unique texts| / n, texts compared as their `words` (case and spacing
ignored).

**Lengths.** `length_summary` keeps the mean, the 10th / 50th / 90th percentiles and the whole
histogram (`counts[k]` = texts of exactly k units), so figures can be drawn again from metrics.json.

**Histograms.** `plot_length_histograms` is the one length figure of the pipeline: prepare's token
lengths per split, generate's words per sample, evaluate's generator tokens of real against
synthetic texts are all panels of series of lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

PERCENTILES = (5, 25, 50, 75, 95)  # of token lengths in data_stats.json


# --------------------------------------------------------------------------- diversity


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens: the unit of distinct-n (punctuation stays attached to words)."""
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Corpus distinct-n: unique n-grams / total n-grams, over all texts together.

    A text of w words (`words`) contributes its w - n + 1 consecutive n-grams (none when w < n);
    n-grams do not cross text boundaries. 1.0 means no n-gram repeats anywhere in the set; a set of
    near-copies tends to 0. None when the texts hold no n-gram at all.
    """
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def duplicate_share(texts: Sequence[str]) -> float | None:
    """Share of texts that repeat an earlier text of the set (compared as `words`, so case and spacing
    do not matter): 1 - unique / n. None for an empty set."""
    if not texts:
        return None
    unique = {" ".join(words(text)) for text in texts}
    return 1 - len(unique) / len(texts)


def diversity(texts: Sequence[str]) -> dict[str, Any]:
    """distinct-1, distinct-2 and the duplicate share of a set of texts."""
    return {
        "n_texts": len(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "duplicate_share": duplicate_share(texts),
    }


# --------------------------------------------------------------------------- lengths


def length_summary(lengths: Sequence[int]) -> dict[str, Any]:
    """Mean, percentiles and the full histogram (`counts[k]` = texts of exactly k tokens)."""
    values = np.asarray(lengths, dtype=np.int64)
    if not len(values):
        return {"n": 0, "mean": None, "p10": None, "median": None, "p90": None, "max": None, "counts": []}
    return {
        "n": int(len(values)),
        "mean": float(values.mean()),
        "p10": float(np.percentile(values, 10)),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": int(values.max()),
        "counts": np.bincount(values).tolist(),
    }


def lengths_from_counts(counts: Sequence[int]) -> np.ndarray:
    """The lengths a histogram `counts[k]` (texts of exactly k units) was made of, in increasing order."""
    return np.repeat(np.arange(len(counts)), np.asarray(counts, dtype=np.int64))


def lengths_by_label(lengths: Sequence[int], labels: Sequence[int],
                     label_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The lengths of each label's texts, by label name, in label order."""
    lengths, labels = np.asarray(lengths), np.asarray(labels)
    return {name: lengths[labels == i] for i, name in enumerate(label_names)}


def split_stats(columns: dict[str, list], label_names: Sequence[str], rows_read: int,
                dropped: dict[str, int]) -> dict[str, Any]:
    """Counts, dropped rows, token-length percentiles, truncation and duplicates of one prepared split.

    `columns` holds the prepared records (`text`, `label`, `n_tokens`, `truncated`).
    """
    lengths = np.asarray(columns["n_tokens"])
    labels = np.asarray(columns["label"])
    return {
        "rows_read": rows_read,
        "dropped": dropped,
        "records": len(lengths),
        "per_label": {name: int((labels == i).sum()) for i, name in enumerate(label_names)},
        "token_length": {
            **{f"p{q}": round(float(np.percentile(lengths, q)), 1) for q in PERCENTILES},
            "max": int(lengths.max()),
        },
        "fraction_truncated": round(float(np.mean(columns["truncated"])), 4),
        "duplicate_texts": len(columns["text"]) - len(set(columns["text"])),  # repeats beyond the first copy
    }


# --------------------------------------------------------------------------- the length figure


def _bin_edges(panels: Mapping[str, Mapping[str, np.ndarray]], bins: int | Sequence[float],
               limit: int | None) -> np.ndarray:
    """Edges shared by every panel and series (so they compare): `bins` equal bins from 0 to `limit`
    (else to the longest text), never narrower than one unit."""
    if not isinstance(bins, int):
        return np.asarray(bins, dtype=float)
    longest = max((int(values.max()) for series in panels.values() for values in series.values() if len(values)),
                  default=0)
    top = max(limit or longest, 2)
    return np.linspace(0, top, min(top, bins) + 1)


def plot_length_histograms(
    panels: Mapping[str, Mapping[str, Sequence[int]]],
    *,
    unit: str,
    counted: str = "texts",
    bins: int | Sequence[float] = 60,
    share: bool = False,
    limit: int | None = None,
    limit_label: str = "max_length",
    panel_size: tuple[float, float] = (5.0, 3.4),
) -> Figure:
    """Histograms of lengths: one panel per entry of `panels`, one histogram per series in a panel.

    panels: panel title -> {series name -> lengths}; each series is labelled with its size.
    unit: what a length counts (the x axis), e.g. "words per kept sample".
    counted: what the y axis counts ("texts", "records", "samples").
    bins: the number of equal bins from 0 to `limit` (or to the longest text), or explicit edges.
    share: plot each series as shares of its own size (series of different sizes then compare).
    limit: a length cap to mark with a dashed line (e.g. prepare's max_length), named `limit_label`.
    """
    arrays = {title: {name: np.asarray(values) for name, values in series.items()}
              for title, series in panels.items()}
    edges = _bin_edges(arrays, bins, limit)
    width, height = panel_size
    figure = Figure(figsize=(width * max(len(arrays), 1), height), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, max(len(arrays), 1), sharex=True))
    for ax, (title, series) in zip(axes, arrays.items(), strict=False):
        for name, values in series.items():
            if not len(values):
                continue
            weights = np.full(len(values), 1 / len(values)) if share else None
            ax.hist(values, bins=edges, weights=weights, alpha=0.55, label=f"{name} ({len(values)})")
        if limit is not None:
            ax.axvline(limit, color="black", linestyle="--", linewidth=1, label=limit_label)
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"share of {counted}" if share else counted)
    return figure


def token_lengths_figure(splits: Mapping[str, dict[str, list]], label_names: Sequence[str],
                         max_length: int) -> Figure:
    """Prepare's figure: tokens per record of each split (prompt + review + EOS), by label."""
    panels = {f"{role}: {len(columns['n_tokens'])} records":
              lengths_by_label(columns["n_tokens"], columns["label"], label_names)
              for role, columns in splits.items()}
    return plot_length_histograms(panels, unit="tokens per record (prompt + review + EOS)", counted="records",
                                  limit=max_length, limit_label="max_length", panel_size=(5.0, 3.6))
