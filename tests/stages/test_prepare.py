"""01 prepare: sources, validation errors, subsampling, prompt formatting and the stage contract."""

from __future__ import annotations

import copy
import functools
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from testkit import toy_reviews, write_csv

from dpnb import models
from dpnb.config import PrepareConfig
from dpnb.data import prompts, sources
from dpnb.data.prepared import load_prepared, train_sha256
from dpnb.errors import DpnbError
from dpnb.io import read_json
from dpnb.rundir import RunDir
from dpnb.stages import prepare

LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny-llama")


@pytest.fixture
def cached_tokenizer(monkeypatch, tokenizer):
    """run_stage loads the tokenizer by name; hand it the one already loaded, to keep tests quick."""
    monkeypatch.setattr(models, "load_tokenizer", functools.cache(lambda name: tokenizer))
    return tokenizer


def cfg(source, **values) -> PrepareConfig:
    return PrepareConfig(source=str(source), model="tiny-llama", **values)


def load_checked(config: PrepareConfig) -> dict[str, tuple[pd.DataFrame, dict[str, int]]]:
    raw, _ = sources.load_splits(config)
    return {role: sources.validate_split(split, config) for role, split in raw.items()}


def write_table(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the file name says, with pandas (not the code under test)."""
    frame = pd.DataFrame(rows)
    name = path.name.removesuffix(".gz")
    compression = "gzip" if path.name.endswith(".gz") else None
    if name.endswith(".csv"):
        frame.to_csv(path, index=False, compression=compression)
    elif name.endswith(".tsv"):
        frame.to_csv(path, sep="\t", index=False, compression=compression)
    elif name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True, compression=compression)
    elif name.endswith(".parquet"):
        with gzip.open(path, "wb") if compression else open(path, "wb") as handle:
            frame.to_parquet(handle)
    return path


def split_dir(tmp_path: Path, suffix: str, train: list[dict], test: list[dict]) -> Path:
    write_table(tmp_path / f"train.{suffix}", train)
    write_table(tmp_path / f"test.{suffix}", test)
    return tmp_path


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize("suffix", ["csv", "csv.gz", "tsv", "tsv.gz", "jsonl", "jsonl.gz", "parquet", "parquet.gz"])
def test_every_table_format_reads_the_same_records(tmp_path, suffix):
    train, test = toy_reviews(20, seed=1), toy_reviews(10, seed=2)
    checked = load_checked(cfg(split_dir(tmp_path, suffix, train, test)))
    for role, rows in (("train", train), ("test", test)):
        frame, dropped = checked[role]
        assert frame["text"].tolist() == [r["text"] for r in rows]
        assert frame["label"].tolist() == [r["label"] for r in rows]
        assert dropped == {"null_text": 0, "empty_text": 0}


def test_a_pair_of_files_is_train_then_test(tmp_path):
    train = write_table(tmp_path / "a.jsonl", toy_reviews(8, seed=1))
    test = write_table(tmp_path / "b.csv.gz", toy_reviews(6, seed=2))
    raw, description = sources.load_splits(cfg(f"{train}, {test}"))
    assert len(raw["train"].frame) == 8 and len(raw["test"].frame) == 6
    assert "a.jsonl (train)" in description


def test_aclimdb_folders_give_labels_and_skip_unsup(tmp_path):
    reviews = {("train", "pos"): ["Great.", "Loved it."], ("train", "neg"): ["Awful."],
               ("train", "unsup"): ["No label."], ("test", "pos"): ["Fine."], ("test", "neg"): ["Bad.", "Dull."]}
    for (split, folder), texts in reviews.items():
        (tmp_path / split / folder).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (tmp_path / split / folder / f"{i}_7.txt").write_text(text, encoding="utf-8")
    (tmp_path / "train" / "urls_pos.txt").write_text("http://example.org\n")  # aclImdb's extra files
    checked = load_checked(cfg(tmp_path))
    train = checked["train"][0]
    assert sorted(zip(train["text"], train["label"], strict=True)) == [("Awful.", 0), ("Great.", 1), ("Loved it.", 1)]
    assert sorted(checked["test"][0]["label"]) == [0, 0, 1]


def test_default_source_reads_the_mirror_named_by_the_environment(tmp_path, monkeypatch, capsys):
    write_table(tmp_path / "train.csv.gz", toy_reviews(12))
    write_table(tmp_path / "test.csv.gz", toy_reviews(4))
    monkeypatch.setenv("DPNB_DATA_DIR", str(tmp_path))
    raw, description = sources.load_splits(PrepareConfig(model="tiny-llama"))
    assert len(raw["train"].frame) == 12 and len(raw["test"].frame) == 4
    assert "DPNB_DATA_DIR" in description and "mirror" in capsys.readouterr().out


def test_mirror_without_the_files_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DPNB_DATA_DIR", str(tmp_path))
    with pytest.raises(DpnbError, match=r"DPNB_DATA_DIR=.* does not hold train.csv.gz, test.csv.gz"):
        sources.load_splits(PrepareConfig())


def test_hub_offline_names_the_fix(monkeypatch):
    monkeypatch.delenv("DPNB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DpnbError) as error:
        sources.load_splits(PrepareConfig())
    message = str(error.value)
    assert "stanfordnlp/imdb" in message and "set DPNB_DATA_DIR" in message and "local file" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [("missing/train.csv", "does not exist"), ("./nowhere", "does not exist"),
     ("{tmp}/only.csv", "single file"), ("{tmp}/only.csv,{tmp}/gone.csv", "gone.csv does not exist"),
     ("{tmp}/only.csv,{tmp}/only.csv,{tmp}/only.csv", "exactly two files"),
     ("{tmp}/only.csv,{tmp}/notes.xlsx", "not a file type"), ("{tmp}/empty_dir", "holds no 'train' split")],
)
def test_bad_sources_say_what_to_give(tmp_path, source, expected):
    write_csv(tmp_path / "only.csv", toy_reviews(4))
    (tmp_path / "notes.xlsx").write_bytes(b"PK")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DpnbError, match=expected):
        sources.load_splits(cfg(source.replace("{tmp}", str(tmp_path))))


def test_two_files_for_one_split_are_ambiguous(tmp_path):
    split_dir(tmp_path, "csv", toy_reviews(4), toy_reviews(4))
    write_table(tmp_path / "train.jsonl", toy_reviews(4))
    with pytest.raises(DpnbError, match="several train files"):
        sources.load_splits(cfg(tmp_path))


def test_the_real_imdb_mirror(imdb_dir):
    checked = load_checked(cfg(imdb_dir))
    for frame, dropped in checked.values():
        assert len(frame) == 25_000 and dropped == {"null_text": 0, "empty_text": 0}
        assert np.bincount(frame["label"]).tolist() == [12_500, 12_500]


# --------------------------------------------------------------------------- validation


def test_missing_column_is_named_with_the_columns_there(tmp_path):
    source = split_dir(tmp_path, "csv", toy_reviews(4), toy_reviews(4))
    with pytest.raises(DpnbError, match=r"no column 'review' \(its columns: id, label, text\).*text_column"):
        load_checked(cfg(source, text_column="review"))


def test_null_and_empty_texts_are_dropped_and_counted(tmp_path):
    train = toy_reviews(200) + [{"id": 900, "label": 1, "text": None}, {"id": 901, "label": 0, "text": "  "},
                                {"id": 902, "label": 1, "text": "<br /><BR/> <br>"}]
    source = split_dir(tmp_path, "jsonl", train, toy_reviews(10))
    frame, dropped = load_checked(cfg(source, max_dropped_fraction=0.05))["train"]
    assert dropped == {"null_text": 1, "empty_text": 2} and len(frame) == 200
    # without <br /> removal, a text of line breaks is not empty
    assert load_checked(cfg(source, max_dropped_fraction=0.05, strip_html=False))["train"][1]["empty_text"] == 1
    with pytest.raises(DpnbError, match=r"3 of 203 texts .* null or empty .*max_dropped_fraction"):
        load_checked(cfg(source, max_dropped_fraction=0.01))


def test_empty_csv_cells_count_as_empty_and_na_stays_text(tmp_path):
    train = toy_reviews(100) + [{"id": 100, "label": 1, "text": ""}, {"id": 101, "label": 0, "text": "NA"}]
    frame, dropped = load_checked(cfg(split_dir(tmp_path, "csv", train, toy_reviews(4)), max_dropped_fraction=0.02))[
        "train"
    ]
    assert dropped["empty_text"] == 1 and "NA" in frame["text"].tolist()


@pytest.mark.parametrize("bad", [2, -1, "neutral", 1.0, "Positive", True])
def test_labels_outside_the_declared_set_are_errors(tmp_path, bad):
    train = toy_reviews(6) + [{"id": 6, "label": bad, "text": "odd one"}]
    source = split_dir(tmp_path, "jsonl", train, toy_reviews(4))
    with pytest.raises(DpnbError, match=r"label\(s\) .* outside the declared set.*negative, positive"):
        load_checked(cfg(source))


def test_labels_may_be_names_numbers_or_numbers_as_text(tmp_path):
    train = [{"text": "a", "label": "positive"}, {"text": "b", "label": 0}, {"text": "c", "label": "1"}]
    source = split_dir(tmp_path, "jsonl", train, train)
    assert load_checked(cfg(source))["train"][0]["label"].tolist() == [1, 0, 1]


def test_missing_labels_are_errors(tmp_path):
    source = split_dir(tmp_path, "jsonl", toy_reviews(6) + [{"id": 9, "label": None, "text": "x"}], toy_reviews(4))
    with pytest.raises(DpnbError, match="1 rows have no label"):
        load_checked(cfg(source))


def test_a_single_class_split_is_an_error(tmp_path):
    one_class = [row for row in toy_reviews(20) if row["label"] == 1]
    source = split_dir(tmp_path, "csv", toy_reviews(20), one_class)
    with pytest.raises(DpnbError, match=r"single class \('positive', 10 rows\)"):
        load_checked(cfg(source))


def test_non_text_values_are_errors(tmp_path):
    source = split_dir(tmp_path, "jsonl", toy_reviews(4) + [{"id": 5, "label": 1, "text": 12345}], toy_reviews(4))
    with pytest.raises(DpnbError, match="non-text values"):
        load_checked(cfg(source))


@pytest.mark.parametrize("layout", ["csv", "csv.gz", "jsonl", "aclimdb"])
def test_latin1_files_are_refused_with_the_fix(tmp_path, layout):
    latin1 = "Un film très réussi".encode("latin-1")
    if layout == "aclimdb":
        for split in ("train", "test"):
            for folder in ("pos", "neg"):
                (tmp_path / split / folder).mkdir(parents=True)
                (tmp_path / split / folder / "0_8.txt").write_bytes(latin1)
    else:
        split_dir(tmp_path, "csv", toy_reviews(4), toy_reviews(4))
        line = b"text,label\n" + latin1 + b",1\n" if layout.startswith("csv") else b'{"text": "' + latin1 + b'"}\n'
        opener = gzip.open if layout.endswith(".gz") else open
        (tmp_path / "train.csv").unlink()
        with opener(tmp_path / f"train.{layout}", "wb") as handle:
            handle.write(line)
    with pytest.raises(DpnbError, match=r"is not UTF-8 text \(byte 0xe8.*iconv"):
        sources.load_splits(cfg(tmp_path))


def test_unreadable_files_name_the_format(tmp_path):
    split_dir(tmp_path, "csv", toy_reviews(4), toy_reviews(4))
    (tmp_path / "train.csv").unlink()
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DpnbError, match="could not be read as parquet"):
        sources.load_splits(cfg(tmp_path))


def test_strip_html_replaces_line_breaks_with_one_space():
    texts = pd.Series(["Good.<br /><br />Really good. ", "No<BR>break<br/>here", "keep <b>bold</b>"])
    assert sources.clean_texts(texts, strip_html=True).tolist() == [
        "Good. Really good.", "No break here", "keep <b>bold</b>"]
    assert sources.clean_texts(texts, strip_html=False).tolist()[0] == "Good.<br /><br />Really good."


# --------------------------------------------------------------------------- subsampling


def test_stratified_sample_is_deterministic_and_keeps_proportions():
    labels = np.array([0] * 200 + [1] * 100)
    first = sources.stratified_indices(labels, 90, seed=3, where="n")
    assert np.array_equal(first, sources.stratified_indices(labels, 90, seed=3, where="n"))
    assert not np.array_equal(np.sort(first), np.sort(sources.stratified_indices(labels, 90, seed=4, where="n")))
    assert len(set(first)) == 90 and np.bincount(labels[first]).tolist() == [60, 30]


def test_stratified_quotas_sum_to_n_within_one_row_of_each_proportion():
    labels = np.array([0] * 7 + [1] * 11 + [2] * 13)
    for n in range(1, len(labels) + 1):
        counts = np.bincount(labels[sources.stratified_indices(labels, n, seed=0, where="n")], minlength=3)
        assert counts.sum() == n
        assert np.all(np.abs(counts - n * np.array([7, 11, 13]) / 31) < 1)


def test_all_rows_when_n_is_none_but_shuffled():
    labels = np.array([0] * 50 + [1] * 50)
    rows = sources.stratified_indices(labels, None, seed=0, where="n")
    assert sorted(rows) == list(range(100)) and list(rows) != list(range(100))


def test_asking_for_more_rows_than_the_split_holds_is_an_error():
    with pytest.raises(DpnbError, match=r"prepare.n_train = 11 is larger than the split \(10 usable rows\)"):
        sources.stratified_indices(np.array([0, 1] * 5), 11, seed=0, where="prepare.n_train")


def test_a_sample_left_with_one_class_is_an_error():
    checked = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 0, 1]})
    with pytest.raises(DpnbError, match=r"single class .*raise prepare.n_train"):
        sources.subsample(checked, 1, 0, "train", LABELS)


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_records_start_with_the_prompt_and_end_with_eos(tokenizer, style):
    fmt = prompts.PromptFormat(style=style)
    long_review = " ".join(["an unforgettable film"] * 200)
    for label in LABELS:
        prompt = fmt.prompt_ids(label, tokenizer)
        for text, max_length in (("Short and sweet.", 300), (long_review, 300), (long_review, 64)):
            ids, truncated = fmt.encode(label, text, tokenizer, max_length)
            assert ids[: len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id and len(ids) <= max_length
            review, room = tokenizer(text, add_special_tokens=False)["input_ids"], max_length - len(prompt) - 1
            assert ids[len(prompt) : -1] == review[:room] and truncated == (len(review) > room)
    pairs = (("positive", "Good."), ("negative", long_review))
    batch = fmt.encode_batch([label for label, _ in pairs], [text for _, text in pairs], tokenizer, 64)
    assert list(zip(*batch, strict=True)) == [fmt.encode(label, text, tokenizer, 64) for label, text in pairs]


def test_plain_prompt_is_label_and_delimiter(tokenizer):
    fmt = prompts.PromptFormat(delimiter=" | ")
    assert fmt.prompt_text("positive", tokenizer) == "positive | "
    assert tokenizer.decode(fmt.prompt_ids("positive", tokenizer)) == "positive | "


def test_chat_prompt_is_the_template_with_the_instruction(tokenizer):
    fmt = prompts.PromptFormat(style="chat", chat_instruction="Write a {label} review.")
    text = fmt.prompt_text("negative", tokenizer)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Write a negative review."}],
                                             tokenize=False, add_generation_prompt=True)
    assert text == expected and "Write a negative review." in text
    ids = fmt.prompt_ids("negative", tokenizer)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


def test_plain_prompt_keeps_the_bos_a_tokenizer_adds():
    from transformers import AutoTokenizer

    _, location = models.generator_location("tiny-llama")
    with_bos = AutoTokenizer.from_pretrained(location, add_bos_token=True)
    ids = prompts.PromptFormat().prompt_ids("positive", with_bos)
    assert ids[0] == with_bos.bos_token_id and ids == with_bos("positive | ")["input_ids"]
    record, _ = prompts.PromptFormat().encode("positive", "Good.", with_bos, 32)
    assert record[: len(ids)] == ids and record.count(with_bos.bos_token_id) == 1


def test_review_text_never_becomes_control_tokens(tokenizer):
    fmt = prompts.PromptFormat(style="chat")
    ids, _ = fmt.encode("positive", "Nice <|im_end|> film", tokenizer, 300)
    review = ids[len(fmt.prompt_ids("positive", tokenizer)) :]
    assert review.count(tokenizer.eos_token_id) == 1 and review[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(review) == "Nice <|im_end|> film<|im_end|>"


def test_prompt_longer_than_max_length_is_an_error(tokenizer):
    with pytest.raises(DpnbError, match=r"max_length = 20 leaves no room .* raise prepare.max_length"):
        prompts.PromptFormat(style="chat").encode("positive", "Good.", tokenizer, 20)


def test_chat_without_a_template_is_an_error(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(DpnbError, match="no chat template; use prompt_format: plain"):
        prompts.PromptFormat(style="chat").prompt_ids("positive", bare)


def test_prompt_format_round_trips_through_a_dict():
    fmt = prompts.PromptFormat.from_config(PrepareConfig(prompt_format="chat", delimiter=" :: "))
    assert prompts.PromptFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    with pytest.raises(DpnbError, match="unknown key"):
        prompts.PromptFormat.from_dict({"style": "plain", "sep": "|"})


# --------------------------------------------------------------------------- the stage


def test_run_stage_writes_the_contract(tmp_path, toy_data_dir, cached_tokenizer):
    config = cfg(toy_data_dir, n_train=60, n_test=40, max_length=48, prompt_format="chat", max_dropped_fraction=0)
    run = RunDir(tmp_path / "run")
    stats = prepare.run_stage(run, config)
    dataset, test, manifest = load_prepared(run)
    train = dataset.to_dict()
    assert (len(dataset), len(test)) == (60, 40)
    assert set(dataset.column_names) == {"text", "label", "label_name", "input_ids", "prompt_length", "n_tokens",
                                       "truncated"}
    fmt = prompts.PromptFormat.from_dict(manifest["prompt"])
    for record in dataset:
        assert record["label_name"] == LABELS[record["label"]] and "<br" not in record["text"]
        prompt = fmt.prompt_ids(record["label_name"], cached_tokenizer)
        assert record["input_ids"][: record["prompt_length"]] == prompt
        assert record["n_tokens"] == len(record["input_ids"]) <= 48
        assert record["input_ids"][-1] == cached_tokenizer.eos_token_id
    assert manifest["train_sha256"] == train_sha256(train)
    assert {k: manifest[k] for k in ("model", "label_names", "max_length", "n_train", "n_test", "seed")} == {
        "model": "tiny-llama", "label_names": list(LABELS), "max_length": 48, "n_train": 60, "n_test": 40, "seed": 0}
    split = stats["splits"]["train"]
    assert split["rows_read"] == 200 and split["per_label"] == {"negative": 30, "positive": 30}
    assert split["fraction_truncated"] == pytest.approx(np.mean(train["truncated"]))
    assert split["token_length"]["max"] == max(train["n_tokens"])
    assert split["token_length"]["p50"] == pytest.approx(np.percentile(train["n_tokens"], 50), abs=0.05)
    assert split["duplicate_texts"] == len(dataset) - len(set(train["text"]))
    assert stats == read_json(run.data_stats) and run.figure("token_lengths.png").stat().st_size > 0
    assert run.is_complete("prepare")


def test_run_stage_skips_refuses_and_forces(tmp_path, toy_data_dir, cached_tokenizer):
    run = RunDir(tmp_path / "run")
    first = prepare.run_stage(run, cfg(toy_data_dir, n_train=40, n_test=20, max_length=24))
    marker = run.marker("prepare").read_text()
    assert prepare.run_stage(run, cfg(toy_data_dir, n_train=40, n_test=20, max_length=24)) == first
    assert run.marker("prepare").read_text() == marker  # skipped: nothing rewritten
    with pytest.raises(DpnbError, match="different config"):
        prepare.run_stage(run, cfg(toy_data_dir, n_train=50, n_test=20, max_length=24))
    forced = prepare.run_stage(run, cfg(toy_data_dir, n_train=50, n_test=20, max_length=24), force=True)
    assert forced["splits"]["train"]["records"] == 50 and load_prepared(run)[2]["n_train"] == 50


def test_interrupted_run_keeps_the_previous_data_and_resumes(tmp_path, toy_data_dir, cached_tokenizer, monkeypatch):
    run = RunDir(tmp_path / "run")
    prepare.run_stage(run, cfg(toy_data_dir, n_train=40, n_test=20, max_length=24))
    real_to_dataset, calls = prepare.to_dataset, []

    def crash_on_test_split(columns):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_to_dataset(columns)

    monkeypatch.setattr(prepare, "to_dataset", crash_on_test_split)
    new = cfg(toy_data_dir, n_train=30, n_test=20, max_length=24)
    with pytest.raises(KeyboardInterrupt):
        prepare.run_stage(run, new, force=True)
    assert read_json(run.data / "manifest.json")["n_train"] == 40  # the old data, whole
    assert not run.is_complete("prepare") and not list(run.path.glob(".data.*.tmp"))
    monkeypatch.setattr(prepare, "to_dataset", real_to_dataset)
    assert prepare.run_stage(run, new)["splits"]["train"]["records"] == 30


def test_load_prepared_before_prepare_is_an_error(tmp_path):
    with pytest.raises(DpnbError, match="stage 'prepare' has not completed"):
        load_prepared(RunDir(tmp_path / "empty"))


def test_format_example_shows_where_the_prompt_ends(tokenizer):
    fmt = prompts.PromptFormat()
    ids, truncated = fmt.encode("positive", "A fine film.", tokenizer, 300)
    prompt_length = len(fmt.prompt_ids("positive", tokenizer))
    record = {"input_ids": ids, "prompt_length": prompt_length, "label": 1, "label_name": "positive",
              "truncated": truncated}
    shown = prompts.format_example(record, tokenizer)
    assert "'positive | '" in shown and shown.endswith("A fine film.<|im_end|>")
