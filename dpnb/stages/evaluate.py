"""04 evaluate: is the synthetic data useful, faithful, varied, and free of verbatim copies?

**Utility (train on synthetic, test on real).** A classifier is trained on the real training data
and, separately and with the same budget (classifier, epochs, learning rate, batch size, max_length,
seed), on each synthetic set (`dpnb.evaluation.classifier`). All of them are tested on the same real test
split. If synthetic data captured what matters in the real data for the task, the two classifiers
score alike. F1 is the binary F1 of the positive class (label 1) for two labels and the macro F1
otherwise; the entry says which in `f1_average`.

The classifier is `classifier` fine-tuned (`classifier_kind: finetune`, the paper's recipe) or
logistic regression on its frozen sentence embeddings (`classifier_kind: embedding`: seconds, and
steadier on a few hundred texts); `meta` names both. In the embedding path every text set (the real
training subsample, each synthetic set, the test set) is embedded once and its features reused:
by every classifier that reads it, for label fidelity and for MAUVE.

**Standard errors** (`dpnb.evaluation.standard_errors`): of each source's accuracy, from the
binomial sampling of the test set, and of the differences between sources.

**MAUVE** (`dpnb.evaluation.embeddings.mauve_score`; when `mauve` is set). How close the distribution of a
source's texts is to that of held-out real reviews, on MiniLM sentence embeddings (cut to
`max_length` tokens): 1 when indistinguishable, near 0 when disjoint. The held-out reviews are the
real test texts, the same ones the classifiers are scored on: MAUVE only compares two distributions
and nothing is chosen or tuned on it, so reusing them costs nothing. Each synthetic set is compared
as a whole (at most `mauve_max_texts` texts per side, a random subsample drawn with `seed`); the
`real` source gets a reference: as many real training texts (from the `n_real_train` subsample) as
the largest synthetic set, against the same held-out texts, the ceiling to read the others against.
Both n are stored in `mauve_details`: below a few hundred texts per side, MAUVE is a coarse ordering
(see `dpnb.evaluation.embeddings`).

**Fidelity, diversity, length** (synthetic sets only):
- label fidelity: the classifier trained on real data labels the synthetic texts; the share that
  agree with the label each text was prompted with, overall and per label;
- diversity: distinct-1, distinct-2 and the duplicate share (`dpnb.data.textstats`), beside the same
  figures on an equally large random sample of real training texts (distinct-n falls as a corpus
  grows, so only equal-size corpora compare);
- length: review tokens in the generator's tokenizer, synthetic against the real training records.
  Generator tokens are the unit the generator was trained and sampled in (`max_length`,
  `max_new_tokens`), so both sides are measured as the generator saw them, truncation included.

**Memorisation screen** (`dpnb.evaluation.memorisation`). For every synthetic text, the longest run of
consecutive generator tokens it shares with any training record, with the training row it matches.
Samples sharing `memorisation_threshold` tokens or more are flagged for inspection. The same screen
is run on the real test split as a reference: how much held-out real reviews share with the training
set without any model involved. The screen reads the private records, so it is outside the DP
guarantee: metrics.json keeps its counts only, the flagged samples (which training row each copies,
at which offsets) go to the private `memorisation_flagged.json`, and a set filtered by them is no
longer covered by the guarantee (the dataset card says so).

Outputs: `metrics.json` with one entry per training source (`real`, `dp_classifier`, `synthetic`, `pe`,
`zero_shot`:
accuracy, f1, confusion_matrix, n_train, n_test, mauve, mauve_details, ...) and a `meta` entry
(classifier, classifier_kind, classifier_description, mauve settings, embedding timings, ...), no
record index or offset anywhere; `memorisation_flagged.json` (private); figures
`confusion_<source>.png`, `lengths.png`, `memorisation.png`, written before the stage is marked
complete. Each source's result is also kept in `evaluate/<source>.json` (private, like the run) as
soon as it is done (`dpnb.io.cached`), so an interrupted stage resumes after the last finished source
(a rerun with another config or other inputs ignores them).

Which sources run: `real` and `dp_classifier` (the direct DP classifier, `dpnb.evaluation.dp_classifier`)
need only prepare. `synthetic` needs a completed generate stage (an error with the fix otherwise: the
stage exists to evaluate it). `pe` and `zero_shot` are used when generate wrote them and are skipped
with a note in `meta.skipped` otherwise.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from dpnb.config import SOURCE_NAMES, EvaluateConfig
from dpnb.data.prepared import load_prepared
from dpnb.data.sources import stratified_indices
from dpnb.data.textstats import diversity, length_summary, lengths_from_counts, plot_length_histograms
from dpnb.errors import DpnbError, require
from dpnb.evaluation.classifier import (
    Source,
    classification_metrics,
    classifier_entry,
    describe_classifier,
    f1_average,
    label_fidelity,
    predict,
    real_classifier_key,
    shared_classifier,
    train_and_test,
    train_and_test_embedding,
)
from dpnb.evaluation.dp_classifier import DPClassifierSettings, train_dp_classifier, write_dp_classifier
from dpnb.evaluation.embeddings import DEFAULT_ENCODER, Embedder, mauve_score
from dpnb.evaluation.memorisation import (
    flagged_samples,
    longest_shared_runs,
    memorisation_figure,
    memorisation_summary,
    review_token_ids,
    text_token_ids,
)
from dpnb.evaluation.one_table import one_table as build_one_table
from dpnb.generation.sampling import load_synthetic
from dpnb.io import cached, read_json, save_figure, write_json_atomic
from dpnb.models import load_tokenizer, release_memory, resolve_device
from dpnb.precision import Precision, choose
from dpnb.privacy.accounting import default_delta
from dpnb.rundir import RunDir, shared_store

T = TypeVar("T")

STAGE = "evaluate"
SOURCES = SOURCE_NAMES  # real, dp_classifier, synthetic (DP fine-tuned), pe (Private Evolution), zero_shot
SYNTHETIC_SOURCES = ("synthetic", "pe", "zero_shot")
MAUVE_ENCODER = DEFAULT_ENCODER  # MAUVE's features, whatever the classifier


# --------------------------------------------------------------------------- one synthetic set's quality


def synthetic_quality(
    source: Source, source_ids: list[np.ndarray], train_ids: list[np.ndarray], train_texts: Sequence[str],
    label_names: Sequence[str], cfg: EvaluateConfig,
) -> dict[str, Any]:
    """Diversity (with an equal-size real reference), lengths and the memorisation screen of one set.

    `memorisation_flagged` (the flagged samples with the training rows they copy) is private: `run_stage`
    moves it out of the metrics into memorisation_flagged.json.
    """
    rng = np.random.default_rng(cfg.seed)
    reference_rows = rng.permutation(len(train_texts))[: len(source.texts)]
    runs = longest_shared_runs(train_ids, source_ids)
    return {
        "diversity": {**diversity(source.texts),
                      "real_reference": diversity([train_texts[i] for i in reference_rows])},
        "length": length_summary([len(ids) for ids in source_ids]),
        "memorisation": memorisation_summary(runs, cfg.memorisation_threshold),
        "memorisation_flagged": flagged_samples(runs, cfg.memorisation_threshold),
    }


def take_flagged(metrics: dict[str, Any]) -> dict[str, list[dict[str, int]]]:
    """Move every flagged list out of `metrics` (in place), by source; the real test reference as "real_test"."""
    flagged = {}
    for source in _synthetic_sources(metrics):
        older = metrics[source]["memorisation"].pop("flagged", [])  # where an older dpnb's partial result kept them
        flagged[source] = metrics[source].pop("memorisation_flagged", older)
    reference = metrics["meta"].get("real_reference")
    if reference:
        older = reference["test_memorisation"].pop("flagged", [])
        flagged["real_test"] = reference.pop("test_memorisation_flagged", older)
    return flagged


# --------------------------------------------------------------------------- MAUVE against held-out real texts


def sample_rows(n: int, cap: int, seed: int) -> np.ndarray:
    """At most `cap` of the rows 0..n-1, drawn at random with `seed`, in increasing order (all when n <= cap)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def source_mauve(features: np.ndarray, heldout: np.ndarray, cfg: EvaluateConfig) -> dict[str, Any]:
    """`mauve` and `mauve_details` of one source: its text features (Q) against the held-out ones (P).

    The details hold the settings of `mauve_score`, n per side (`n_source`, `n_heldout`), the
    features used and the held-out set; `mauve` is None with a note when a side has fewer than 2 texts.
    """
    details: dict[str, Any] = {"features": MAUVE_ENCODER, "max_length": cfg.max_length, "heldout": "real test texts",
                               "n_source": int(len(features)), "n_heldout": int(len(heldout))}
    if min(len(features), len(heldout)) < 2:
        return {"mauve": None, "mauve_details": {**details, "note": "MAUVE needs at least 2 texts on each side"}}
    result = mauve_score(heldout, features, seed=cfg.seed)
    for side in ("n_real", "n_synthetic"):  # named n_source and n_heldout here: the source may be real
        result.pop(side)
    return {"mauve": result.pop("mauve"), "mauve_details": {**details, **result}}


