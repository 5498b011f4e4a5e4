"""Canaries: planted secrets shaped like training records, and how far training exposed them.

A canary ("The Secret Sharer", Carlini et al. 2019; "The Canary's Echo", Meeus et al. 2025) is a
training-shaped record whose text is the start of a real held-out review followed by a suffix of
random words: easy to recognise, impossible to predict. It is built by the same `PromptFormat` as
every training record, so it differs from a real review only in its text. Stage 06 inserts each
canary into the training set with probability 1/2 and scores it by how much more likely training
made its random words (`dpnb.auditing.attacks`).

Exposure (Carlini et al.) says how far up the ranking of all possible suffixes a canary climbed, in
bits: exposure = log2 |R| - log2 rank, with rank 1 the model's favourite among the |R| possible
secrets. |R| = vocabulary^suffix length is astronomical, so the rank is estimated against n
reference canaries drawn the same way but never inserted (`exposure`), or from a skew-normal fitted
to the reference scores (`exposure_extrapolated`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
from scipy import stats

from dpnb.errors import DpnbError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from dpnb.data.prompts import PromptFormat


# =========================================================================== canary records

_WORD_TOKEN = re.compile(r"Ġ[a-z]{3,12}")  # byte-level BPE: "Ġ" is the space before a word


def word_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ids of tokens that are a space and one lowercase word, and that tokenise back to themselves.

    Random draws from these make a suffix of random words: high perplexity, yet plain text whose
    tokens survive decoding and re-encoding, so the attacker who reads the text sees the same tokens.
    Tokenizers without byte-level "Ġ" word pieces fall back to decoding every token.
    """
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    words = {i: " " + p[1:] for i, p in enumerate(pieces) if isinstance(p, str) and _WORD_TOKEN.fullmatch(p)}
    if not words:
        decoded = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        words = {i: d for i, d in enumerate(decoded) if re.fullmatch(r" [a-z]{3,12}", d)}
    special = set(tokenizer.all_special_ids)
    candidates = [i for i in words if i not in special]
    encoded = tokenizer([words[i] for i in candidates], add_special_tokens=False)["input_ids"]
    ids = np.array([i for i, e in zip(candidates, encoded, strict=True) if e == [i]], dtype=np.int64)
    if ids.size < 100:
        raise DpnbError("the tokenizer has fewer than 100 whole-word tokens to draw canary suffixes from; "
                        "use a generator with a byte-level BPE vocabulary (GPT-2, Llama, SmolLM2)")
    return ids


