"""04 evaluate: metrics checked by hand, the classifier on an easy task, and the stage on a tiny run
directory (sources, skip, stale inputs, resume). The screen is in test_memorisation, the text
statistics in test_textstats."""

from __future__ import annotations

import json
import stat
import time

import numpy as np
import pytest
from testkit import LONG_REVIEW, TINY_EVALUATE, build_run, toy_reviews

from dpnb.config import EvaluateConfig, GenerateConfig, build
from dpnb.errors import DpnbError
from dpnb.evaluation import classifier, embeddings, memorisation
from dpnb.evaluation.standard_errors import accuracy_standard_error, standard_errors
from dpnb.io import write_json_atomic
from dpnb.models import load_tokenizer
from dpnb.privacy import guarantee
from dpnb.rundir import SHARED_STORE_ENV
from dpnb.stages import evaluate, report

# --------------------------------------------------------------------------- metrics by hand


def test_binary_metrics_match_hand_computation():
    # y_true has 4 positives, 6 negatives. Predictions: 3 positives right, 1 positive missed (FN),
    # 1 negative called positive (FP), 5 negatives right. accuracy = 8/10 = 0.8;
    # precision = 3/(3+1) = 0.75, recall = 3/(3+1) = 0.75, F1 = 0.75;
    # confusion rows = true label: [[5 TN, 1 FP], [1 FN, 3 TP]].
    y_true = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    m = classifier.classification_metrics(y_true, y_pred, num_labels=2)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.75)
    assert m["f1_average"] == "binary"
    assert m["confusion_matrix"] == [[5, 1], [1, 3]]


def test_macro_f1_for_three_labels():
    # class 0: TP 1, FP 1 (last), FN 1 (second)  -> P 1/2, R 1/2, F1 0.5
    # class 1: TP 2, FP 1 (second), FN 0          -> P 2/3, R 1,   F1 0.8
    # class 2: TP 1, FP 0, FN 1 (last)            -> P 1,   R 1/2, F1 2/3
    # macro F1 = (0.5 + 0.8 + 2/3) / 3; accuracy = 4/6
    m = classifier.classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], num_labels=3)
    assert m["f1_average"] == "macro"
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_standard_errors_match_hand_computation():
    # real: p = 0.8 on 100 -> sqrt(0.8 * 0.2 / 100) = 0.04; synthetic: p = 0.6 -> sqrt(0.24 / 100) = 0.0489898;
    # synthetic - real = -0.2 with se sqrt(0.0016 + 0.0024) = sqrt(0.004) = 0.0632456, z = -3.1623.
    # zero_shot was not trained (no accuracy): left out, and so are its differences.
    metrics = {"real": {"accuracy": 0.8, "n_test": 100}, "synthetic": {"accuracy": 0.6, "n_test": 100},
               "zero_shot": {"accuracy": None, "n_test": 100}, "meta": {}}
    errors = standard_errors(metrics)
    assert set(errors["accuracy"]) == {"real", "synthetic"}
    assert errors["accuracy"]["real"]["se"] == pytest.approx(0.04)
    assert errors["accuracy"]["synthetic"]["se"] == pytest.approx(0.0489898, abs=1e-7)
    assert list(errors["differences"]) == ["synthetic - real"]
    difference = errors["differences"]["synthetic - real"]
    assert difference["difference"] == pytest.approx(-0.2)
    assert difference["se"] == pytest.approx(0.0632456, abs=1e-7)
    assert difference["z"] == pytest.approx(-3.16228, abs=1e-5)
    assert accuracy_standard_error(1.0, 20) == 0.0 and accuracy_standard_error(None, 20) is None


