"""Reading a labelled text data set: the train and test splits, checked and subsampled (stage 01's steps 1-3).

1. **load** the train and test splits named by `prepare.source`, which is one of
   - a Hugging Face Hub data set id (default `stanfordnlp/imdb`), read with `datasets.load_dataset`.
     For the default id, when the environment variable `DPNB_DATA_DIR` is set, its local mirror is
     read instead: a directory holding `train.csv.gz` and `test.csv.gz`;
   - a local directory with one file per split, named after the split (`prepare.train_split`,
     `prepare.test_split`): `train.csv`, `test.jsonl.gz`, ... Formats: csv, tsv, jsonl, parquet,
     each optionally gzipped (`.gz`);
   - a local directory in the `aclImdb` layout: `train/pos/*.txt`, `train/neg/*.txt`, `test/...`,
     one review per file. `neg` is label 0 and `pos` label 1 (the Hub's convention); aclImdb's
     unlabelled `unsup/` folder is skipped; any other folder is named after its label;
   - two files, train first: `"path/train.csv,path/test.csv"`.
2. **validate**: the text and label columns exist; null or empty texts are dropped and counted (more
   than `max_dropped_fraction` of a split is an error); every label is an index into `label_names`
   (a whole number, written as a number or as text) or equal to one of the names; each split has
   at least two classes; files are UTF-8. Every problem is one `DpnbError` line with its fix.
3. **subsample** each split to `n_train` / `n_test` records, stratified by label and seeded.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import datasets.config
import huggingface_hub.constants
import numpy as np
import pandas as pd

from dpnb.config import PrepareConfig
from dpnb.errors import DpnbError, require
from dpnb.models import hub_offline

DEFAULT_SOURCE = "stanfordnlp/imdb"
MIRROR_ENV = "DPNB_DATA_DIR"  # directory holding a local copy of DEFAULT_SOURCE as train.csv.gz, test.csv.gz
TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
ACLIMDB_LABELS = {"neg": 0, "pos": 1}
ACLIMDB_UNLABELLED = "unsup"
# One or more HTML line breaks (IMDb writes paragraphs as "<br /><br />"), with the spaces around them.
LINE_BREAKS = r"(?:\s*<br\s*/?\s*>\s*)+"


# --------------------------------------------------------------------------- 1. load


class RawSplit(NamedTuple):
    """One split as read, before any check, and where it came from (for error messages)."""

    frame: pd.DataFrame
    origin: str


def load_splits(cfg: PrepareConfig) -> tuple[dict[str, RawSplit], str]:
    """The raw `train` and `test` tables named by `cfg.source`, and a line saying what was read."""
    source = cfg.source.strip()
    split_names = {"train": cfg.train_split, "test": cfg.test_split}
    mirror = os.environ.get(MIRROR_ENV)
    if source == DEFAULT_SOURCE and mirror:
        return read_mirror(Path(mirror).expanduser(), split_names)
    if "," in source:
        return read_file_pair(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return read_directory(path, split_names, cfg.text_column, cfg.label_column)
    if path.is_file():
        raise DpnbError(
            f"prepare.source {source} is a single file, but prepare needs a train and a test split: give "
            f"both files as 'TRAIN_FILE,TEST_FILE', or a directory holding {cfg.train_split}.csv and "
            f"{cfg.test_split}.csv (or .tsv, .jsonl, .parquet, each optionally .gz)"
        )
    if _looks_like_path(source):
        raise DpnbError(f"prepare.source {source} does not exist; check the path (relative to {Path.cwd()})")
    return read_hub(source, split_names)


def read_mirror(root: Path, split_names: dict[str, str]) -> tuple[dict[str, RawSplit], str]:
    """The local mirror of the default data set that DPNB_DATA_DIR names, used instead of the Hub."""
    files = {role: root / f"{name}.csv.gz" for role, name in split_names.items()}
    missing = [path.name for path in files.values() if not path.is_file()]
    require(
        not missing,
        f"{MIRROR_ENV}={root} does not hold {', '.join(missing)}; point it at the local mirror of "
        f"{DEFAULT_SOURCE} (a directory with train.csv.gz and test.csv.gz) or unset it to use the Hub",
    )
    description = f"{DEFAULT_SOURCE} from its local mirror {root} ({MIRROR_ENV})"
    print(f"Reading {description}, not the Hub.")
    return {role: RawSplit(read_table(path), str(path)) for role, path in files.items()}, description


def read_file_pair(source: str) -> tuple[dict[str, RawSplit], str]:
    """`"TRAIN_FILE,TEST_FILE"`: two table files, train first."""
    parts = [part.strip() for part in source.split(",")]
    require(
        len(parts) == 2 and all(parts),
        f"prepare.source {source!r} names {len(parts)} comma-separated parts; give exactly two files, "
        f"'TRAIN_FILE,TEST_FILE'",
    )
    paths = [Path(part).expanduser() for part in parts]
    for path in paths:
        require(path.is_file(), f"prepare.source file {path} does not exist; check the path")
    train, test = (RawSplit(read_table(path), str(path)) for path in paths)
    splits = {"train": train, "test": test}
    return splits, f"local files {paths[0]} (train) and {paths[1]} (test)"


def read_directory(
    root: Path, split_names: dict[str, str], text_column: str, label_column: str
) -> tuple[dict[str, RawSplit], str]:
    """A directory with one table file per split (`train.csv`, ...) or aclImdb-style label folders."""
    splits = {}
    for role, name in split_names.items():
        files = [root / f"{name}.{fmt}{gz}" for fmt in TABLE_FORMATS for gz in ("", ".gz")]
        files = [path for path in files if path.is_file()]
        require(
            len(files) <= 1,
            f"{root} holds several {name} files ({', '.join(p.name for p in files)}); keep only one",
        )
        if files:
            splits[role] = RawSplit(read_table(files[0]), str(files[0]))
        elif (root / name).is_dir():
            frame = read_label_folders(root / name, text_column, label_column)
            splits[role] = RawSplit(frame, f"{root / name}/")
        else:
            raise DpnbError(
                f"{root} holds no '{name}' split: expected {name}.csv, .tsv, .jsonl or .parquet (optionally "
                f".gz), or an aclImdb-style {name}/ folder with one subfolder of .txt reviews per label"
            )
    return splits, f"local directory {root}"


def read_label_folders(split_dir: Path, text_column: str, label_column: str) -> pd.DataFrame:
    """The aclImdb layout: one folder per label, one UTF-8 review per `.txt` file."""
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name != ACLIMDB_UNLABELLED)
    require(bool(folders), f"{split_dir} has no label folders (such as pos/ and neg/) holding .txt reviews")
    texts: list[str] = []
    labels: list[int | str] = []
    for folder in folders:
        label = ACLIMDB_LABELS.get(folder.name, folder.name)
        for path in sorted(folder.glob("*.txt")):
            try:
                texts.append(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise _encoding_error(path, exc) from None
            labels.append(label)
    return pd.DataFrame({text_column: texts, label_column: pd.Series(labels, dtype=object)})


def table_format(path: Path) -> tuple[str, str | None]:
    """(format, compression) from a file name: `train.csv.gz` is ("csv", "gzip")."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = "gzip" if suffixes[-1:] == [".gz"] else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = suffixes[-1].lstrip(".") if suffixes else ""
    require(
        fmt in TABLE_FORMATS,
        f"{path} is not a file type prepare reads; use .csv, .tsv, .jsonl or .parquet (optionally .gz)",
    )
    return fmt, compression


