"""The downstream classifier: train on one labelled set, test on the real test set, and label fidelity.

Two kinds (`EvaluateConfig.classifier_kind`), both named by the model `classifier`, both giving the
same entry (accuracy, F1, confusion matrix, n_train, n_test, label counts, notes):
- `finetune` (the default, the paper's): the model with a fresh classification head, every weight
  trained by the recipe below;
- `embedding`: logistic regression on the model's frozen mean-pooled sentence embeddings, C chosen
  by cross-validation on the training texts alone (`dpnb.evaluation.embeddings`). Seconds instead of minutes,
  and steadier than fine-tuning on a few hundred texts.

**Recipe** (the paper's, as transformers' Trainer defaults give it): AdamW with weight decay 0, the
learning rate decaying linearly from `lr` to 0 without warm-up, gradient norm clipped at 1, and
ceil(epochs * ceil(n / batch_size)) steps over reshuffled epochs. Everything random (head
initialisation, dropout, order) comes from one seed, so a run on the same machine repeats exactly.

**Metrics** on a test set of n texts with true labels y and predictions p:

    accuracy = (1/n) sum_i [p_i == y_i]
    F1 = 2 P R / (P + R)

with precision P and recall R of the positive class (label 1) for two labels ("binary"), or the
unweighted mean of the per-class F1 for more ("macro"); a class never predicted has P = 0.

**Label fidelity** of a synthetic set: the share of its texts that the classifier trained on real
data assigns the label they were prompted with, mean_i [f(x_i) == prompted_i], overall and per label.

**Shared by a sweep.** The runs of a sweep on the same data train the same real-data classifier:
the first keeps it (`save_classifier`, private) under a key naming its texts, the test set, the
recipe and the device type (`real_classifier_key`), and the others load it (`shared_classifier`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpnb.config import EvaluateConfig
from dpnb.evaluation.embeddings import Embedder, EmbeddingClassifier, fit_embedding_classifier
from dpnb.io import publish_once
from dpnb.models import load_classifier, quiet_transformers, release_memory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FEW_PER_LABEL = 10  # fewer training texts of a label than this: the metrics carry a warning note
MAX_GRAD_NORM = 1.0  # transformers Trainer's default, kept so the recipe matches the paper's


# --------------------------------------------------------------------------- metrics


def describe_classifier(kind: str, name: str) -> str:
    """The classifier in words, e.g. "minilm-l6, fine-tuned" or "logistic regression on frozen minilm-l6
    embeddings"."""
    if kind == "embedding":
        return f"logistic regression on frozen {name} embeddings"
    return f"{name}, fine-tuned"


def f1_average(num_labels: int) -> str:
    """"binary" (F1 of the positive class, label 1) for two labels, else "macro" (mean over labels)."""
    return "binary" if num_labels == 2 else "macro"


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, F1 and the confusion matrix of predictions on a test set (sklearn).

    accuracy = correct / n. F1 = 2 P R / (P + R) with precision P and recall R of the positive class
    (binary) or averaged unweighted over the classes (macro); a class never predicted has P = 0.
    confusion_matrix[i][j] counts texts of true label i predicted as j.
    """
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



# --------------------------------------------------------------------------- training and prediction


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and GPU): head initialisation, dropout and shuffling."""
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


def save_classifier(classifier: TrainedClassifier, entry: dict[str, Any], directory: Path) -> None:
    """Keep a trained classifier and its test entry at `directory` for another run to reuse, in one
    rename (a directory another process already published is left as it is). It was trained on private
    records without DP: the directory is private (0700), like them."""
    def fill(staging: Path) -> None:
        classifier.model.save_pretrained(staging)
        classifier.tokenizer.save_pretrained(staging)
        (staging / "entry.json").write_text(json.dumps(entry), encoding="utf-8")

    publish_once(directory, fill)


def load_saved_classifier(directory: Path, device: str) -> tuple[dict[str, Any], TrainedClassifier] | None:
    """The classifier and entry `save_classifier` kept at `directory`, or None when there is none."""
    if not (directory / "entry.json").exists():
        return None
    entry = json.loads((directory / "entry.json").read_text(encoding="utf-8"))
    with quiet_transformers(errors_only=True):
        model = AutoModelForSequenceClassification.from_pretrained(directory).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return entry, TrainedClassifier(model, tokenizer, entry["steps"], entry["final_loss"], 0.0)


def real_classifier_key(real: Source, test: Source, cfg: EvaluateConfig, device: str) -> str:
    """What the real-data classifier and its test entry depend on: its texts and labels, the test set,
    the recipe and the device type (a sweep's runs on the same data share one)."""
    recipe = {k: getattr(cfg, k) for k in ("classifier", "classifier_kind", "epochs", "lr", "batch_size",
                                            "max_length", "seed")}
    digest = hashlib.sha256(json.dumps([recipe, torch.device(device).type], sort_keys=True).encode())
    for source in (real, test):
        digest.update(json.dumps([source.texts, source.labels]).encode())
    return digest.hexdigest()[:16]