# --------------------------------------------------------------------------- the stage


def plan_sources(run: RunDir, cfg: EvaluateConfig) -> tuple[list[str], dict[str, str]]:
    """The sources to evaluate now, and the skipped ones with the reason (see the module docstring)."""
    wanted_synthetic = [s for s in cfg.sources if s in SYNTHETIC_SOURCES]
    if wanted_synthetic and not run.is_complete("generate"):
        raise DpnbError(
            f"evaluate.sources lists {', '.join(wanted_synthetic)} but the generate stage has not completed "
            f"in {run.path}: run generate first (03_generate), or set evaluate.sources to [real, dp_classifier]"
        )
    generated = run.completed_config("generate") or {}
    optional = {"zero_shot": ("zero_shot", True, "generate ran with zero_shot: false, so there is no zero-shot set"),
                "pe": ("pe", False, "generate ran with pe: false, so there is no Private Evolution set")}
    chosen, skipped = [], {}
    for source in SOURCES:
        if source not in cfg.sources:
            continue
        path = getattr(run, source) if source in SYNTHETIC_SOURCES else None
        if path is not None and not (path / "state.json").exists():
            setting, default, why = optional.get(source, (None, True, ""))
            if setting is None or generated.get(setting, default):
                raise DpnbError(f"{path} holds no data set although generate completed; rerun generate with "
                                f"force=True")
            skipped[source] = why
            continue
        chosen.append(source)
    return chosen, skipped