def read_table(path: Path) -> pd.DataFrame:
    """Read one split file with pandas. CSV/TSV cells are all read as text, so nothing is guessed:
    an empty cell is "" (an empty text, counted), and a review that reads "NA" stays "NA"."""
    fmt, compression = table_format(path)
    try:
        if fmt in ("csv", "tsv"):
            return pd.read_csv(
                path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                encoding="utf-8", compression=compression,
            )
        if fmt == "jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8", compression=compression)
        with gzip.open(path) if compression else open(path, "rb") as handle:
            return pd.read_parquet(handle)
    except UnicodeDecodeError as exc:
        raise _encoding_error(path, exc) from None
    except (ValueError, OSError) as exc:  # pandas' ParserError and pyarrow's errors derive from these
        kind = fmt + (" (gzip)" if compression else "")
        raise DpnbError(
            f"{path} could not be read as {kind} ({_first_line(exc)}); check that its content matches its "
            f"extension"
        ) from None


def read_hub(source: str, split_names: dict[str, str]) -> tuple[dict[str, RawSplit], str]:
    """A data set on the Hugging Face Hub (or in the local Hugging Face cache), via `datasets`."""
    if hub_offline():
        _datasets_offline()  # look only in the local cache, with no network retries
    try:
        loaded = datasets.load_dataset(source)
    except Exception as exc:
        if not _is_hub_failure(exc):
            raise
        mirror = f"set {MIRROR_ENV} to a local mirror (a directory with train.csv.gz and test.csv.gz) or "
        raise DpnbError(
            f"data set '{source}' could not be loaded from the Hugging Face Hub ({_first_line(exc)}) and is "
            f"not a local path; offline, {mirror if source == DEFAULT_SOURCE else ''}give a local file or "
            f"directory as prepare.source"
        ) from None
    splits = {}
    for role, name in split_names.items():
        require(
            name in loaded,
            f"{source} has no split '{name}' (its splits: {', '.join(loaded)}); set prepare.{role}_split",
        )
        splits[role] = RawSplit(loaded[name].to_pandas(), f"{source} [{name}]")
    return splits, f"Hugging Face Hub data set {source}"