def shared_classifier(directory: Path, device: str,
                      fit: Callable[[], tuple[dict[str, Any], TrainedClassifier | None]],
                      ) -> tuple[dict[str, Any], TrainedClassifier | None]:
    """The classifier and entry kept at `directory` by an earlier run of a sweep, else `fit()`'s, then kept
    there (`save_classifier`) for the runs after. The directory is named by `real_classifier_key`."""
    saved = load_saved_classifier(directory, device)
    if saved is not None:
        print(f"real: the classifier an earlier run of the sweep trained on the same texts, from {directory}",
              flush=True)
        entry, classifier = saved
        return {**entry, "shared_from_sweep": True}, classifier
    entry, classifier = fit()
    if classifier is not None:
        save_classifier(classifier, entry, directory)
    return entry, classifier


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids to the longest in the batch; the mask marks the real tokens."""
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
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = classifier.tokenizer(list(texts[start : start + batch_size]), truncation=True,
                                         max_length=max_length, padding=True, return_tensors="pt").to(device)
            out.append(classifier.model(**batch).logits.argmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)



# --------------------------------------------------------------------------- one training set, tested on real data


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


def classifier_entry(source: Source, test: Source, label_names: Sequence[str]) -> dict[str, Any]:
    """What every classifier's entry starts with: its training and test set sizes and label counts."""
    return {"n_train": len(source.texts), "n_test": len(test.texts), "f1_average": f1_average(len(label_names)),
            "label_counts": {name: int(np.sum(np.asarray(source.labels) == i)) for i, name in enumerate(label_names)}}


def _untrainable(source: Source, test: Source, label_names: Sequence[str]) -> dict[str, Any] | None:
    """The entry of a set no classifier can learn from (empty, or a single label), else None."""
    base = classifier_entry(source, test, label_names)
    if not source.texts:
        return {**base, "accuracy": None, "f1": None, "confusion_matrix": None, "trained": False,
                "notes": [f"{source.name} holds no texts: nothing to train on"]}
    present = sorted(set(source.labels))
    if len(present) == 1:
        only = present[0]
        metrics = classification_metrics(test.labels, [only] * len(test.labels), len(label_names))
        note = (f"{source.name} holds only label '{label_names[only]}': a classifier trained on it can only "
                f"predict that label, so these are the metrics of predicting it for every test text")
        return {**base, **metrics, "trained": False, "notes": [note]}
    return None


def train_and_test(
    source: Source, test: Source, label_names: Sequence[str], cfg: EvaluateConfig, device: str,
    keep_model: bool = False,
) -> tuple[dict[str, Any], TrainedClassifier | None]:
    """Fine-tune the classifier on `source` and score it on `test`; a set it cannot learn from is reported.

    An empty set yields no metrics, with a note. A set holding a single label yields the metrics of
    predicting that label for every test text (all a classifier trained on it can learn), with a note.
    """
    num_labels = len(label_names)
    untrainable = _untrainable(source, test, label_names)
    if untrainable is not None:
        return untrainable, None
    base = classifier_entry(source, test, label_names)
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


def train_and_test_embedding(
    source: Source, test: Source, label_names: Sequence[str], cfg: EvaluateConfig, embedder: Embedder,
) -> tuple[dict[str, Any], EmbeddingClassifier | None]:
    """Logistic regression on `embedder`'s frozen embeddings of `source`, scored on `test`.

    The same entry as `train_and_test` (sets it cannot learn from are reported the same way), with
    the chosen C and its cross-validation record instead of optimizer steps. The embeddings come from
    `embedder` under the keys `source.name` and "test", so each text set is embedded once however
    many classifiers use it. Returns the fitted classifier too, for label fidelity.
    """
    untrainable = _untrainable(source, test, label_names)
    if untrainable is not None:
        return untrainable, None
    print(f"{source.name}: logistic regression on frozen {embedder.name} embeddings of {len(source.texts)} "
          f"texts ...", flush=True)
    started = time.time()
    features = embedder.features(source.name, source.texts)
    test_features = embedder.features("test", test.texts)
    model, tokenizer = embedder.encoder
    classifier = fit_embedding_classifier(features, source.labels, model, tokenizer, seed=cfg.seed,
                                          max_length=embedder.max_length, batch_size=embedder.batch_size)
    predicted = classifier.predict_features(test_features)
    entry = {**classifier_entry(source, test, label_names),
             **classification_metrics(test.labels, predicted.tolist(), len(label_names)), "trained": True,
             "C": classifier.C, "cv": classifier.cv, "fit_wall_s": round(classifier.wall_s, 2),
             "train_wall_s": round(time.time() - started, 1), "notes": _training_notes(source.labels, label_names)}
    return entry, classifier
