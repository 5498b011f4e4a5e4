"""The memorisation screen: for each text, the longest run of tokens it shares verbatim with any training text.

For every synthetic text q and a reference set R (the training records, as the generator saw them),

    shared(q) = max over r in R, i, j of { L : q[i : i + L] == r[j : j + L] },

the longest common substring of q with any reference sequence, with the row r and the offsets where
it occurs. Samples with shared(q) >= threshold are flagged for someone to look at. Lengths are counted
in generator tokens: the generator can only copy what it saw, and it saw token ids of (possibly
truncated) records; extraction studies also measure in tokens (e.g. "50-token" verbatim matches).

**What the screen is, privately.** It reads the private training records, so nothing it finds is
covered by the DP guarantee: the figures (`memorisation_summary`: counts, maximum, median, histogram)
are aggregates outside the guarantee, and the flagged list (`flagged_samples`: which sample copies
which training row, at which offsets) points at private records and is itself private. Removing
flagged samples from a synthetic set filters it against the private data: the filtered set is outside
the DP guarantee too (the dataset card says so). The screen reports; it does not make a set safe.

**Method** (exact, no pairwise comparison): a generalised suffix array over all reference and query
tokens, each sequence closed by its own separator symbol, built by prefix doubling (`suffix_array`).
The common prefix of two suffixes in sorted order is the minimum of the adjacent common prefixes
(`adjacent_common_prefix`) between them, so the reference suffix closest to a query suffix is one of
the two nearest reference suffixes in sorted order. 25,000 texts against 25,000 reviews take under a
minute on two CPU cores (benchmarks/bench_evaluate.py). `memorisation_figure` draws the summaries'
histograms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from dpnb.errors import require

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


# --------------------------------------------------------------------------- texts as generator tokens


def review_token_ids(records: datasets.Dataset, eos_token_id: int | None) -> list[np.ndarray]:
    """The review part of prepared records: `input_ids` after the prompt, without the final EOS.

    Read through Arrow as views of one flat array, so 25,000 records cost one copy of their ids.
    """
    table = records.with_format("arrow")[:]
    ids = table.column("input_ids").combine_chunks()
    flat = ids.flatten().to_numpy()
    offsets = ids.offsets.to_numpy()
    offsets = offsets - offsets[0]
    prompt_length = table.column("prompt_length").to_numpy()
    starts = offsets[:-1] + prompt_length
    ends = offsets[1:].copy()
    nonempty = ends > offsets[:-1]
    ends[nonempty & (flat[np.maximum(ends - 1, 0)] == eos_token_id)] -= 1
    return [flat[a:b] for a, b in zip(starts, np.maximum(ends, starts), strict=True)]


def text_token_ids(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, chunk: int = 1000) -> list[np.ndarray]:
    """Texts in the generator's tokens, tokenised the way prepare tokenises reviews (no special tokens).

    In chunks, each kept as compact arrays: the tokenizer's per-token bookkeeping for 25,000 long
    texts at once would take gigabytes.
    """
    out: list[np.ndarray] = []
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False,
                            split_special_tokens=True)["input_ids"]
        out.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
    return out



# --------------------------------------------------------------------------- the screen


@dataclass(frozen=True)
class SharedRuns:
    """For each query sequence: its longest run of tokens found verbatim in some reference sequence.

    `length[q]` is that run's length; the run is `queries[q][query_offset[q]:][:length[q]]` and equals
    `reference[reference_row[q]][reference_offset[q]:][:length[q]]` (the first such place in the query;
    one of the reference places when several match). Offsets and row are -1 when the length is 0.
    """

    length: np.ndarray
    reference_row: np.ndarray
    reference_offset: np.ndarray
    query_offset: np.ndarray


def _concatenate(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All sequences end to end, each followed by a separator slot (filled in by the caller).

    Returns the array (separators set to -1), the start offset of each sequence with the total length
    last, and the separator positions.
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=offsets[1:])
    joined = np.full(int(offsets[-1]), -1, dtype=np.int64)
    separators = offsets[1:] - 1
    is_token = np.ones(len(joined), dtype=bool)
    is_token[separators] = False
    if lengths.sum():
        joined[is_token] = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences if len(s)])
    return joined, offsets, separators


def _group_starts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For keys in sorted order: whether each key starts a run of equal keys, the index of that run's
    first key, and whether the key is alone in its run."""
    n = len(sorted_keys)
    first = np.empty(n, dtype=bool)
    first[0] = True
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    last = np.empty(n, dtype=bool)
    last[-1] = True
    last[:-1] = first[1:]
    starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    return first, starts, first & last