def _load_source(run: RunDir, name: str, num_labels: int) -> Source:
    data = load_synthetic(getattr(run, name))
    labels = [int(v) for v in data["label"]]
    bad = sorted({v for v in labels if not 0 <= v < num_labels})
    require(not bad, f"{name} has labels {bad} outside 0..{num_labels - 1} of data/manifest.json; rerun generate "
                     f"with force=True")
    return Source(name, list(data["text"]), labels)


def _resumable(partial_dir: Path, name: str, key: str, compute: Callable[[], T]) -> T:
    """A source's result from an earlier, interrupted run with the same key, else computed and kept."""
    computed: list[bool] = []

    def compute_now() -> T:
        computed.append(True)
        return compute()

    result = cached(partial_dir / f"{name}.json", key, compute_now)
    if not computed:
        print(f"{name}: reusing the result of an interrupted run", flush=True)
    return result


@dataclass
class Evaluation:
    """What every source's evaluation reads: the run, its config, the data and the encoders.

    Encoders load on first use, and each text set is embedded once per encoder (the classifier's, when
    classifier_kind is embedding, and MAUVE's: one and the same for the default minilm-l6).
    """

    run: RunDir
    cfg: EvaluateConfig
    label_names: list[str]
    device: str
    precision: Precision  # the sentence encoders' format
    train: Source  # every prepared training record: what the generators saw
    test: Source
    train_ids: list[np.ndarray]  # the training records' review tokens (the memorisation screen)
    generator_tokenizer: Any
    heldout_rows: np.ndarray  # the test texts MAUVE compares every source with
    embedders: dict[str, Embedder] = field(default_factory=dict)

    def embedder(self, name: str) -> Embedder:
        if name not in self.embedders:
            self.embedders[name] = Embedder(name, max_length=self.cfg.max_length, batch_size=2 * self.cfg.batch_size,
                                            device=self.device, dtype=self.precision.dtype)
        return self.embedders[name]

    def fit_and_score(self, source: Source, keep_model: bool = False) -> tuple[dict[str, Any], Any]:
        """The classifier trained on `source`, tested on the real test set: its entry, and the classifier."""
        if self.cfg.classifier_kind == "embedding":
            return train_and_test_embedding(source, self.test, self.label_names, self.cfg,
                                            self.embedder(self.cfg.classifier))
        return train_and_test(source, self.test, self.label_names, self.cfg, self.device, keep_model=keep_model)

    def predict_labels(self, classifier: Any, source: Source) -> np.ndarray:
        if self.cfg.classifier_kind == "embedding":
            return classifier.predict_features(self.embedder(self.cfg.classifier).features(source.name, source.texts))
        return predict(classifier, source.texts, self.cfg.max_length, 2 * self.cfg.batch_size, self.device)

    def mauve_of(self, source: Source, rows: np.ndarray) -> dict[str, Any]:
        """MAUVE of `rows` of a source against the held-out real texts (`source_mauve`)."""
        if not self.cfg.mauve:
            return {"mauve": None, "mauve_details": {"note": "evaluate.mauve is false"}}
        print(f"{source.name}: MAUVE of {len(rows)} texts against {len(self.heldout_rows)} held-out real texts ...",
              flush=True)
        features = self.embedder(MAUVE_ENCODER)
        return source_mauve(features.features(source.name, source.texts, rows),
                            features.features("test", self.test.texts, self.heldout_rows), self.cfg)


