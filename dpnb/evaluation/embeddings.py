"""Frozen sentence embeddings, and what is computed on them: a linear classifier and MAUVE.

**Embedding.** The encoder (all-MiniLM-L6-v2 by default, preset `minilm-l6`, offline) is frozen. A
text cut to `max_length` tokens t_1..t_L gives hidden states h_1..h_L (last layer, 384 wide); with
attention mask m_i (1 for a real token, 0 for padding) its embedding is the masked mean, scaled to
unit length:

    e = u / ||u||_2,   u = (sum_i m_i h_i) / (sum_i m_i).

This is how sentence-transformers defines all-MiniLM-L6-v2 (Transformer -> mean Pooling ->
Normalize). One difference: that model's own limit is 256 tokens; `max_length` defaults to 128 here
(IMDb reviews average about 300 tokens, so both see the opening; 128 is nearly twice as fast, for
about 2.5 points less accuracy of the classifier below on 160 reviews). Since every e has norm 1,
the dot product of two embeddings is their cosine similarity.

**Classifier.** Logistic regression on the frozen embeddings (scikit-learn, L-BFGS; multinomial for
more than two labels): p(y = c | e) = softmax_c(W e + b), fitted by minimising

    sum_j -log p(y_j | e_j) + ||W||^2 / (2 C).

Only W and b (385 numbers per label, one set of 385 for two labels) are learned, so a few hundred
labelled texts suffice and training takes milliseconds once the texts are embedded. The inverse
regularisation strength C is chosen by stratified k-fold cross-validation on the training texts
alone, as the C of least mean held-out log-loss (accuracy ties too often on small data: every C
scores 1.0 on an easy set; exact ties go to the smaller C, the stronger regularisation), then the
model is refitted on all of them. The test set is never looked at. Everything is deterministic given
the seed (the folds are its only randomness).

**MAUVE** (Pillutla et al., NeurIPS 2021; JMLR 2023) compares two samples of text, here P = real
held-out texts and Q = synthetic texts, through their embeddings. Both sets are pooled, reduced by
PCA to the components explaining 90% of the variance, and clustered by k-means into k buckets; P and
Q become histograms p, q over the buckets. For mixtures r_w = w p + (1 - w) q the divergence curve

    C(P, Q) = { (exp(-s KL(q || r_w)), exp(-s KL(p || r_w))) : w in (0, 1) }

(scaling factor s, default 5) traces the trade-off between Q placing mass where P has none (type I:
synthetic text unlike any real text) and Q missing regions of P (type II: real text the generator
does not produce). MAUVE is the area under that curve: 1 when p = q, near 0 when the two live in
disjoint buckets. It depends on the features (scores on MiniLM features do not compare with the
paper's GPT-2-large features), on k and on s: compare scores only under the same settings, which is
why `mauve_score` returns them.

**MAUVE is noisy at small n.** With k = n / 10 buckets (the default, n the smaller side), each bucket
holds about 10 texts per side, so the histograms carry multinomial noise: the plug-in KL of a
k-bucket histogram of n samples is biased upwards by about (k - 1) / (2 n), which stays near 0.05
whatever n because k grows with n, and its standard deviation shrinks only like 1 / sqrt(n). So two
samples of the *same* distribution score below 1, and how far below varies from draw to draw.
Measured on MiniLM features of real IMDb test reviews, two disjoint samples, 5 draws and k-means
seeds each: n = 50, 100, 200, 500 per side gave means 0.976, 0.961, 0.954, 0.965 (no trend in n)
with standard deviations 0.034, 0.029, 0.033, 0.011 (single draws from 0.89 to 1.0). The paper uses
n = 5000 per side. Below a few hundred texts per side, read MAUVE as a coarse ordering (same
distribution, roughly alike, unlike), compare sets of equal n under one seed, and repeat over seeds
or resamples to see the spread. MiniLM features are dominated by topic and style more than
sentiment: 200 positive-only reviews against 200 mixed ones still scored 0.97 (positive against
negative reviews: 0.82), so MAUVE here hardly sees a generator that drops a label (label fidelity
does). Shuffling the words of real reviews does register (0.13), random words more so (0.05).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from dpnb.errors import DpnbError
from dpnb.models import load_encoder  # the models module owns every model load

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_ENCODER = "minilm-l6"
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # inverse regularisation strengths tried by cross-validation
MAX_FOLDS = 5


# --------------------------------------------------------------------------- 1. the encoder and embeddings


def sentence_embeddings(
    texts: Sequence[str],
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 128,
    batch_size: int = 64,
) -> np.ndarray:
    """Unit-length mean-pooled embeddings of `texts`, float32 of shape [len(texts), hidden] (384 for MiniLM).

    Texts are batched longest first, so each batch pads to similar lengths, and the rows come back
    in input order. Identical texts give identical rows.
    """
    hidden = int(encoder.config.hidden_size)
    out = np.zeros((len(texts), hidden), dtype=np.float32)
    if not len(texts):
        return out
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable: ties keep input order
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(encoder.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.as_tensor(ids[i], dtype=torch.long)
                mask[r, : len(ids[i])] = 1
            states = encoder(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            weights = mask.to(device=device, dtype=states.dtype).unsqueeze(-1)
            mean = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            unit = torch.nn.functional.normalize(mean.float(), p=2, dim=1)
            out[rows] = unit.cpu().numpy()
    return out


class Embedder:
    """One frozen encoder, loaded on first use, and the embeddings of named text sets, each computed once.

    `features(key, texts)` embeds `texts` the first time `key` is asked for and returns the same
    array afterwards, so a text set shared by several computations (the test set, scored by every
    classifier; a synthetic set, trained on and compared by MAUVE) is embedded once. Asked for some
    `rows` of a set not embedded whole, only those rows are embedded. `timing()` says how long
    loading and embedding took, and per text.
    """

    def __init__(self, name: str = DEFAULT_ENCODER, *, max_length: int = 128, batch_size: int = 64,
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.name, self.max_length, self.batch_size, self.device = name, max_length, batch_size, device
        self.dtype = dtype  # the frozen encoder's format (bfloat16 where measured fast: dpnb.precision)
        self._encoder: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None
        self._features: dict[str | tuple[str, bytes], np.ndarray] = {}
        self.load_s = 0.0
        self.embed_s = 0.0
        self.n_embedded = 0

    @property
    def encoder(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The frozen encoder and its tokenizer (loaded, and moved to `device`, on first use)."""
        if self._encoder is None:
            started = time.time()
            model, tokenizer = load_encoder(self.name)
            self._encoder = (model.to(device=self.device, dtype=self.dtype), tokenizer)
            self.load_s = time.time() - started
        return self._encoder

    def features(self, key: str, texts: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of the text set `key` (all of `texts`, or the given `rows` of it), computed once."""
        whole = self._features.get(key)
        if whole is not None:
            if len(whole) != len(texts):
                raise DpnbError(f"text set '{key}' was embedded with {len(whole)} texts, now given {len(texts)}")
            return whole if rows is None else whole[rows]
        part_key = key if rows is None else (key, np.asarray(rows, dtype=np.int64).tobytes())
        if part_key not in self._features:
            chosen = list(texts) if rows is None else [texts[int(i)] for i in rows]
            model, tokenizer = self.encoder
            started = time.time()
            self._features[part_key] = sentence_embeddings(chosen, model, tokenizer, max_length=self.max_length,
                                                           batch_size=self.batch_size)
            self.embed_s += time.time() - started
            self.n_embedded += len(chosen)
        return self._features[part_key]

    def timing(self) -> dict[str, Any]:
        """Encoder, load and embedding wall time, texts embedded and milliseconds per text."""
        return {"encoder": self.name, "max_length": self.max_length, "device": self.device,
                "dtype": str(self.dtype).removeprefix("torch."),
                "load_s": round(self.load_s, 2), "embed_s": round(self.embed_s, 2), "texts": self.n_embedded,
                "ms_per_text": round(1000 * self.embed_s / self.n_embedded, 2) if self.n_embedded else None}


# --------------------------------------------------------------------------- 2. a linear classifier on them


@dataclass
class EmbeddingClassifier:
    """Logistic regression on frozen embeddings, with the encoder that makes them.

    `model` is None when the training texts held a single label: every text then gets that label.
    `cv` records how C was chosen: the grid, the folds and the mean cross-validated accuracy per C.
    """

    model: LogisticRegression | None
    encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    C: float | None
    constant_label: int | None = None
    max_length: int = 128
    batch_size: int = 64
    cv: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Most likely label per row of already computed embeddings, as int64."""
        if self.model is None:
            return np.full(len(features), self.constant_label, dtype=np.int64)
        if not len(features):
            return np.zeros(0, dtype=np.int64)
        return self.model.predict(features).astype(np.int64)


def fit_logistic_regression(
    features: np.ndarray, labels: Sequence[int], *, C: float | None = None, Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> tuple[LogisticRegression | None, float | None, dict[str, Any]]:
    """Fit logistic regression to (features, labels), choosing C by cross-validation when `C` is None.

    Cross-validation uses stratified folds (at most 5, at most the size of the smallest class) of the
    given data only, shuffled with `seed`, and picks the C of least mean held-out log-loss. Returns
    (model, C, cv record); the model is None when the labels hold a single class, and C is then None
    too. Fewer than two texts in some class leaves nothing to cross-validate: C falls back to 1 and
    the record says so.
    """
    y = np.asarray(labels, dtype=np.int64)
    if len(y) != len(features):
        raise DpnbError(f"{len(features)} embeddings but {len(y)} labels")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return None, None, {"note": "a single label in the training data: every text gets it"}
    base = LogisticRegression(C=1.0 if C is None else C, max_iter=2000)
    if C is not None:
        return base.fit(features, y), float(C), {"note": "C given, not cross-validated"}
    folds = int(min(MAX_FOLDS, counts.min()))
    if folds < 2:
        return base.fit(features, y), 1.0, {"note": "a class with a single text: C = 1, not cross-validated"}
    grid = sorted(float(c) for c in Cs)  # ascending, so that a tie goes to the stronger regularisation
    search = GridSearchCV(
        base, {"C": grid}, scoring={"log_loss": "neg_log_loss", "accuracy": "accuracy"}, refit="log_loss",
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
    )
    search.fit(features, y)
    results = search.cv_results_
    record = {
        "Cs": grid, "folds": folds, "seed": seed,
        "cv_log_loss": [float(-v) for v in results["mean_test_log_loss"]],
        "cv_accuracy": [float(v) for v in results["mean_test_accuracy"]],
    }
    return search.best_estimator_, float(search.best_params_["C"]), record


def train_embedding_classifier(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 64,
) -> EmbeddingClassifier:
    """Embed the training texts with the frozen encoder and fit logistic regression on them.

    C is chosen from `Cs` by cross-validation on the training texts when not given (see
    `fit_logistic_regression`). Predict with `predict_embedding_classifier`.
    """
    started = time.time()
    features = sentence_embeddings(train_texts, encoder, tokenizer, max_length=max_length, batch_size=batch_size)
    classifier = fit_embedding_classifier(features, train_labels, encoder, tokenizer, C=C, Cs=Cs, seed=seed,
                                          max_length=max_length, batch_size=batch_size)
    classifier.wall_s = time.time() - started
    return classifier


def fit_embedding_classifier(
    features: np.ndarray,
    labels: Sequence[int],
    encoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 64,
) -> EmbeddingClassifier:
    """The embedding classifier fitted on already computed embeddings `features` of the training texts.

    `encoder`, `tokenizer`, `max_length` and `batch_size` must be those that made the features: they
    embed the texts given to `predict_embedding_classifier`. `wall_s` is the fitting time alone.
    """
    started = time.time()
    model, chosen, record = fit_logistic_regression(features, labels, C=C, Cs=Cs, seed=seed)
    constant = None if model is not None or not len(labels) else int(np.asarray(labels)[0])
    if model is None and constant is None:
        raise DpnbError("no training texts: the embedding classifier needs at least one")
    return EmbeddingClassifier(model, encoder, tokenizer, chosen, constant, max_length, batch_size, record,
                               time.time() - started)


def predict_embedding_classifier(classifier: EmbeddingClassifier, texts: Sequence[str]) -> np.ndarray:
    """The most likely label of each text (int64), ready for `classification_metrics(y_true, y_pred, ...)`
    and `label_fidelity(prompted, predicted, ...)`."""
    features = sentence_embeddings(texts, classifier.encoder, classifier.tokenizer,
                                   max_length=classifier.max_length, batch_size=classifier.batch_size)
    return classifier.predict_features(features)


# --------------------------------------------------------------------------- 3. MAUVE


def mauve_score(
    real_features: np.ndarray,
    synthetic_features: np.ndarray,
    *,
    seed: int = 25,
    num_buckets: int | str = "auto",
    scaling_factor: float = 5.0,
    explained_variance: float = 0.9,
    kmeans_num_redo: int = 5,
    kmeans_max_iter: int = 500,
) -> dict[str, Any]:
    """MAUVE of synthetic texts (Q) against real held-out texts (P), from their embeddings.

    `num_buckets` "auto" is max(2, round(min(n_real, n_synthetic) / 10)), as in mauve-text. The
    result holds `mauve`, `mauve_star` (the same on add-1/2 smoothed histograms, less biased at
    small n; Pillutla et al., JMLR 2023), `frontier_integral` (0 when identical, lower is closer)
    and the settings used. Fixed `seed` and inputs give the same result. See the module docstring
    for what it measures and its noise at small n.
    """
    # Imported here, not at the top: mauve-text loads faiss (and scikit-learn's PCA) on import,
    # heavy for every other user of this module.
    import mauve

    p = np.asarray(real_features, dtype=np.float32)
    q = np.asarray(synthetic_features, dtype=np.float32)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise DpnbError(f"MAUVE needs two feature matrices of equal width, got {p.shape} and {q.shape}")
    if min(len(p), len(q)) < 2:
        raise DpnbError(f"MAUVE needs at least 2 texts on each side, got {len(p)} real and {len(q)} synthetic")
    buckets = max(2, int(round(min(len(p), len(q)) / 10))) if num_buckets == "auto" else int(num_buckets)
    if buckets > len(p) + len(q):
        raise DpnbError(f"{buckets} buckets for {len(p) + len(q)} texts: use fewer buckets")
    out = mauve.compute_mauve(
        p_features=p, q_features=q, num_buckets=buckets, mauve_scaling_factor=scaling_factor,
        kmeans_explained_var=explained_variance, kmeans_num_redo=kmeans_num_redo,
        kmeans_max_iter=kmeans_max_iter, seed=seed, verbose=False,
    )
    return {
        "mauve": float(out.mauve),
        "mauve_star": float(out.mauve_star),
        "frontier_integral": float(out.frontier_integral),
        "num_buckets": int(out.num_buckets),
        "scaling_factor": float(scaling_factor),
        "explained_variance": float(explained_variance),
        "n_real": int(len(p)),
        "n_synthetic": int(len(q)),
        "seed": int(seed),
    }
