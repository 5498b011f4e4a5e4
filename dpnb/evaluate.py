"""04 evaluate: is the synthetic data useful, faithful, varied, and free of verbatim copies?

**Utility (train on synthetic, test on real).** A classifier is trained on the real training data
and, separately and with the same budget (classifier, epochs, learning rate, batch size, max_length,
seed), on each synthetic set. All of them are tested on the same real test split. If synthetic
data captured what matters in the real data for the task, the two classifiers score alike.
F1 is the binary F1 of the positive class (label 1) for two labels and the macro F1 otherwise; the
entry says which in `f1_average`.

**Fidelity, diversity, length** (synthetic sets only):
- label fidelity: the classifier trained on real data labels the synthetic texts; the share that
  agree with the label each text was prompted with, overall and per label;
- diversity: distinct-1 and distinct-2 (see `distinct_n`) and the share of duplicate samples,
  beside the same figures on an equally large random sample of real training texts (distinct-n falls
  as a corpus grows, so only equal-size corpora compare);
- length: review tokens in the generator's tokenizer, synthetic against the real training records.
  Generator tokens are the unit the generator was trained and sampled in (`max_length`,
  `max_new_tokens`), so both sides are measured as the generator saw them, truncation included.

**Memorisation screen.** For every synthetic text, the longest run of consecutive generator tokens
it shares with any training record (the review part, as the generator was trained on it), with the
training row it matches. Samples sharing `memorisation_threshold` tokens or more are listed by index
so that verbatim copies are caught before the data is shared. Tokens rather than words because the
generator can only copy what it saw, and it saw token ids of (possibly truncated) records; extraction
studies also measure in tokens (e.g. "50-token" verbatim matches). The same screen is run on the
real test split as a reference: how much held-out real reviews share with the training set without
any model involved (IMDb has some exact duplicates across its splits). `longest_shared_runs` does this
for 25,000 x 25,000 reviews in under a minute on two CPU cores, with a generalised suffix array.

Outputs: `metrics.json` with one entry per training source (`real`, `synthetic`, `zero_shot`) and a
`meta` entry; figures `confusion_<source>.png`, `lengths.png`, `memorisation.png`. Each source's
result is also kept in `evaluate/<source>.json` as soon as it is done, so an interrupted stage
resumes after the last finished source (a rerun with another config or other inputs ignores them).

Which sources run: `real` needs only prepare. `synthetic` needs a completed generate stage (an error
with the fix otherwise: the stage exists to evaluate it). `zero_shot` is used when generate wrote it
and is skipped with a note in `meta.skipped` when generate ran with `zero_shot: false`.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpnb.config import EvaluateConfig
from dpnb.errors import DpnbError, require
from dpnb.models import quiet_transformers, release_memory
from dpnb.rundir import RunDir, read_json, write_json_atomic

if TYPE_CHECKING:
    import datasets
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STAGE = "evaluate"
SOURCES = ("real", "synthetic", "zero_shot")
SYNTHETIC_SOURCES = ("synthetic", "zero_shot")
FEW_PER_LABEL = 10  # fewer training texts of a label than this: the metrics carry a warning note
MAX_GRAD_NORM = 1.0  # transformers Trainer's default, kept so the recipe matches the paper's


# --------------------------------------------------------------------------- 1. classification metrics


def f1_average(num_labels: int) -> str:
    """"binary" (F1 of the positive class, label 1) for two labels, else "macro" (mean over labels)."""
    return "binary" if num_labels == 2 else "macro"


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, F1 and the confusion matrix of predictions on a test set (sklearn).

    accuracy = correct / n. F1 = 2 P R / (P + R) with precision P and recall R of the positive class
    (binary) or averaged unweighted over the classes (macro); a class never predicted has P = 0.
    confusion_matrix[i][j] counts texts of true label i predicted as j.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels = list(range(num_labels))
    average = f1_average(num_labels)
    if average == "binary":
        f1 = f1_score(y_true, y_pred, average="binary", pos_label=1, zero_division=0)
    else:
        f1 = f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1),
        "f1_average": average,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def label_fidelity(prompted: Sequence[int], predicted: Sequence[int], label_names: Sequence[str]) -> dict[str, Any]:
    """Share of synthetic texts that the real-data classifier assigns the label they were prompted with.

    overall = mean(predicted == prompted); per_label[name] is the same mean over the texts prompted
    with that label (null when there are none).
    """
    prompted, predicted = np.asarray(prompted), np.asarray(predicted)
    agree = prompted == predicted
    per_label = {
        name: (float(agree[prompted == i].mean()) if (prompted == i).any() else None)
        for i, name in enumerate(label_names)
    }
    return {"overall": float(agree.mean()) if len(agree) else None, "per_label": per_label, "n": int(len(agree))}


# --------------------------------------------------------------------------- 2. diversity


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


# --------------------------------------------------------------------------- 3. lengths (generator tokens)


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


# --------------------------------------------------------------------------- 4. memorisation screen


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
    """The screen's figures: max, mean, histogram (`counts[k]` = samples whose longest shared run is k
    tokens) and every sample at or above `threshold`, longest first, with the training row it copies."""
    length = runs.length
    flagged_idx = np.flatnonzero(length >= threshold)
    flagged_idx = flagged_idx[np.argsort(-length[flagged_idx], kind="stable")]
    flagged = [
        {"sample": int(i), "length": int(length[i]), "train_row": int(runs.reference_row[i]),
         "train_offset": int(runs.reference_offset[i]), "sample_offset": int(runs.query_offset[i])}
        for i in flagged_idx
    ]
    return {
        "unit": "generator tokens",
        "threshold": threshold,
        "max": int(length.max(initial=0)),
        "mean": float(length.mean()) if len(length) else None,
        "median": float(np.median(length)) if len(length) else None,
        "n_flagged": len(flagged),
        "share_flagged": len(flagged) / len(length) if len(length) else None,
        "flagged": flagged,
        "counts": np.bincount(length).tolist() if len(length) else [],
    }


# --------------------------------------------------------------------------- 5. the classifier


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and GPU): head initialisation, dropout and shuffling."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainedClassifier:
    """A fine-tuned classifier in eval mode, with its tokenizer, the optimizer steps taken, the mean
    training loss of the last 10 steps, and the wall time of loading and training."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    steps: int
    final_loss: float | None
    wall_s: float