def _looks_like_path(source: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything with a file suffix or a path prefix is a path."""
    suffixes = {f".{fmt}" for fmt in TABLE_FORMATS} | {".gz", ".txt"}
    has_path_prefix = source.startswith((".", "/", "~")) or source.count("/") > 1
    return has_path_prefix or Path(source).suffix.lower() in suffixes


def _datasets_offline() -> None:
    """Tell `datasets` and the Hub client they are offline: look in the local cache, never retry."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _is_hub_failure(exc: BaseException) -> bool:
    module = type(exc).__module__
    return isinstance(exc, (OSError, ConnectionError)) or module.startswith(
        ("datasets", "huggingface_hub", "requests", "httpx", "fsspec", "urllib3")
    )


def _encoding_error(path: Path, exc: UnicodeDecodeError) -> DpnbError:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return DpnbError(
        f"{path} is not UTF-8 text (byte 0x{byte} cannot be decoded; latin-1 files look like this); "
        f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- 2. validate


def clean_texts(texts: pd.Series, strip_html: bool) -> pd.Series:
    """Replace runs of `<br />` line breaks with one space (optional) and trim surrounding whitespace."""
    texts = texts.astype(str)
    if strip_html:
        texts = texts.str.replace(LINE_BREAKS, " ", regex=True, flags=re.IGNORECASE)
    return texts.str.strip()


def empty_after_cleaning(texts: pd.Series, strip_html: bool) -> np.ndarray:
    """Which texts `clean_texts` would leave empty, without cleaning them all (a regex over a whole
    split is slow, and only the sampled records are cleaned). Only a text that is blank, or that
    starts with a tag once trimmed, can end up empty, so only those few are cleaned here."""
    trimmed = texts.astype(str).str.strip()
    candidates = (trimmed == "") | (trimmed.str.startswith("<") if strip_html else False)
    empty = np.zeros(len(texts), dtype=bool)
    where = np.flatnonzero(candidates.to_numpy(dtype=bool))
    empty[where] = (clean_texts(texts.iloc[where], strip_html) == "").to_numpy(dtype=bool)
    return empty


def validate_split(raw: RawSplit, cfg: PrepareConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Checked records (`text` as read, `label` an index into label_names) and the rows dropped, by reason.

    Only null texts and texts that cleaning leaves empty are dropped (and counted); any other
    problem is an error.
    """
    frame, origin = raw
    for column, key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
        require(
            column in frame.columns,
            f"{origin} has no column '{column}' (its columns: {', '.join(map(str, frame.columns))}); "
            f"set prepare.{key} to the right one",
        )
    require(len(frame) > 0, f"{origin} holds no rows; give a split with labelled texts")
    texts = frame[cfg.text_column]
    null = texts.isna().to_numpy(dtype=bool)
    not_text = ~null & ~texts.map(lambda value: isinstance(value, str)).to_numpy(dtype=bool)
    if not_text.any():
        row = int(np.flatnonzero(not_text)[0])
        raise DpnbError(
            f"{origin}: column '{cfg.text_column}' holds non-text values (row {row}: {texts.iloc[row]!r}); "
            f"texts must be strings: check prepare.text_column"
        )
    empty = np.zeros(len(frame), dtype=bool)
    empty[~null] = empty_after_cleaning(texts[~null], cfg.strip_html)
    dropped = {"null_text": int(null.sum()), "empty_text": int(empty.sum())}
    n_dropped = sum(dropped.values())
    require(
        n_dropped <= cfg.max_dropped_fraction * len(frame),
        f"{origin}: {n_dropped} of {len(frame)} texts ({n_dropped / len(frame):.1%}) are null or empty "
        f"({dropped['null_text']} null, {dropped['empty_text']} empty), more than "
        f"prepare.max_dropped_fraction = {cfg.max_dropped_fraction}; clean the data or raise it",
    )
    keep = np.flatnonzero(~null & ~empty)
    labels = label_indices(frame[cfg.label_column].iloc[keep], cfg.label_names, origin, cfg.label_column)
    checked = pd.DataFrame({"text": texts.iloc[keep].to_numpy(dtype=object), "label": labels})
    require_two_classes(
        labels, cfg.label_names, origin, f"check prepare.label_column ('{cfg.label_column}') and the data"
    )
    return checked, dropped


def label_indices(values: pd.Series, label_names: Sequence[str], origin: str, column: str) -> np.ndarray:
    """Each label as its index into `label_names`; a label outside the declared set is an error."""
    missing = int(values.isna().sum())
    require(
        missing == 0,
        f"{origin}: {missing} rows have no label in column '{column}'; fill them in or drop those rows",
    )
    # value by value, not through a lookup table: 1, 1.0 and True are equal as dict keys
    indices = values.map(lambda value: _label_index(value, label_names))
    unknown = indices.isna().to_numpy(dtype=bool)
    if unknown.any():
        shown = list(dict.fromkeys(repr(value) for value in values[unknown]))
        raise DpnbError(
            f"{origin}: label(s) {', '.join(shown[:5])}{', ...' if len(shown) > 5 else ''} in column "
            f"'{column}' are outside the declared set; labels must be 0..{len(label_names) - 1} or one of "
            f"{', '.join(label_names)}: set prepare.label_names to match"
        )
    return indices.to_numpy(dtype=np.int64)


def _label_index(value: Any, label_names: Sequence[str]) -> int | None:
    """A label name, or a whole number (as a number, or as text the way CSV writes it), as an index."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, str):
        if value in label_names:
            return list(label_names).index(value)
        if not re.fullmatch(r"[0-9]+", value):
            return None
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        return None  # floats and the rest: a label is never rounded into the set
    return int(value) if 0 <= value < len(label_names) else None


def require_two_classes(labels: np.ndarray, label_names: Sequence[str], where: str, fix: str) -> None:
    """A label-conditioned generator and a classifier both need at least two classes in every split."""
    present = np.unique(labels)
    require(
        len(present) >= 2,
        f"{where} has a single class ('{label_names[present[0]]}', {len(labels)} rows) and needs at least "
        f"two; {fix}",
    )


# --------------------------------------------------------------------------- 3. subsample


def stratified_indices(labels: np.ndarray, n: int | None, seed: int, where: str) -> np.ndarray:
    """Row indices of a seeded, stratified sample of `n` rows (all rows when `n` is None), shuffled.

    Each class c with N_c of the N rows gets a quota q_c = n N_c / N, rounded by largest remainder
    (floor every q_c, then give the n - sum(floor) leftover rows to the classes with the largest
    fractional parts), so the quotas sum to n exactly and each class is within one row of its
    proportion. Within a class the rows are a uniform draw without replacement. The same labels,
    n and seed always give the same rows; the result is shuffled so that classes are interleaved.
    """
    total = len(labels)
    n = total if n is None else n
    require(
        n <= total,
        f"{where} = {n} is larger than the split ({total} usable rows); lower it, or set it to null to "
        f"keep the whole split",
    )
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / total
    quotas = np.floor(exact).astype(int)
    leftover = n - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:leftover]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quotas, strict=True)]
    return rng.permutation(np.concatenate(chosen))


def subsample(
    checked: pd.DataFrame, n: int | None, seed: int, role: str, label_names: Sequence[str]
) -> pd.DataFrame:
    """The stratified sample of one split; one that leaves a single class is an error."""
    rows = stratified_indices(checked["label"].to_numpy(), n, seed, f"prepare.n_{role}")
    sample = checked.iloc[rows].reset_index(drop=True)
    require_two_classes(sample["label"].to_numpy(), label_names, f"the {role} sample (n_{role} = {n})",
                        f"raise prepare.n_{role}")
    return sample