def find_span(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """Start of the last occurrence of `needle` in `haystack`, or -1."""
    n = len(needle)
    for start in range(len(haystack) - n, -1, -1):
        if list(haystack[start: start + n]) == list(needle):
            return start
    return -1


def make_canaries(sources: Sequence[tuple[str, int]], label_names: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                  prompt_format: PromptFormat, max_length: int, *, prefix_tokens: int, suffix_tokens: int,
                  rng: np.random.Generator) -> list[dict[str, Any]]:
    """One canary per (review text, label) source: label prompt + review start + random words + EOS.

    The record is built by the same `PromptFormat.encode` as every training record, so a canary
    differs from a real review only in its text. `suffix_start`/`suffix_end` locate the random words
    in `input_ids` (the tokens whose loss is the canary's score).
    """
    vocabulary = word_token_ids(tokenizer)
    canaries = []
    for number, (review, label) in enumerate(sources):
        review_ids = tokenizer(review, add_special_tokens=False)["input_ids"][:prefix_tokens]
        prefix = tokenizer.decode(review_ids).rstrip()
        suffix_ids = rng.choice(vocabulary, size=suffix_tokens, replace=True).tolist()
        suffix = tokenizer.decode(suffix_ids)
        text = prefix + suffix
        label_name = label_names[label]
        input_ids, truncated = prompt_format.encode(label_name, text, tokenizer, max_length)
        start = find_span(input_ids, suffix_ids)
        if truncated or start < 0:
            raise DpnbError(
                f"a canary does not fit in prepare.max_length = {max_length} tokens; lower "
                f"audit.canary_prefix_tokens ({prefix_tokens}) or audit.canary_suffix_tokens ({suffix_tokens})"
            )
        canaries.append({
            "canary_id": number, "label": int(label), "label_name": label_name, "prefix": prefix,
            "suffix": suffix, "text": text, "input_ids": list(map(int, input_ids)),
            "prompt_length": len(prompt_format.prompt_ids(label_name, tokenizer)),
            "suffix_start": start, "suffix_end": start + suffix_tokens, "suffix_ids": suffix_ids,
        })
    return canaries


def canary_training_rows(canaries: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Canaries as rows with the prepared training set's columns (`data/train` file contract)."""
    values = {
        "text": lambda c: c["text"], "label": lambda c: c["label"], "label_name": lambda c: c["label_name"],
        "input_ids": lambda c: c["input_ids"], "prompt_length": lambda c: c["prompt_length"],
        "n_tokens": lambda c: len(c["input_ids"]), "truncated": lambda c: False,
    }
    missing = [c for c in columns if c not in values]
    if missing:
        raise DpnbError(f"the prepared training set has column(s) {', '.join(missing)} the audit cannot fill "
                        f"for canaries; rerun prepare with this version of dpnb")
    return [{column: values[column](c) for column in columns} for c in canaries]


def with_canaries(train: datasets.Dataset, canaries: Sequence[dict[str, Any]], inserted: Sequence[bool],
                  repeats: int) -> datasets.Dataset:
    """The training set plus each inserted canary `repeats` times: the records the twins train on."""
    chosen = [c for c, keep in zip(canaries, inserted, strict=True) if keep]
    rows = canary_training_rows(chosen, train.column_names) * repeats
    if not rows:
        return train
    extra = datasets.Dataset.from_list(rows, features=train.features)
    return datasets.concatenate_datasets([train, extra])


def canary_text_ids(canary: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int]:
    """The canary text as an attacker who reads it tokenises it, and where its random words start."""
    ids = tokenizer(canary["text"], add_special_tokens=False)["input_ids"]
    start = find_span(ids, canary["suffix_ids"])
    if start < 0:  # the words re-tokenised differently: score the text's last suffix-length tokens
        start = max(0, len(ids) - len(canary["suffix_ids"]))
    return ids, start


# =========================================================================== exposure


def exposure(canary_scores: Sequence[float], reference_scores: Sequence[float]) -> np.ndarray:
    """Exposure in bits of each canary, ranked against reference suffixes that were never trained on.

    Carlini et al. define exposure = log2 |R| - log2 rank, where rank is the canary's position among
    all |R| possible secrets ordered by the model's preference (rank 1: the model's favourite). |R|
    is astronomically large here (vocabulary^suffix length), so the rank is estimated from a random
    sample of n references drawn like the canaries: rank / |R| is estimated by the canary's rank
    among itself and the references, divided by n + 1:

        exposure = log2(n + 1) - log2(1 + #{references scoring at least as high as the canary})

    Higher scores mean "more likely trained on". Ties count against the canary (conservative).
    The estimate lies in [0, log2(n + 1)]: a canary no reference beats gets the maximum. A canary
    the model never saw ranks uniformly among the references, so its exposure is about -log2(U) for
    U uniform on (0, 1]: mean 1 / ln 2 = 1.44 bits.
    """
    canaries = np.asarray(canary_scores, dtype=float)
    references = np.sort(np.asarray(reference_scores, dtype=float))
    if references.size == 0:
        raise DpnbError("exposure needs at least one reference score; set audit.n_reference >= 1")
    at_least = references.size - np.searchsorted(references, canaries, side="left")
    return np.log2(references.size + 1) - np.log2(1 + at_least)


def exposure_extrapolated(canary_scores: Sequence[float], reference_scores: Sequence[float]) -> np.ndarray:
    """Exposure from a skew-normal fitted to the reference scores (Carlini et al.'s extrapolation).

    exposure = -log2 P[reference score >= canary score] under the fitted distribution. Unlike the
    rank estimate it is not capped at log2(n + 1), at the price of trusting the fitted tail.
    """
    references = np.asarray(reference_scores, dtype=float)
    if references.size < 3:
        raise DpnbError("the extrapolated exposure fits a distribution: set audit.n_reference >= 3")
    canaries = np.asarray(canary_scores, dtype=float)
    if np.std(references) == 0:  # e.g. a model that did not change: no tail to fit
        return np.full(canaries.shape, np.nan)
    try:
        shape, loc, scale = stats.skewnorm.fit(references)
    except (stats.FitError, RuntimeError):  # the optimiser can fail on near-symmetric data: fit a normal
        shape, (loc, scale) = 0.0, stats.norm.fit(references)
    return -stats.skewnorm.logsf(canaries, shape, loc, scale) / math.log(2)