def open_evaluation(run: RunDir, cfg: EvaluateConfig) -> Evaluation:
    """The evaluation's context: the prepared data, the device, the encoders' format."""
    train, test, manifest = load_prepared(run)
    device = resolve_device(cfg.device)
    generator_tokenizer = load_tokenizer(manifest["model"])
    test_set = Source("test", list(test["text"]), [int(v) for v in test["label"]])
    precision = choose(cfg.dtype, device)
    print(f"sentence encoders: {precision.reason}", flush=True)
    return Evaluation(run, cfg, list(manifest["label_names"]), device, precision,
                      Source("real", list(train["text"]), [int(v) for v in train["label"]]), test_set,
                      review_token_ids(train, generator_tokenizer.eos_token_id), generator_tokenizer,
                      sample_rows(len(test_set.texts), cfg.mauve_max_texts, cfg.seed))


def real_source(ev: Evaluation) -> Source:
    """The real training texts the reference classifier sees: all of them, or `n_real_train` (stratified)."""
    if ev.cfg.n_real_train is None or ev.cfg.n_real_train >= len(ev.train.texts):
        return ev.train
    rows = stratified_indices(np.asarray(ev.train.labels), ev.cfg.n_real_train, ev.cfg.seed, "evaluate.n_real_train")
    return Source("real", [ev.train.texts[i] for i in rows], [ev.train.labels[i] for i in rows])


def fit_real(ev: Evaluation, real: Source) -> tuple[dict[str, Any], Any]:
    """The real-data classifier; a fine-tuned one is shared by a sweep's runs on the same texts."""
    store = shared_store()
    if store is None or ev.cfg.classifier_kind != "finetune":  # the embedding classifier takes seconds
        return ev.fit_and_score(real, keep_model=True)
    directory = store / f"real-classifier-{real_classifier_key(real, ev.test, ev.cfg, ev.device)}"
    return shared_classifier(directory, ev.device, lambda: ev.fit_and_score(real, keep_model=True))


def evaluate_real(ev: Evaluation, synthetic: dict[str, Source]) -> dict[str, Any]:
    """The real-data classifier's entry, MAUVE of real texts (the ceiling) and its labels of every synthetic set."""
    real = real_source(ev)
    entry, classifier = fit_real(ev, real)
    fidelity = {}
    for name, source in synthetic.items():
        if classifier is None:
            fidelity[name] = {"overall": None, "per_label": None, "n": len(source.texts),
                              "note": "the real-data classifier was not trained"}
            continue
        fidelity[name] = label_fidelity(source.labels, ev.predict_labels(classifier, source), ev.label_names)
    del classifier
    release_memory()
    # the real-vs-real MAUVE reference: as many real texts as the largest synthetic set
    n_reference = max((len(s.texts) for s in synthetic.values()), default=len(real.texts))
    reference_rows = sample_rows(len(real.texts), min(n_reference, ev.cfg.mauve_max_texts), ev.cfg.seed)
    return {**entry, **ev.mauve_of(real, reference_rows), "fidelity_of": fidelity}