def test_label_fidelity_overall_and_per_label():
    # prompted negative twice (one agrees), positive three times (two agree): 3/5 overall
    fidelity = classifier.label_fidelity([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["negative", "positive"])
    assert fidelity["overall"] == pytest.approx(3 / 5)
    assert fidelity["per_label"] == {"negative": pytest.approx(1 / 2), "positive": pytest.approx(2 / 3)}
    assert fidelity["n"] == 5


# --------------------------------------------------------------------------- the classifier


def texts_labels(rows: list[dict]) -> tuple[list[str], list[int]]:
    return [r["text"] for r in rows], [r["label"] for r in rows]


def test_classifier_learns_an_easy_task():
    # 64 toy reviews whose words give the label away; 4 steps of batch 16 with a high learning rate
    cfg = EvaluateConfig(epochs=1, lr=3e-4, batch_size=16, max_length=32)
    train_texts, train_labels = texts_labels(toy_reviews(64, seed=1))
    test_texts, test_labels = texts_labels(toy_reviews(60, seed=2))
    trained = classifier.train_classifier(train_texts, train_labels, 2, cfg, "cpu")
    assert trained.steps == 4
    predicted = classifier.predict(trained, test_texts, cfg.max_length, 32, "cpu")
    metrics = classifier.classification_metrics(test_labels, predicted.tolist(), 2)
    assert metrics["accuracy"] >= 0.85  # chance is 0.5


def test_sets_the_classifier_cannot_learn_from_are_reported_not_fatal():
    cfg = EvaluateConfig()
    test = classifier.Source("test", ["good", "bad", "fine"], [1, 0, 1])
    entry, model = classifier.train_and_test(classifier.Source("synthetic", [], []), test, ["neg", "pos"], cfg, "cpu")
    assert entry["accuracy"] is None and entry["trained"] is False and "no texts" in entry["notes"][0]
    entry, model = classifier.train_and_test(
        classifier.Source("synthetic", ["great", "superb"], [1, 1]), test, ["neg", "pos"], cfg, "cpu")
    # predicting "pos" for all three test texts: 2 right of 3; F1 of pos: P 2/3, R 1 -> 0.8
    assert entry["trained"] is False and "only label 'pos'" in entry["notes"][0]
    assert entry["accuracy"] == pytest.approx(2 / 3) and entry["f1"] == pytest.approx(0.8)
    assert model is None
    # the quality figures of an empty set are empty, not errors
    quality = evaluate.synthetic_quality(classifier.Source("synthetic", [], []), [], [np.arange(5)], ["a b c"],
                                         ["neg", "pos"], cfg)
    assert quality["memorisation"]["max"] == 0 and quality["memorisation"]["n_flagged"] == 0
    assert quality["diversity"]["distinct_1"] is None and quality["length"]["n"] == 0


# --------------------------------------------------------------------------- the stage


def json_keys(value) -> list[str]:
    """Every key of every mapping anywhere inside a JSON value."""
    if isinstance(value, dict):
        return [*value, *(k for v in value.values() for k in json_keys(v))]
    if isinstance(value, list):
        return [k for v in value for k in json_keys(v)]
    return []


def test_stage_writes_metrics_figures_and_skips_when_done(tmp_path):
    run = build_run(tmp_path)
    cfg = build(EvaluateConfig, TINY_EVALUATE)
    metrics = evaluate.run_stage(run, cfg)

    assert evaluate.evaluated_sources(metrics) == ["real", "dp_classifier", "synthetic", "zero_shot"]
    assert "pe" in metrics["meta"]["skipped"]  # generate made no Private Evolution set
    assert metrics == json.loads(run.metrics.read_text())
    # the direct DP classifier: every prepared record, the budget stated, its privacy.json recomputable
    direct = metrics["dp_classifier"]
    assert direct["n_train"] == 32 and direct["n_test"] == 20 and direct["epsilon"] <= 8.0
    saved_privacy = json.loads((run.dp_classifier / "privacy.json").read_text())
    assert saved_privacy == direct["privacy"]
    guarantee.verify_privacy(saved_privacy)
    real, synthetic, zero_shot = metrics["real"], metrics["synthetic"], metrics["zero_shot"]
    assert (real["n_train"], real["n_test"], synthetic["n_train"], zero_shot["n_train"]) == (32, 20, 16, 4)
    assert real["trained"] and synthetic["trained"] and real["f1_average"] == "binary"
    assert sum(map(sum, real["confusion_matrix"])) == 20
    # the single-label zero-shot set: the constant prediction "positive" on 10 + 10 test reviews
    assert zero_shot["trained"] is False and zero_shot["accuracy"] == pytest.approx(0.5)
    # the verbatim copy of LONG_REVIEW is flagged, pointing at its training row, copied in full: in the
    # private memorisation_flagged.json; metrics.json (shareable aggregates) names no record anywhere
    train = __import__("datasets").load_from_disk(str(run.data / "train"))
    row = train["text"].index(LONG_REVIEW)
    eos = load_tokenizer("tiny-llama").eos_token_id
    review_tokens = memorisation.review_token_ids(train.select([row]), eos)[0]
    positions = {"flagged", "sample", "train_row", "train_offset", "sample_offset", "memorisation_flagged",
                 "test_memorisation_flagged"}
    assert not positions & set(json_keys(json.loads(run.metrics.read_text())))
    flagged = json.loads(run.memorisation_flagged.read_text())["flagged"]
    assert [f["sample"] for f in flagged["synthetic"]] == [15] and flagged["synthetic"][0]["train_row"] == row
    assert flagged["synthetic"][0]["length"] == len(review_tokens) > 30  # the whole review, copied
    assert synthetic["memorisation"]["max"] == flagged["synthetic"][0]["length"]
    assert synthetic["memorisation"]["n_flagged"] == 1 and flagged["zero_shot"] == flagged["real_test"] == []
    assert list(evaluate.flagged_table(run)["train_row"]) == [row]
    assert synthetic["label_fidelity"]["n"] == 16
    assert set(synthetic["label_fidelity"]["per_label"]) == {"negative", "positive"}
    assert zero_shot["diversity"]["duplicate_share"] == pytest.approx(1 / 4)  # "a film" twice
    assert metrics["meta"]["real_reference"]["test_memorisation"]["n_flagged"] == 0
    # a threshold longer than every sample of a set cannot flag it, and the report says so from the run's lengths
    lines = dict(line.split(": ", 1) for line in evaluate.memorisation_report(metrics).splitlines())
    assert zero_shot["length"]["max"] < 30 and f"longest sample {zero_shot['length']['max']} tokens: the " \
        "threshold is longer, so the screen CANNOT flag" in lines["zero_shot"]
    assert synthetic["length"]["max"] >= 30 and "CANNOT" not in lines["synthetic"]
    # the fine-tuned classifier is named; MAUVE is computed beside it (on MiniLM features), n per side
    assert (metrics["meta"]["classifier"], metrics["meta"]["classifier_kind"]) == ("minilm-l6", "finetune")
    for entry, n_source in ((real, 16), (synthetic, 16), (zero_shot, 4)):  # real: as many as the largest set
        assert 0 <= entry["mauve"] <= 1
        assert (entry["mauve_details"]["n_source"], entry["mauve_details"]["n_heldout"]) == (n_source, 20)
    for name in ("confusion_real.png", "confusion_synthetic.png", "confusion_zero_shot.png", "lengths.png",
                 "memorisation.png"):
        assert (run.figures / name).stat().st_size > 0
    assert not (run.path / "evaluate").exists()  # partial results are removed once metrics.json is written

    table = evaluate.metrics_table(metrics)
    assert list(table.index) == ["real", "dp_classifier", "synthetic", "zero_shot"]
    assert table.loc["real", "n_train"] == 32

    # done with this config: skipped, same numbers; another config is refused
    assert evaluate.run_stage(run, cfg) == metrics
    with pytest.raises(DpnbError, match="different config"):
        evaluate.run_stage(run, build(EvaluateConfig, {**TINY_EVALUATE, "seed": 1}))
    # generate rerun after the evaluation: the stale metrics are refused
    run.mark_complete("generate", GenerateConfig(n_per_label=7), time.time())
    with pytest.raises(DpnbError, match="inputs that have since changed.*force=True"):
        evaluate.run_stage(run, cfg)


def test_a_sweeps_runs_train_the_real_data_classifier_once(tmp_path, monkeypatch, capsys):
    """With the sweep's shared store, the second run on the same real texts loads the fine-tuned
    real-data classifier the first one trained (same entry, same label fidelity), and trains only its
    synthetic sets' classifiers; other real texts get a classifier of their own."""
    monkeypatch.setenv(SHARED_STORE_ENV, str(tmp_path / "shared"))
    cfg = build(EvaluateConfig, {**TINY_EVALUATE, "sources": ["real", "synthetic"], "mauve": False})
    first = evaluate.run_stage(build_run(tmp_path / "a", zero_shot=False), cfg)
    assert "real: training" in capsys.readouterr().out
    second = evaluate.run_stage(build_run(tmp_path / "b", zero_shot=False), cfg)
    out = capsys.readouterr().out
    assert "real: training" not in out and "synthetic: training" in out
    assert "an earlier run of the sweep trained" in out and second["real"].pop("shared_from_sweep") is True
    for key in ("accuracy", "f1", "confusion_matrix", "steps", "final_loss"):
        assert second["real"][key] == first["real"][key]
    assert second["synthetic"]["label_fidelity"] == first["synthetic"]["label_fidelity"]
    (saved,) = (tmp_path / "shared").iterdir()
    assert saved.name.startswith("real-classifier-") and stat.S_IMODE(saved.stat().st_mode) == 0o700
    evaluate.run_stage(build_run(tmp_path / "c", zero_shot=False), build(EvaluateConfig, {**TINY_EVALUATE,
                       "sources": ["real", "synthetic"], "mauve": False, "n_real_train": 20}))
    assert "real: training" in capsys.readouterr().out and len(list((tmp_path / "shared").iterdir())) == 2


def test_sources_need_their_inputs(tmp_path):
    run = build_run(tmp_path, generate=False)
    with pytest.raises(DpnbError, match="generate stage has not completed"):
        evaluate.run_stage(run, build(EvaluateConfig, TINY_EVALUATE))
    # real alone needs only prepare
    metrics = evaluate.run_stage(run, build(EvaluateConfig, {**TINY_EVALUATE, "sources": ["real"]}))
    assert evaluate.evaluated_sources(metrics) == ["real"] and metrics["meta"]["real_reference"] is None


def test_missing_zero_shot_is_skipped_with_a_note_and_an_interrupted_run_resumes(tmp_path,
                                                                                   monkeypatch):
    run = build_run(tmp_path, zero_shot=False)
    cfg = build(EvaluateConfig, TINY_EVALUATE)  # lists zero_shot, which generate did not make
    trained = []
    train_and_test = evaluate.train_and_test

    def counting(source, *args, **kwargs):
        trained.append(source.name)
        return train_and_test(source, *args, **kwargs)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "train_and_test", counting)
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "longest_shared_runs", crash)  # dies in the synthetic source, after real
        with pytest.raises(KeyboardInterrupt):
            evaluate.run_stage(run, cfg)
    assert trained == ["real", "synthetic"]
    assert not run.is_complete("evaluate") and not run.metrics.exists()
    metrics = evaluate.run_stage(run, cfg)
    assert trained == ["real", "synthetic", "synthetic"]  # the real-data result was kept, not redone
    assert evaluate.evaluated_sources(metrics) == ["real", "dp_classifier", "synthetic"]
    assert "zero_shot: false" in metrics["meta"]["skipped"]["zero_shot"]
    assert metrics["synthetic"]["label_fidelity"]["n"] == 16