@dataclass
class SuffixArray:
    """A suffix array with what `adjacent_common_prefix` needs.

    suffixes: start positions in sorted order (slot i holds the i-th smallest suffix).
    head: each position's first k0 symbols packed into one int64 (base `alphabet`, 0 past the end).
    ranks[j]: for each position, the slot of the first suffix sharing its first k0 * 2**j symbols,
        so two positions have equal ranks[j] exactly when those symbols are equal.
    split_round: for slot i >= 1, the round that separated it from slot i - 1: 0 when their first
        k0 symbols differ, r >= 1 when they share k0 * 2**(r-1) symbols but not k0 * 2**r.
    """

    suffixes: np.ndarray
    head: np.ndarray
    ranks: list[np.ndarray]
    split_round: np.ndarray
    k0: int
    alphabet: int


def suffix_array(symbols: np.ndarray) -> SuffixArray:
    """The suffix array of `symbols` (non-negative ints) by prefix doubling, vectorised with numpy.

    Suffixes are first sorted by their first k0 symbols packed into one int64 key, then repeatedly by
    (rank of the first h symbols, rank of the next h symbols), which orders them by their first 2h.
    Only suffixes still tied with another are re-sorted in each round (in text, most suffixes are
    unique after a few words); tie groups occupy fixed ranges of slots, so a round only reorders
    inside them. Rounds stop when no suffix is tied.
    """
    n = len(symbols)
    if symbols.max(initial=0) < 2**21:  # token ids are small already: use them as they are
        dense = symbols.astype(np.int64) + 1  # 0 is "past the end"
    else:
        dense = np.unique(symbols, return_inverse=True)[1].astype(np.int64) + 1
    alphabet = int(dense.max()) + 1
    k0 = max(1, min(4, int(62 // math.log2(alphabet + 1))))  # k0 symbols fit one int64 key
    head = np.zeros(n, dtype=np.int64)
    for j in range(k0):
        head *= alphabet
        head[: n - j] += dense[j:]
    del dense
    suffixes = np.argsort(head)
    first, starts, alone = _group_starts(head[suffixes])
    split_round = np.where(first, 0, -1).astype(np.int8)
    rank = np.empty(n, dtype=np.int64)
    rank[suffixes] = starts
    tied = np.flatnonzero(~alone)  # slots whose suffix still ties with another
    del first, starts, alone
    ranks: list[np.ndarray] = []
    h, round_ = k0, 0
    while tied.size:
        ranks.append(rank.astype(np.int32 if n < 2**31 else np.int64))
        round_ += 1
        members = suffixes[tied]
        following = members + h
        second = np.where(following < n, rank[np.minimum(following, n - 1)], -1)
        key = rank[members] * (n + 1) + (second + 1)
        order = np.argsort(key)
        members, key = members[order], key[order]
        suffixes[tied] = members
        first, starts, alone = _group_starts(key)
        new_split = tied[first]
        split_round[new_split[split_round[new_split] < 0]] = round_
        rank[members] = tied[starts]
        tied = tied[~alone]
        h *= 2
    return SuffixArray(suffixes, head, ranks, split_round, k0, alphabet)


def adjacent_common_prefix(sa: SuffixArray) -> np.ndarray:
    """lcp[i] = length of the common prefix of the suffixes in slots i - 1 and i (lcp[0] = 0).

    A pair split in round r >= 1 shares L in [k0 2^(r-1), k0 2^r) symbols. The rest of L is found by
    binary lifting: for j = r-2 down to 0, extend by k0 2^j when the next k0 2^j symbols of both
    suffixes have the same rank; then by the number of leading packed symbols their `head` keys share
    (fewer than k0). Most adjacent pairs split in the first rounds, so little lifting is needed.
    """
    n = len(sa.suffixes)
    a, b = sa.suffixes[:-1], sa.suffixes[1:]
    split = sa.split_round[1:].astype(np.int64)
    common = np.where(split >= 1, sa.k0 * (2 ** np.maximum(split - 1, 0)), 0)
    for j in range(len(sa.ranks) - 1, -1, -1):
        pairs = np.flatnonzero(split - 2 >= j)
        if not pairs.size:
            continue
        pa, pb = a[pairs] + common[pairs], b[pairs] + common[pairs]
        inside = (pa < n) & (pb < n)
        rank = sa.ranks[j]
        same = inside & (rank[np.minimum(pa, n - 1)] == rank[np.minimum(pb, n - 1)])
        common[pairs] += (sa.k0 * 2**j) * same
    pa, pb = np.minimum(a + common, n - 1), np.minimum(b + common, n - 1)
    inside = (a + common < n) & (b + common < n)
    head_a, head_b = sa.head[pa], sa.head[pb]
    for d in range(sa.k0):
        scale = sa.alphabet ** (sa.k0 - 1 - d)  # keeps the first d + 1 packed symbols
        common += inside & (head_a // scale == head_b // scale)
    return np.concatenate([[0], common])


def _nearest_reference_above(is_reference: np.ndarray, lcp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each suffix-array slot p: the common prefix with the nearest reference suffix q < p, and q.

    The common prefix of slots q and p is min(lcp[q + 1 .. p]). Slots are split into segments that
    each start after a reference suffix; a running minimum that restarts at each segment is one
    running maximum of segment * M + (M - 1 - lcp), since every segment's values exceed all earlier
    ones. Slots with no reference suffix above get 0 and q = -1.
    """
    n = len(is_reference)
    segment = np.zeros(n, dtype=np.int64)
    np.cumsum(is_reference[:-1], out=segment[1:])
    big = int(lcp.max(initial=0)) + 1
    running = np.maximum.accumulate(segment * big + (big - 1 - lcp))
    common = np.where(segment > 0, (big - 1) - (running - segment * big), 0)
    nearest = np.maximum.accumulate(np.where(is_reference, np.arange(n), -1))
    return common, nearest


def longest_shared_runs(reference: Sequence[Sequence[int]], queries: Sequence[Sequence[int]]) -> SharedRuns:
    """For every query, the longest run of tokens it shares verbatim with any reference sequence.

    Method (exact, no pairwise comparison): one suffix array over all reference and query tokens,
    each sequence closed by a unique separator. For a query suffix, the reference suffix sharing the
    longest prefix with it is one of the two reference suffixes nearest to it in sorted order (every
    suffix between them shares at most as much), and the shared length is the minimum of the adjacent
    common prefixes in between. The longest shared run of a query is the maximum of that over its
    suffixes. Cost: a few sorts of the tokens (O(N log N) per round, a handful of rounds) and linear
    passes: 25,000 texts against 25,000 reviews of up to 300 tokens (11 million tokens) took 23-55 s
    and 1.2 GB on two busy CPU cores (benchmarks/bench_evaluate.py).
    """
    n_queries = len(queries)
    empty = np.full(n_queries, -1, dtype=np.int64)
    if n_queries == 0 or not any(len(s) for s in reference):
        return SharedRuns(np.zeros(n_queries, dtype=np.int64), empty, empty.copy(), empty.copy())
    ref_tokens, ref_offsets, ref_separators = _concatenate(reference)
    query_tokens, query_offsets, query_separators = _concatenate(queries)
    symbols = np.concatenate([ref_tokens, query_tokens])
    n_ref = int(ref_offsets[-1])
    del ref_tokens, query_tokens
    # Every sequence gets its own separator symbol, above every token, so no common run crosses one.
    separators = np.concatenate([ref_separators, n_ref + query_separators])
    require(symbols.min(initial=0) >= -1 and (symbols >= 0).sum() == len(symbols) - len(separators),
            "token ids must be non-negative integers")
    symbols[separators] = symbols.max(initial=0) + 1 + np.arange(len(separators))
    n = len(symbols)

    sa = suffix_array(symbols)
    del symbols
    lcp = adjacent_common_prefix(sa)
    suffixes = sa.suffixes
    del sa
    is_reference = suffixes < n_ref
    above, above_at = _nearest_reference_above(is_reference, lcp)
    # The nearest reference suffix below: the same pass over the reversed order.
    reversed_lcp = np.concatenate([[0], lcp[1:][::-1]])
    below, below_at = _nearest_reference_above(is_reference[::-1], reversed_lcp)
    below, below_at = below[::-1], np.where(below_at[::-1] >= 0, n - 1 - below_at[::-1], -1)
    del lcp, reversed_lcp
    use_below = below > above
    best = np.where(use_below, below, above)
    best_at = np.where(use_below, below_at, above_at)

    # Back to text order, queries only.
    shared = np.empty(n, dtype=np.int64)
    shared[suffixes] = best
    match = np.full(n, -1, dtype=np.int64)
    found = best_at >= 0
    match[suffixes[found]] = suffixes[best_at[found]]
    shared, match = shared[n_ref:], match[n_ref:]
    starts = query_offsets[:-1]
    length = np.maximum.reduceat(shared, starts)  # each query owns at least its separator slot
    owner = np.repeat(np.arange(n_queries), np.diff(query_offsets))
    at_max = np.flatnonzero(shared == length[owner])
    queries_hit, first = np.unique(owner[at_max], return_index=True)
    where = np.empty(n_queries, dtype=np.int64)
    where[queries_hit] = at_max[first]
    ref_position = match[where]
    row = np.searchsorted(ref_offsets, ref_position, side="right") - 1
    positive = length > 0
    return SharedRuns(
        length=length,
        reference_row=np.where(positive, row, -1),
        reference_offset=np.where(positive, ref_position - ref_offsets[np.maximum(row, 0)], -1),
        query_offset=np.where(positive, where - starts, -1),
    )


def memorisation_summary(runs: SharedRuns, threshold: int) -> dict[str, Any]:
    """The screen's figures, aggregates only: max, mean, median, how many samples reach `threshold`, and the
    histogram (`counts[k]` = samples whose longest shared run is k tokens). No sample or training row is named
    (`flagged_samples` does that, privately)."""
    length = runs.length
    n_flagged = int(np.count_nonzero(length >= threshold))
    return {
        "unit": "generator tokens",
        "threshold": threshold,
        "max": int(length.max(initial=0)),
        "mean": float(length.mean()) if len(length) else None,
        "median": float(np.median(length)) if len(length) else None,
        "n_flagged": n_flagged,
        "share_flagged": n_flagged / len(length) if len(length) else None,
        "counts": np.bincount(length).tolist() if len(length) else [],
    }


def flagged_samples(runs: SharedRuns, threshold: int) -> list[dict[str, int]]:
    """Every sample at or above `threshold`, longest first: its index, the run's length, the training row it
    copies and where the run starts in each. PRIVATE: these are positions of training records."""
    length = runs.length
    flagged_idx = np.flatnonzero(length >= threshold)
    flagged_idx = flagged_idx[np.argsort(-length[flagged_idx], kind="stable")]
    return [{"sample": int(i), "length": int(length[i]), "train_row": int(runs.reference_row[i]),
             "train_offset": int(runs.reference_offset[i]), "sample_offset": int(runs.query_offset[i])}
            for i in flagged_idx]


# --------------------------------------------------------------------------- the figure


def _histogram_from_counts(counts: Sequence[int], bins: np.ndarray) -> np.ndarray:
    values = np.arange(len(counts))
    return np.histogram(values, bins=bins, weights=np.asarray(counts, dtype=float))[0]


def memorisation_figure(series: dict[str, dict[str, Any]]) -> Figure:
    """Histogram of each sample's longest token run shared with a training text, one line per set of
    `memorisation_summary`s by name, the threshold marked."""
    threshold = next(iter(series.values()))["threshold"]
    top = max(max(len(s["counts"]) for s in series.values()), threshold + 2)
    bins = np.arange(0, top + 1)
    if top > 80:
        bins = np.unique(np.concatenate([np.arange(0, 40), np.geomspace(40, top, 30).astype(int)]))
    figure = Figure(figsize=(7, 3.4), layout="constrained")
    ax = figure.subplots()
    for name, summary in series.items():
        hist = _histogram_from_counts(summary["counts"], bins)
        if hist.sum():
            ax.stairs(hist, bins, label=f"{name} (max {summary['max']}, {summary['n_flagged']} flagged)")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold}")
    ax.set_yscale("log")  # the rare long runs are the point; a linear scale would hide them
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("longest run of tokens shared with any training text")
    ax.set_ylabel("texts")
    ax.legend(fontsize=8)
    return figure