def dp_classifier_settings(ev: Evaluation) -> DPClassifierSettings:
    """The direct DP classifier's budget: the fine-tuning run's (epsilon, delta) unless the config sets them."""
    finetuned = read_json(ev.run.privacy) if ev.run.privacy.exists() else {}
    tuned = bool(finetuned.get("dp"))
    epsilon = ev.cfg.dp_classifier_epsilon or (finetuned["target_epsilon"] if tuned else 8.0)
    delta = ev.cfg.dp_classifier_delta or (finetuned["delta"] if tuned else default_delta(len(ev.train.labels)))
    return DPClassifierSettings(
        target_epsilon=float(epsilon), delta=float(delta), epochs=ev.cfg.dp_classifier_epochs,
        batch_size=ev.cfg.dp_classifier_batch_size, lr=ev.cfg.dp_classifier_lr,
        max_grad_norm=ev.cfg.dp_classifier_max_grad_norm, seed=ev.cfg.seed,
        deterministic=bool(finetuned.get("deterministic", False)))


def evaluate_dp_classifier(ev: Evaluation) -> dict[str, Any]:
    """Logistic regression trained with DP-SGD on every training record's embedding, tested on the real test set.

    Its weights and privacy.json go to dp_classifier/ (both shareable: the weights carry the guarantee).
    """
    settings = dp_classifier_settings(ev)
    embedder = ev.embedder(ev.cfg.classifier)
    print(f"dp_classifier: DP-SGD on frozen {embedder.name} embeddings of {len(ev.train.texts)} private records "
          f"at epsilon {settings.target_epsilon:g} ...", flush=True)
    started = time.time()
    key = "real" if real_source(ev) is ev.train else "train"  # embedded once when the real classifier sees all
    trained = train_dp_classifier(embedder.features(key, ev.train.texts), ev.train.labels, len(ev.label_names),
                                  settings)
    predicted = trained.predict_features(embedder.features("test", ev.test.texts))
    write_dp_classifier(ev.run.dp_classifier, trained, embedder)
    source = Source("dp_classifier", ev.train.texts, ev.train.labels)
    return {**classifier_entry(source, ev.test, ev.label_names),
            **classification_metrics(ev.test.labels, predicted.tolist(), len(ev.label_names)), "trained": True,
            "epsilon": trained.privacy["epsilon"], "delta": trained.privacy["delta"],
            "privacy": trained.privacy, "train_wall_s": round(time.time() - started, 1)}


def evaluate_synthetic(ev: Evaluation, source: Source) -> dict[str, Any]:
    """One synthetic set: its classifier on the real test set, MAUVE, diversity, lengths, the memorisation screen."""
    entry, _ = ev.fit_and_score(source)
    mauve = ev.mauve_of(source, sample_rows(len(source.texts), ev.cfg.mauve_max_texts, ev.cfg.seed))
    print(f"{source.name}: diversity, lengths, memorisation screen ...", flush=True)
    ids = text_token_ids(source.texts, ev.generator_tokenizer)
    quality = synthetic_quality(source, ids, ev.train_ids, ev.train.texts, ev.label_names, ev.cfg)
    return {**entry, **mauve, **quality, "epsilon": source_epsilon(ev.run, source.name)}


def evaluate_reference(ev: Evaluation) -> dict[str, Any]:
    """How much held-out real reviews share with the training set without any model: the screen's reference."""
    print("real test reviews: memorisation screen against the training set (reference) ...", flush=True)
    _, test, _ = load_prepared(ev.run)
    test_ids = review_token_ids(test, ev.generator_tokenizer.eos_token_id)
    runs = longest_shared_runs(ev.train_ids, test_ids)
    return {"train_length": length_summary([len(ids) for ids in ev.train_ids]),
            "test_memorisation": memorisation_summary(runs, ev.cfg.memorisation_threshold),
            "test_memorisation_flagged": flagged_samples(runs, ev.cfg.memorisation_threshold)}