# --------------------------------------------------------------------------- the embedding classifier and MAUVE


def test_embedding_classifier_path_embeds_each_set_once_and_reports_like_the_fine_tuned_one(tmp_path, monkeypatch):
    run = build_run(tmp_path)
    embedded = []  # sizes of the text sets embedded
    embed = embeddings.sentence_embeddings

    def counting(texts, *args, **kwargs):
        embedded.append(len(texts))
        return embed(texts, *args, **kwargs)

    monkeypatch.setattr(embeddings, "sentence_embeddings", counting)
    cfg = build(EvaluateConfig, {**TINY_EVALUATE, "classifier_kind": "embedding"})
    started = time.time()
    metrics = evaluate.run_stage(run, cfg)
    wall_s = time.time() - started

    # real 32, test 20, synthetic 16, zero_shot 4: each once, for the classifiers, fidelity and MAUVE
    assert sorted(embedded) == [4, 16, 20, 32]
    meta = metrics["meta"]
    assert (meta["classifier"], meta["classifier_kind"]) == ("minilm-l6", "embedding")
    assert meta["classifier_description"] == "logistic regression on frozen minilm-l6 embeddings"
    assert meta["embedding_timing"][0]["texts"] == 72 and meta["mauve"]["n_heldout"] == 20
    print(f"embedding path: stage {wall_s:.1f} s, {meta['embedding_timing'][0]}")

    real, synthetic, zero_shot = metrics["real"], metrics["synthetic"], metrics["zero_shot"]
    common = {"n_train", "n_test", "accuracy", "f1", "f1_average", "confusion_matrix", "label_counts", "trained",
              "notes", "mauve", "mauve_details"}
    for entry in (real, synthetic, zero_shot):
        assert common <= set(entry)
        assert 0 <= entry["mauve"] <= 1 and sum(map(sum, entry["confusion_matrix"])) == 20
    assert (real["n_train"], synthetic["n_train"], zero_shot["n_train"]) == (32, 16, 4)
    assert real["trained"] and real["C"] in embeddings.DEFAULT_CS and real["accuracy"] >= 0.8  # an easy task
    assert synthetic["trained"] and synthetic["accuracy"] >= 0.8
    assert zero_shot["trained"] is False and zero_shot["accuracy"] == pytest.approx(0.5)  # one label
    details = real["mauve_details"]
    assert (details["n_source"], details["n_heldout"], details["features"]) == (16, 20, "minilm-l6")
    assert details["num_buckets"] == 2 and details["seed"] == 0
    assert zero_shot["mauve_details"]["n_source"] == 4
    fidelity = synthetic["label_fidelity"]
    assert fidelity["n"] == 16 and set(fidelity["per_label"]) == {"negative", "positive"}
    assert fidelity["overall"] >= 0.8  # toy reviews: the real-data classifier reads their labels
    assert evaluate.metrics_table(metrics).shape == (4, 11)
    one = evaluate.one_table(run, metrics)
    assert list(one.index) == ["real", "dp_classifier", "synthetic", "zero_shot"]
    assert one.loc["zero_shot", "accuracy_se"] == pytest.approx((0.25 / 20) ** 0.5)
    assert one.loc["real", "mauve"] == real["mauve"] and one.loc["synthetic", "mauve_n"] == 16
    assert one.loc["dp_classifier", "epsilon"] == guarantee.round_up(metrics["dp_classifier"]["epsilon"])
    assert one.loc["synthetic", "label_fidelity"] == fidelity["overall"]

    # the report names the classifier and carries MAUVE and the standard error
    write_json_atomic(run.privacy, {"dp": True, "epsilon": 4.0, "delta": 1e-5, "noise_multiplier": 0.9, "steps": 5})
    result = report.write_report(tmp_path, tmp_path / "report")
    table = result["table"].set_index("source")
    assert list(result["table"].source) == ["real", "dp_classifier", "synthetic", "zero_shot"]
    assert set(table.classifier) == {"minilm-l6 (embedding)", "minilm-l6 (embedding, DP-SGD)"}
    assert table.loc["synthetic", "mauve"] == synthetic["mauve"] and table.loc["real", "mauve"] == real["mauve"]
    assert table.loc["zero_shot", "accuracy_se"] == pytest.approx((0.25 / 20) ** 0.5)
    csv_header = (tmp_path / "report" / "table.csv").read_text().splitlines()[0].split(",")
    assert {"classifier", "accuracy_se", "mauve"} <= set(csv_header)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| accuracy_se |" in text and "minilm-l6 (embedding)" in text and "sqrt(p (1 - p) / n_test)" in text
    assert (tmp_path / "report" / "accuracy_vs_epsilon.png").stat().st_size > 1000


def test_mauve_can_be_switched_off_and_capped(tmp_path):
    run = build_run(tmp_path, zero_shot=False)
    metrics = evaluate.run_stage(run, build(EvaluateConfig, {**TINY_EVALUATE, "classifier_kind": "embedding",
                                                             "mauve": False}))
    assert metrics["synthetic"]["mauve"] is None and "false" in metrics["synthetic"]["mauve_details"]["note"]
    assert metrics["meta"]["mauve"] is None
    capped = evaluate.run_stage(run, build(EvaluateConfig, {**TINY_EVALUATE, "classifier_kind": "embedding",
                                                            "mauve_max_texts": 8}), force=True)
    for source in ("real", "synthetic"):
        details = capped[source]["mauve_details"]
        assert (details["n_source"], details["n_heldout"]) == (8, 8) and 0 <= capped[source]["mauve"] <= 1
    # the classifier is untouched by MAUVE's settings
    assert capped["synthetic"]["accuracy"] == metrics["synthetic"]["accuracy"]
    with pytest.raises(DpnbError, match="classifier_kind"):
        build(EvaluateConfig, {"classifier_kind": "svm"})
