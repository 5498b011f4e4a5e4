"""01 prepare: labelled text in, training-ready token records out.

The stage reads top to bottom, one step per module:

1-3. **load, validate, subsample** the train and test splits named by `prepare.source`
     (`dpnb.data.sources`: Hub id, local mirror, files or folders; every problem one `DpnbError` line);
4.   **format and tokenise** each sampled record: `<br />` line breaks removed (`strip_html`), then
     prompt + review + EOS with `PromptFormat`, cut to `max_length` tokens (`dpnb.data.prompts`);
5.   **stats**: counts, dropped rows, token-length percentiles, truncation, duplicates
     (`dpnb.data.textstats.split_stats`); the token-length figure;
6.   **write** `data/train`, `data/test`, `data/manifest.json`, `data_stats.json` and
     `figures/token_lengths.png` into the run directory, atomically, then the completion marker
     (the format of data/, and `load_prepared` that reads it back: `dpnb.data.prepared`).

In DP fine-tuning the unit of privacy is one record: one review here. That is why duplicates are
counted (a review present twice has twice the influence) and why every record is cut to the same
token budget.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import datasets
import pandas as pd

from dpnb import models
from dpnb.config import PrepareConfig
from dpnb.data.prepared import to_dataset, train_sha256
from dpnb.data.prompts import PromptFormat, encode_records
from dpnb.data.sources import load_splits, subsample, validate_split
from dpnb.data.textstats import split_stats, token_lengths_figure
from dpnb.errors import require
from dpnb.io import atomic_directory, read_json, save_figure, write_json_atomic
from dpnb.rundir import RunDir

STAGE = "prepare"


# --------------------------------------------------------------------------- stats


def stats_table(stats: dict[str, Any]) -> pd.DataFrame:
    """data_stats.json as one table: a row per figure, a column per split (for the notebook)."""
    table = {}
    for role, split in stats["splits"].items():
        column = {"rows read": split["rows_read"]}
        column.update({f"dropped: {reason.replace('_', ' ')}": n for reason, n in split["dropped"].items()})
        column["records"] = split["records"]
        column.update({f"label {name}": n for name, n in split["per_label"].items()})
        column.update({f"tokens {q}": value for q, value in split["token_length"].items()})
        column["truncated (%)"] = round(100 * split["fraction_truncated"], 1)
        column["duplicate texts"] = split["duplicate_texts"]
        table[role] = pd.Series(column, dtype=object)  # counts stay whole numbers beside the percentiles
    return pd.DataFrame(table)


# --------------------------------------------------------------------------- the stage


class Prepared(NamedTuple):
    train: dict[str, list]
    test: dict[str, list]
    manifest: dict[str, Any]
    stats: dict[str, Any]


def _require_max_length_fits(cfg: PrepareConfig, tokenizer: Any) -> None:
    """A record cut to max_length must fit the model's positions (its config's, and its tokenizer's limit)."""
    limits = [n for n in (models.tokenizer_context(tokenizer), models.generator_positions(cfg.model)) if n]
    limit = min(limits, default=None)
    require(limit is None or cfg.max_length <= limit,
            f"prepare.max_length = {cfg.max_length} exceeds the {limit} positions of {cfg.model}; lower "
            f"prepare.max_length to at most {limit}")


def check_data(cfg: PrepareConfig) -> int:
    """Steps 1-3 and the token budget, writing nothing; returns N, the number of training records.

    `dpnb run` calls it before any stage starts, so that every problem of the data (a missing column,
    a file that is not UTF-8, unknown labels, one class, too many empty texts, max_length beyond the
    model) is one line before a notebook runs or anything in the run directory changes.
    """
    raw, _ = load_splits(cfg)
    _require_max_length_fits(cfg, models.load_tokenizer(cfg.model))
    sizes = {}
    for role, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        checked, _ = validate_split(raw[role], cfg)
        sizes[role] = len(subsample(checked, n, cfg.seed, role, cfg.label_names))
    return sizes["train"]


def prepare_data(cfg: PrepareConfig) -> Prepared:
    """Steps 1-5 in memory: load, validate, subsample, format and tokenise, and count."""
    raw, description = load_splits(cfg)
    tokenizer = models.load_tokenizer(cfg.model)  # through the module, so tests can hand in a loaded one
    _require_max_length_fits(cfg, tokenizer)
    fmt = PromptFormat.from_config(cfg)
    columns, stats = {}, {}
    for role, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        checked, dropped = validate_split(raw[role], cfg)
        sample = subsample(checked, n, cfg.seed, role, cfg.label_names)
        columns[role] = encode_records(sample, fmt, tokenizer, cfg)
        stats[role] = split_stats(columns[role], cfg.label_names, len(raw[role].frame), dropped)
    train, test = columns["train"], columns["test"]
    manifest = {
        "model": cfg.model,
        "prompt": fmt.to_dict(),
        "label_names": list(cfg.label_names),
        "max_length": cfg.max_length,
        "n_train": len(train["label"]),
        "n_test": len(test["label"]),
        "source": cfg.source,
        "source_read": description,
        "seed": cfg.seed,
        "train_sha256": train_sha256(train),
    }
    data_stats = {
        "label_names": list(cfg.label_names),
        "max_length": cfg.max_length,
        "prompt_tokens": {name: len(fmt.prompt_ids(name, tokenizer)) for name in cfg.label_names},
        "splits": stats,
        "texts_in_both_splits": len(set(train["text"]) & set(test["text"])),
    }
    return Prepared(train, test, manifest, data_stats)


def run_stage(run: RunDir, cfg: PrepareConfig, force: bool = False) -> dict[str, Any]:
    """Prepare the data into `run` and return data_stats (read back from disk when already done)."""
    if not run.should_run(STAGE, cfg, force):
        return read_json(run.data_stats)
    started = time.time()
    prepared = prepare_data(cfg)
    with _quiet_datasets(), atomic_directory(run.data) as staging:
        to_dataset(prepared.train).save_to_disk(staging / "train")
        to_dataset(prepared.test).save_to_disk(staging / "test")
        write_json_atomic(staging / "manifest.json", prepared.manifest)
    write_json_atomic(run.data_stats, prepared.stats)
    splits = {"train": prepared.train, "test": prepared.test}
    save_figure(token_lengths_figure(splits, cfg.label_names, cfg.max_length), run.figure("token_lengths.png"))
    run.mark_complete(STAGE, cfg, started)
    return read_json(run.data_stats)  # the same values a skipped run returns


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the `datasets` progress bars while saving (they would clutter the notebook)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