def source_epsilon(run: RunDir, source: str) -> float | None:
    """The epsilon a synthetic set carries: its privacy.json's (0 for zero-shot, None without DP)."""
    if source == "zero_shot":
        return 0.0
    path = run.privacy if source == "synthetic" else getattr(run, source) / "privacy.json"
    return read_json(path).get("epsilon") if path.exists() else None


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
    partial_dir = run.partial(STAGE)
    if force:
        shutil.rmtree(partial_dir, ignore_errors=True)
    key = run.fingerprint(STAGE, cfg)  # a finished source is reused only for the same config and inputs
    ev = open_evaluation(run, cfg)
    synthetic = {name: _load_source(run, name, len(ev.label_names)) for name in sources if name in SYNTHETIC_SOURCES}
    metrics: dict[str, Any] = {}
    if "real" in sources:
        metrics["real"] = _resumable(partial_dir, "real", key, lambda: evaluate_real(ev, synthetic))
    if "dp_classifier" in sources:
        metrics["dp_classifier"] = _resumable(partial_dir, "dp_classifier", key, lambda: evaluate_dp_classifier(ev))
    for name, source in synthetic.items():
        metrics[name] = _resumable(partial_dir, name, key, lambda source=source: evaluate_synthetic(ev, source))
        fidelity = metrics.get("real", {}).get("fidelity_of", {}).get(name)
        metrics[name]["label_fidelity"] = fidelity or {
            "overall": None, "per_label": None, "n": len(source.texts),
            "note": "needs the real-data classifier: add real to evaluate.sources"}
    if "real" in metrics:
        metrics["real"].pop("fidelity_of", None)
    reference = _resumable(partial_dir, "reference", key, lambda: evaluate_reference(ev)) if synthetic else None
    metrics["meta"] = stage_meta(ev, metrics, skipped, reference)
    flagged = take_flagged(metrics)  # positions of training records: private, never in metrics.json
    write_json_atomic(run.memorisation_flagged, {
        "private": "which samples copy which training rows (data/train), at which token offsets: keep with the "
                   "private data; removing these samples from a set puts it outside the DP guarantee",
        "unit": "generator tokens", "threshold": cfg.memorisation_threshold, "flagged": flagged})
    write_json_atomic(run.metrics, metrics)
    for name, figure in figures(metrics).items():
        save_figure(figure, run.figure(name))
    run.mark_complete(STAGE, cfg, started)
    shutil.rmtree(partial_dir, ignore_errors=True)  # the partial results are in metrics.json now
    return read_json(run.metrics)  # the same values a skipped run returns