def train_classifier(
    texts: Sequence[str], labels: Sequence[int], num_labels: int, cfg: EvaluateConfig, device: str
) -> TrainedClassifier:
    """Fine-tune `cfg.classifier` on (texts, labels): the paper's recipe as a plain torch loop.

    AdamW (weight decay 0), learning rate decaying linearly from `cfg.lr` to 0, no warm-up, gradient
    norm clipped at 1, `ceil(epochs * n / batch_size)` steps over reshuffled epochs: the defaults of
    transformers' Trainer, which the paper used. Everything random (head initialisation, dropout,
    order) comes from `cfg.seed`, so a run on the same machine repeats exactly.
    """
    import torch

    from dpnb.models import load_classifier

    started = time.time()
    seed_everything(cfg.seed)
    with quiet_transformers(errors_only=True):
        model, tokenizer = load_classifier(cfg.classifier, num_labels)
    model.to(device).train()
    encoded = tokenizer(list(texts), truncation=True, max_length=cfg.max_length)["input_ids"]
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(encoded)
    total_steps = max(1, math.ceil(cfg.epochs * math.ceil(n / cfg.batch_size)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    order_rng = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    step = 0
    while step < total_steps:
        order = torch.randperm(n, generator=order_rng).tolist()
        for start in range(0, n, cfg.batch_size):
            if step == total_steps:
                break
            rows = order[start : start + cfg.batch_size]
            input_ids, attention_mask = _pad([encoded[i] for i in rows], tokenizer.pad_token_id)
            loss = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         labels=targets[rows].to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
    model.eval()
    tail = losses[-10:]
    return TrainedClassifier(model, tokenizer, step, sum(tail) / len(tail) if tail else None,
                             time.time() - started)


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids to the longest in the batch; the mask marks the real tokens."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def predict(classifier: TrainedClassifier, texts: Sequence[str], max_length: int, batch_size: int,
            device: str) -> np.ndarray:
    """The most likely label of each text."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = classifier.tokenizer(list(texts[start : start + batch_size]), truncation=True,
                                         max_length=max_length, padding=True, return_tensors="pt").to(device)
            out.append(classifier.model(**batch).logits.argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- 6. one training source


@dataclass
class Source:
    """One training set: its name, texts and labels."""

    name: str
    texts: list[str]
    labels: list[int]


def _training_notes(labels: Sequence[int], label_names: Sequence[str]) -> list[str]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(label_names))
    few = [f"{name} ({count})" for name, count in zip(label_names, counts, strict=True) if 0 < count < FEW_PER_LABEL]
    if few:
        return [f"few training texts for {', '.join(few)}: the metrics are noisy"]
    return []


def train_and_test(
    source: Source, test: Source, label_names: Sequence[str], cfg: EvaluateConfig, device: str,
    keep_model: bool = False,
) -> tuple[dict[str, Any], TrainedClassifier | None]:
    """Train the classifier on `source` and score it on `test`; a set it cannot learn from is reported.

    An empty set yields no metrics, with a note. A set holding a single label yields the metrics of
    predicting that label for every test text (all a classifier trained on it can learn), with a note.
    """
    num_labels = len(label_names)
    base = {"n_train": len(source.texts), "n_test": len(test.texts), "f1_average": f1_average(num_labels),
            "label_counts": {name: int(np.sum(np.asarray(source.labels) == i)) for i, name in enumerate(label_names)}}
    if not source.texts:
        return {**base, "accuracy": None, "f1": None, "confusion_matrix": None, "trained": False,
                "notes": [f"{source.name} holds no texts: nothing to train on"]}, None
    present = sorted(set(source.labels))
    if len(present) == 1:
        only = present[0]
        metrics = classification_metrics(test.labels, [only] * len(test.labels), num_labels)
        note = (f"{source.name} holds only label '{label_names[only]}': a classifier trained on it can only "
                f"predict that label, so these are the metrics of predicting it for every test text")
        return {**base, **metrics, "trained": False, "notes": [note]}, None
    print(f"{source.name}: training {cfg.classifier} on {len(source.texts)} texts ...", flush=True)
    classifier = train_classifier(source.texts, source.labels, num_labels, cfg, device)
    predicted = predict(classifier, test.texts, cfg.max_length, 2 * cfg.batch_size, device)
    entry = {**base, **classification_metrics(test.labels, predicted.tolist(), num_labels), "trained": True,
             "steps": classifier.steps, "final_loss": classifier.final_loss,
             "train_wall_s": round(classifier.wall_s, 1), "notes": _training_notes(source.labels, label_names)}
    if keep_model:
        return entry, classifier
    del classifier
    release_memory()
    return entry, None


def synthetic_quality(
    source: Source, source_ids: list[np.ndarray], train_ids: list[np.ndarray], train_texts: Sequence[str],
    label_names: Sequence[str], cfg: EvaluateConfig,
) -> dict[str, Any]:
    """Diversity (with an equal-size real reference), lengths and the memorisation screen of one set."""
    rng = np.random.default_rng(cfg.seed)
    reference_rows = rng.permutation(len(train_texts))[: len(source.texts)]
    runs = longest_shared_runs(train_ids, source_ids)
    return {
        "diversity": {**diversity(source.texts),
                      "real_reference": diversity([train_texts[i] for i in reference_rows])},
        "length": length_summary([len(ids) for ids in source_ids]),
        "memorisation": memorisation_summary(runs, cfg.memorisation_threshold),
    }


# --------------------------------------------------------------------------- 7. the stage


def plan_sources(run: RunDir, cfg: EvaluateConfig) -> tuple[list[str], dict[str, str]]:
    """The sources to evaluate now, and the skipped ones with the reason (see the module docstring)."""
    wanted_synthetic = [s for s in cfg.sources if s in SYNTHETIC_SOURCES]
    if wanted_synthetic and not run.is_complete("generate"):
        raise DpnbError(
            f"evaluate.sources lists {', '.join(wanted_synthetic)} but the generate stage has not completed "
            f"in {run.path}: run generate first (03_generate), or set evaluate.sources to [real]"
        )
    chosen, skipped = [], {}
    for source in SOURCES:
        if source not in cfg.sources:
            continue
        path = run.synthetic if source == "synthetic" else run.zero_shot
        if source in SYNTHETIC_SOURCES and not (path / "state.json").exists():
            made = source == "synthetic" or (run.completed_config("generate") or {}).get("zero_shot", True)
            if made:
                raise DpnbError(f"{path} holds no data set although generate completed; rerun generate with "
                                f"force=True")
            skipped[source] = "generate ran with zero_shot: false, so there is no zero-shot set"
            continue
        chosen.append(source)
    return chosen, skipped


def _load_source(run: RunDir, name: str, num_labels: int) -> Source:
    from dpnb.generate import load_synthetic

    data = load_synthetic(getattr(run, name))
    labels = [int(v) for v in data["label"]]
    bad = sorted({v for v in labels if not 0 <= v < num_labels})
    require(not bad, f"{name} has labels {bad} outside 0..{num_labels - 1} of data/manifest.json; rerun generate "
                     f"with force=True")
    return Source(name, list(data["text"]), labels)


def _cached(partial_dir: Path, name: str, key: str, compute: Any) -> dict[str, Any]:
    """A source's result from an earlier, interrupted run with the same key, else computed and kept."""
    path = partial_dir / f"{name}.json"
    if path.exists():
        saved = read_json(path)
        if saved.get("key") == key:
            print(f"{name}: reusing the result of an interrupted run", flush=True)
            return saved["result"]
    result = compute()
    write_json_atomic(path, {"key": key, "result": result})
    return result


def run_stage(run: RunDir, cfg: EvaluateConfig, force: bool = False) -> dict[str, Any]:
    """Evaluate every source in `cfg.sources`; write metrics.json and figures; return the metrics.

    Needs prepare (and generate for synthetic sources). Skips when already done with this config and
    the same inputs, refuses a different config unless `force`, and resumes after the last finished
    source. Returns the contents of metrics.json.
    """
    run.require_stage("prepare")
    sources, skipped = plan_sources(run, cfg)
    # should_run also refuses metrics of data that prepare or generate has since replaced
    if not run.should_run(STAGE, cfg, force):
        require(run.metrics.exists(), f"{run.metrics} is missing although evaluate completed; rerun it with "
                                      f"force=True")
        return read_json(run.metrics)
    started = time.time()

    from dpnb.data import load_prepared, stratified_indices
    from dpnb.models import load_tokenizer, resolve_device

    partial_dir = run.path / STAGE
    if force:
        shutil.rmtree(partial_dir, ignore_errors=True)
    key = run.fingerprint(STAGE, cfg)  # a finished source is reused only for the same config and inputs
    train, test, manifest = load_prepared(run)
    label_names = list(manifest["label_names"])
    num_labels = len(label_names)
    device = resolve_device(cfg.device)
    generator_tokenizer = load_tokenizer(manifest["model"])

    train_texts, train_labels = list(train["text"]), [int(v) for v in train["label"]]
    test_set = Source("test", list(test["text"]), [int(v) for v in test["label"]])
    synthetic = {name: _load_source(run, name, num_labels) for name in sources if name in SYNTHETIC_SOURCES}
    train_ids = review_token_ids(train, generator_tokenizer.eos_token_id)
    metrics: dict[str, Any] = {}

    if "real" in sources:
        rows = stratified_indices(np.asarray(train_labels), cfg.n_real_train, cfg.seed, "evaluate.n_real_train")
        real = Source("real", [train_texts[i] for i in rows], [train_labels[i] for i in rows])

        def evaluate_real() -> dict[str, Any]:
            entry, classifier = train_and_test(real, test_set, label_names, cfg, device, keep_model=True)
            fidelity = {}
            for name, source in synthetic.items():
                if classifier is None:
                    fidelity[name] = {"overall": None, "per_label": None, "n": len(source.texts),
                                      "note": "the real-data classifier was not trained"}
                    continue
                predicted = predict(classifier, source.texts, cfg.max_length, 2 * cfg.batch_size, device)
                fidelity[name] = label_fidelity(source.labels, predicted, label_names)
            del classifier
            release_memory()
            return {**entry, "fidelity_of": fidelity}

        metrics["real"] = _cached(partial_dir, "real", key, evaluate_real)

    for name, source in synthetic.items():
        def evaluate_synthetic(source: Source = source) -> dict[str, Any]:
            entry, _ = train_and_test(source, test_set, label_names, cfg, device)
            print(f"{source.name}: diversity, lengths, memorisation screen ...", flush=True)
            ids = text_token_ids(source.texts, generator_tokenizer)
            return {**entry, **synthetic_quality(source, ids, train_ids, train_texts, label_names, cfg)}

        metrics[name] = _cached(partial_dir, name, key, evaluate_synthetic)
        fidelity = metrics.get("real", {}).get("fidelity_of", {}).get(name)
        metrics[name]["label_fidelity"] = fidelity or {
            "overall": None, "per_label": None, "n": len(source.texts),
            "note": "needs the real-data classifier: add real to evaluate.sources"}
    if "real" in metrics:
        metrics["real"].pop("fidelity_of", None)

    def evaluate_reference() -> dict[str, Any]:
        print("real test reviews: memorisation screen against the training set (reference) ...", flush=True)
        test_ids = review_token_ids(test, generator_tokenizer.eos_token_id)
        return {"train_length": length_summary([len(ids) for ids in train_ids]),
                "test_memorisation": memorisation_summary(longest_shared_runs(train_ids, test_ids),
                                                          cfg.memorisation_threshold)}

    reference = _cached(partial_dir, "reference", key, evaluate_reference) if synthetic else None
    metrics["meta"] = {
        "classifier": cfg.classifier,
        "label_names": label_names,
        "f1_average": f1_average(num_labels),
        "positive_label": label_names[1] if num_labels == 2 else None,
        "n_test": len(test_set.texts),
        "n_train_prepared": len(train_texts),
        "generator_tokenizer": manifest["model"],
        "device": device,
        "sources": list(metrics),
        "skipped": skipped,
        "real_reference": reference,
    }
    write_json_atomic(run.metrics, metrics)
    save_figures(run, metrics)
    run.mark_complete(STAGE, cfg, started)
    shutil.rmtree(partial_dir, ignore_errors=True)  # the partial results are in metrics.json now
    return read_json(run.metrics)  # the same values a skipped run returns


def evaluated_sources(metrics: dict[str, Any]) -> list[str]:
    """The training sources present in a metrics.json, in the canonical order."""
    return [s for s in SOURCES if isinstance(metrics.get(s), dict)]


# --------------------------------------------------------------------------- 8. tables and figures


def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per training source: counts, accuracy, F1, fidelity, diversity, length, memorisation."""
    import pandas as pd

    rows = {}
    for source in evaluated_sources(metrics):
        entry = metrics[source]
        row = {"n_train": entry["n_train"], "n_test": entry["n_test"], "accuracy": entry["accuracy"],
               "f1": entry["f1"]}
        if source in SYNTHETIC_SOURCES:
            row.update({
                "label_fidelity": entry["label_fidelity"]["overall"],
                "distinct_1": entry["diversity"]["distinct_1"],
                "distinct_2": entry["diversity"]["distinct_2"],
                "duplicate_share": entry["diversity"]["duplicate_share"],
                "mean_tokens": entry["length"]["mean"],
                "max_shared_run": entry["memorisation"]["max"],
                "n_flagged": entry["memorisation"]["n_flagged"],
            })
        rows[source] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def quality_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Synthetic sets beside the real reference: fidelity per label, diversity, length, memorisation."""
    import pandas as pd

    meta = metrics["meta"]
    reference = meta.get("real_reference") or {}
    rows: dict[str, dict[str, Any]] = {}
    for source in evaluated_sources(metrics):
        if source not in SYNTHETIC_SOURCES:
            continue
        entry = metrics[source]
        per_label = entry["label_fidelity"].get("per_label") or {}
        rows[source] = {
            **{f"fidelity {name}": per_label.get(name) for name in meta["label_names"]},
            "distinct_1": entry["diversity"]["distinct_1"], "distinct_2": entry["diversity"]["distinct_2"],
            "duplicate_share": entry["diversity"]["duplicate_share"],
            "median_tokens": entry["length"]["median"], "max_shared_run": entry["memorisation"]["max"],
        }
        real = entry["diversity"]["real_reference"]
        rows[f"real sample (size of {source})"] = {
            "distinct_1": real["distinct_1"], "distinct_2": real["distinct_2"],
            "duplicate_share": real["duplicate_share"],
        }
    if reference:
        rows["real train"] = {"median_tokens": reference["train_length"]["median"]}
        rows["real test vs train"] = {"max_shared_run": reference["test_memorisation"]["max"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def flagged_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Every synthetic sample at or above the memorisation threshold, with the training row it shares."""
    import pandas as pd

    rows = [{"source": source, **flag} for source in evaluated_sources(metrics) if source in SYNTHETIC_SOURCES
            for flag in metrics[source]["memorisation"]["flagged"]]
    return pd.DataFrame(rows, columns=["source", "sample", "length", "train_row", "train_offset", "sample_offset"])


def sample_table(run: RunDir, per_label: int = 2, max_chars: int = 240, seed: int = 0) -> pd.DataFrame:
    """A few random texts per label from the real training data and each synthetic set, side by side."""
    import pandas as pd

    from dpnb.data import load_prepared
    from dpnb.generate import load_synthetic

    train, _, manifest = load_prepared(run)
    sets = {"real": train}
    for name in SYNTHETIC_SOURCES:
        if (getattr(run, name) / "state.json").exists():
            sets[name] = load_synthetic(getattr(run, name))
    rng = np.random.default_rng(seed)
    rows = []
    for label, label_name in enumerate(manifest["label_names"]):
        for name, data in sets.items():
            rows_of_label = np.flatnonzero(np.asarray(data["label"]) == label)
            for i in rng.permutation(rows_of_label)[:per_label]:
                text = data[int(i)]["text"]
                rows.append({"label": label_name, "source": name,
                             "text": text if len(text) <= max_chars else text[:max_chars].rstrip() + " ..."})
    return pd.DataFrame(rows)


def plot_confusion(entry: dict[str, Any], label_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix of one source's classifier on the real test set (counts)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    figure = Figure(figsize=(3.8, 3.4), layout="constrained")
    ax = figure.subplots()
    if entry.get("confusion_matrix") is None:
        ax.text(0.5, 0.5, "not trained", ha="center", va="center")
        ax.set_axis_off()
    else:
        ConfusionMatrixDisplay(np.asarray(entry["confusion_matrix"]), display_labels=list(label_names)).plot(
            ax=ax, colorbar=False, values_format="d")
    if entry.get("accuracy") is not None:
        title = f"{title}\naccuracy {entry['accuracy']:.3f}, F1 {entry['f1']:.3f}"
    ax.set_title(title, fontsize=10)
    return figure


def _histogram_from_counts(counts: Sequence[int], bins: np.ndarray) -> np.ndarray:
    values = np.arange(len(counts))
    return np.histogram(values, bins=bins, weights=np.asarray(counts, dtype=float))[0]


def plot_lengths(metrics: dict[str, Any]) -> Figure:
    """Review lengths in generator tokens: real training records against each synthetic set (density)."""
    from matplotlib.figure import Figure

    reference = metrics["meta"]["real_reference"]
    series = {"real train": reference["train_length"]["counts"]}
    series.update({source: metrics[source]["length"]["counts"] for source in evaluated_sources(metrics)
                   if source in SYNTHETIC_SOURCES})
    top = max(len(c) for c in series.values())
    bins = np.linspace(0, max(top, 2), min(max(top, 2), 60) + 1)
    figure = Figure(figsize=(7, 3.4), layout="constrained")
    ax = figure.subplots()
    for name, counts in series.items():
        hist = _histogram_from_counts(counts, bins)
        if hist.sum():
            ax.stairs(hist / hist.sum(), bins, label=f"{name} ({int(sum(counts))})", fill=name == "real train",
                      alpha=0.35 if name == "real train" else 1.0)
    ax.set_xlabel("review length (generator tokens)")
    ax.set_ylabel("share of texts")
    ax.legend()
    return figure


def plot_memorisation(metrics: dict[str, Any]) -> Figure:
    """Histogram of each sample's longest token run shared with a training text, threshold marked."""
    from matplotlib.figure import Figure

    reference = metrics["meta"]["real_reference"]
    series = {source: metrics[source]["memorisation"] for source in evaluated_sources(metrics)
              if source in SYNTHETIC_SOURCES}
    series["real test (reference)"] = reference["test_memorisation"]
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
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_yscale("log")  # the rare long runs are the point; a linear scale would hide them
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("longest run of tokens shared with any training text")
    ax.set_ylabel("texts")
    ax.legend(fontsize=8)
    return figure


def save_figures(run: RunDir, metrics: dict[str, Any]) -> list[Path]:
    """Write the stage's figures into run/figures (atomically) and return their paths."""
    from dpnb.data import save_figure

    meta = metrics["meta"]
    saved = []
    for source in evaluated_sources(metrics):
        figure = plot_confusion(metrics[source], meta["label_names"], f"trained on {source}")
        saved.append(save_figure(figure, run.figure(f"confusion_{source}.png")))
    if meta.get("real_reference"):
        saved.append(save_figure(plot_lengths(metrics), run.figure("lengths.png")))
        saved.append(save_figure(plot_memorisation(metrics), run.figure("memorisation.png")))
    return saved
