"""The prepared data (data/ of a run directory): its format, its hash, and reading it back.

The prepare stage (`dpnb.stages.prepare`) writes `data/train` and `data/test` as `datasets` on disk
with the types of `to_dataset` (columns `text`, `label`, `label_name`, `input_ids` = prompt + review
+ EOS cut to `max_length`, `prompt_length`, `n_tokens`, `truncated`) and `data/manifest.json`
(model, prompt format, label names, sizes, source, seed, `train_sha256`). Every later stage reads
them with `load_prepared`. All of it is private: these are the records.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value, load_from_disk

from dpnb.errors import require
from dpnb.io import read_json
from dpnb.rundir import RunDir


def to_dataset(columns: dict[str, list]) -> Dataset:
    """One split's records (`encode_records`'s columns) as a `datasets.Dataset` with the contract's types."""
    features = Features({
        "text": Value("string"), "label": Value("int64"), "label_name": Value("string"),
        "input_ids": List(Value("int32")), "prompt_length": Value("int32"), "n_tokens": Value("int32"),
        "truncated": Value("bool"),
    })
    return Dataset.from_dict(columns, features=features)


def train_sha256(columns: dict[str, list]) -> str:
    """sha256 over the training records in order: for each, its label and its number of ids as
    little-endian int64, then its ids as little-endian int32. Equal hashes mean equal training data."""
    digest = hashlib.sha256()
    for label, ids in zip(columns["label"], columns["input_ids"], strict=True):
        digest.update(np.asarray([label, len(ids)], dtype="<i8").tobytes())
        digest.update(np.asarray(ids, dtype="<i4").tobytes())
    return digest.hexdigest()


def load_prepared(run: RunDir) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """The prepared train and test records and the manifest, for the stages after prepare."""
    run.require_stage("prepare")
    parts = (run.data / "train", run.data / "test", run.data / "manifest.json")
    for path in parts:
        require(path.exists(), f"{path} is missing although prepare completed; rerun prepare with force=True")
    return load_from_disk(str(parts[0])), load_from_disk(str(parts[1])), read_json(parts[2])