def stage_meta(ev: Evaluation, metrics: dict[str, Any], skipped: dict[str, str],
               reference: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json's `meta`: the classifier, the labels, the test set, MAUVE's settings, formats and timings."""
    cfg = ev.cfg
    return {
        "classifier": cfg.classifier,
        "classifier_kind": cfg.classifier_kind,
        "classifier_description": describe_classifier(cfg.classifier_kind, cfg.classifier),
        "label_names": ev.label_names,
        "f1_average": f1_average(len(ev.label_names)),
        "positive_label": ev.label_names[1] if len(ev.label_names) == 2 else None,
        "n_test": len(ev.test.texts),
        "n_train_prepared": len(ev.train.texts),
        "generator_tokenizer": ev.generator_tokenizer.name_or_path,
        "device": ev.device,
        "precision": ev.precision.record(),
        "sources": list(metrics),
        "skipped": skipped,
        "real_reference": reference,
        "mauve": ({"features": MAUVE_ENCODER, "max_length": cfg.max_length, "heldout": "real test texts",
                   "max_texts": cfg.mauve_max_texts, "n_heldout": int(len(ev.heldout_rows)), "seed": cfg.seed}
                  if cfg.mauve else None),
        # this session's loading and embedding times (an interrupted run resumed counts only the rest)
        "embedding_timing": [e.timing() for e in ev.embedders.values()],
    }


def evaluated_sources(metrics: dict[str, Any]) -> list[str]:
    """The training sources present in a metrics.json, in the canonical order."""
    return [s for s in SOURCES if isinstance(metrics.get(s), dict)]


def _synthetic_sources(metrics: dict[str, Any]) -> list[str]:
    return [s for s in evaluated_sources(metrics) if s in SYNTHETIC_SOURCES]


# --------------------------------------------------------------------------- tables


def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per training source: counts, accuracy, F1, fidelity, diversity, length, memorisation."""
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


def one_table(run: RunDir, metrics: dict[str, Any]) -> pd.DataFrame:
    """Each source's accuracy and standard error, F1, MAUVE, label fidelity, epsilon (`dpnb.evaluation.one_table`)."""
    paths = {"synthetic": run.privacy, "pe": run.pe / "privacy.json",
             "dp_classifier": run.dp_classifier / "privacy.json"}
    return build_one_table(metrics, {source: read_json(p) if p.exists() else None for source, p in paths.items()})


def quality_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Synthetic sets beside the real reference: fidelity per label, diversity, length, memorisation."""
    meta = metrics["meta"]
    reference = meta.get("real_reference") or {}
    rows: dict[str, dict[str, Any]] = {}
    for source in _synthetic_sources(metrics):
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


def memorisation_report(metrics: dict[str, Any]) -> str:
    """The screen in words: longest shared run and flagged samples of each set and of the real reference."""
    lines, reference = [], metrics["meta"]["real_reference"]
    for source in _synthetic_sources(metrics):
        m, longest = metrics[source]["memorisation"], metrics[source]["length"]["max"] or 0
        lines.append(f"{source}: longest shared run {m['max']} tokens (median {m['median']}), "
                     f"{m['n_flagged']} samples at or above {m['threshold']} tokens; longest sample {longest} tokens"
                     + (": the threshold is longer, so the screen CANNOT flag any sample of this set (lower "
                        "evaluate.memorisation_threshold to screen it)" if m["threshold"] > longest else ""))
    if reference:
        m = reference["test_memorisation"]
        lines.append(f"real test reviews (reference): longest shared run {m['max']} tokens (median {m['median']}), "
                     f"{m['n_flagged']} at or above {m['threshold']}")
    return "\n".join(lines)


def flagged_table(run: RunDir) -> pd.DataFrame:
    """Every synthetic sample at or above the memorisation threshold, with the training row it shares, read
    from the PRIVATE memorisation_flagged.json (positions of training records; metrics.json holds counts
    only). The file also holds the real test reviews' reference screen ("real_test"), left out here.
    """
    require(run.memorisation_flagged.exists(),
            f"{run.memorisation_flagged} is missing: it is written by the evaluate stage; rerun it (with force=True "
            f"when it completed with an older dpnb, whose metrics.json held the flagged samples)")
    saved = read_json(run.memorisation_flagged)
    rows = [{"source": source, **flag} for source, flags in saved["flagged"].items() if source in SYNTHETIC_SOURCES
            for flag in flags]
    return pd.DataFrame(rows, columns=["source", "sample", "length", "train_row", "train_offset", "sample_offset"])


def sample_table(run: RunDir, per_label: int = 2, max_chars: int = 240, seed: int = 0) -> pd.DataFrame:
    """A few random texts per label from the real training data and each synthetic set, side by side."""
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


def show_samples(run: RunDir, per_label: int = 2, max_chars: int = 240) -> None:
    """Display `sample_table` with columns wide enough for the texts it cut to `max_chars`."""
    with pd.option_context("display.max_colwidth", max_chars + 20):
        display(sample_table(run, per_label=per_label, max_chars=max_chars))


# --------------------------------------------------------------------------- figures


def plot_confusion(entry: dict[str, Any], label_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix of one source's classifier on the real test set (counts)."""
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


def lengths_figure(metrics: dict[str, Any]) -> Figure:
    """Review lengths in generator tokens: real training records against each synthetic set (shares)."""
    series = {"real train": metrics["meta"]["real_reference"]["train_length"]["counts"]}
    series.update({source: metrics[source]["length"]["counts"] for source in _synthetic_sources(metrics)})
    panel = {name: lengths_from_counts(counts) for name, counts in series.items()}
    return plot_length_histograms({"review lengths": panel}, unit="review length (generator tokens)",
                                  share=True, panel_size=(7.0, 3.4))


def plot_memorisation(metrics: dict[str, Any]) -> Figure:
    """Histogram of each sample's longest token run shared with a training text, threshold marked."""
    series = {source: metrics[source]["memorisation"] for source in _synthetic_sources(metrics)}
    series["real test (reference)"] = metrics["meta"]["real_reference"]["test_memorisation"]
    return memorisation_figure(series)


def figures(metrics: dict[str, Any]) -> dict[str, Figure]:
    """The stage's figures by file name: one confusion matrix per source, lengths and memorisation."""
    meta = metrics["meta"]
    drawn = {f"confusion_{source}.png": plot_confusion(metrics[source], meta["label_names"], f"trained on {source}")
             for source in evaluated_sources(metrics)}
    if meta.get("real_reference"):
        drawn["lengths.png"] = lengths_figure(metrics)
        drawn["memorisation.png"] = plot_memorisation(metrics)
    return drawn
