"""dpnb.evaluation.embeddings: frozen MiniLM embeddings, logistic regression on them, MAUVE; offline and small."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dpnb.evaluation.classifier import classification_metrics
from dpnb.evaluation.embeddings import (
    fit_logistic_regression,
    mauve_score,
    predict_embedding_classifier,
    sentence_embeddings,
    train_embedding_classifier,
)
from dpnb.models import load_encoder

GOOD = ["wonderful", "great", "brilliant", "superb", "delightful"]
BAD = ["terrible", "awful", "dreadful", "boring", "horrible"]
GOOD_UNSEEN = ["excellent", "fantastic", "marvellous", "lovely"]
BAD_UNSEEN = ["atrocious", "dull", "miserable", "abysmal"]
TRAIN_FORMS = ["The film was {}.", "{} acting and a {} story.", "What a {} movie, truly {}.", "Simply {}."]
TEST_FORMS = ["I found this picture {}.", "The cast was {} and the plot {}."]


def sentences(forms: list[str], words: list[str], n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        form = rng.choice(forms)
        out.append(form.format(*(rng.choice(words) for _ in range(form.count("{}")))).capitalize())
    return out


def labelled(forms: list[str], good: list[str], bad: list[str], n_per_label: int, seed: int):
    rng = random.Random(seed)
    texts = sentences(forms, bad, n_per_label, rng) + sentences(forms, good, n_per_label, rng)
    return texts, [0] * n_per_label + [1] * n_per_label


def reviews(n: int, seed: int) -> list[str]:
    """Short movie-review-like sentences from one generator (one distribution)."""
    rng = random.Random(seed)
    subjects = ["the film", "this movie", "the acting", "the plot", "the ending", "the director", "the cast",
                "the soundtrack", "the script", "the cinematography"]
    verbs = ["was", "felt", "seemed", "turned out"]
    adjectives = GOOD + BAD + GOOD_UNSEEN + BAD_UNSEEN + ["slow", "clever", "predictable", "touching", "long"]
    extras = ["", " I would watch it again.", " Not worth the ticket.", " My friends liked it.",
              " The second half drags.", " A classic of its genre."]
    return [f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(adjectives)}."
            f"{rng.choice(extras)}" for _ in range(n)]


def code_lines(n: int, seed: int) -> list[str]:
    """Lines of Python: clearly another distribution than reviews."""
    rng = random.Random(seed)
    names = ["x", "total", "idx", "buf", "result", "row", "count", "tmp"]
    forms = ["for {a} in range({k}): {b} += {a}", "{a} = [{b} * {k} for {b} in {a}]", "if {a} > {k}: return {b}",
             "def f_{k}({a}, {b}): return {a} ** {k}", "{a}.append({b}[{k}])", "import os; {a} = os.getenv('{b}')"]
    return [rng.choice(forms).format(a=rng.choice(names), b=rng.choice(names), k=rng.randint(0, 99))
            for _ in range(n)]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("minilm-l6")


# --------------------------------------------------------------------------- embeddings


def test_embeddings_shape_norm_order_and_identity(encoder):
    model, tokenizer = encoder
    texts = ["Short.", "A much longer review that goes on and on about the film and its many flaws.",
             "Short.", "Medium length, a few words.", ""]
    together = sentence_embeddings(texts, model, tokenizer, batch_size=2)
    assert together.shape == (5, 384) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(together[0], together[2])  # identical texts, same batch: identical rows
    # order restored: each row equals the text embedded on its own (padding changes only rounding)
    alone = np.stack([sentence_embeddings([t], model, tokenizer)[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-2)
    assert sentence_embeddings([], model, tokenizer).shape == (0, 384)


# --------------------------------------------------------------------------- classifier


def test_classifier_learns_sentiment_and_generalises_to_unseen_words(encoder):
    model, tokenizer = encoder
    train_texts, train_labels = labelled(TRAIN_FORMS, GOOD, BAD, 20, seed=0)
    test_texts, test_labels = labelled(TEST_FORMS, GOOD_UNSEEN, BAD_UNSEEN, 10, seed=1)
    classifier = train_embedding_classifier(train_texts, train_labels, model, tokenizer, seed=0)
    assert classifier.C in classifier.cv["Cs"] and classifier.cv["folds"] == 5
    predicted = predict_embedding_classifier(classifier, test_texts)
    assert predicted.dtype == np.int64 and predicted.shape == (20,)
    metrics = classification_metrics(test_labels, predicted, num_labels=2)
    assert metrics["accuracy"] >= 0.8, metrics  # chance is 0.5
    # the same seed gives the same model
    again = train_embedding_classifier(train_texts, train_labels, model, tokenizer, seed=0)
    assert again.C == classifier.C and np.array_equal(predict_embedding_classifier(again, test_texts), predicted)


def test_fit_logistic_regression_edge_cases():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 4))
    model, c, record = fit_logistic_regression(features, [1] * 6)
    assert model is None and c is None and "single label" in record["note"]
    model, c, record = fit_logistic_regression(features, [0, 1, 1, 1, 1, 1])
    assert model is not None and c == 1.0 and "not cross-validated" in record["note"]
    model, c, _ = fit_logistic_regression(features, [0, 1] * 3, C=3.0)
    assert c == 3.0 and model.C == 3.0


# --------------------------------------------------------------------------- MAUVE


@pytest.fixture(scope="module")
def mauve_features(encoder):
    model, tokenizer = encoder
    same = reviews(120, seed=3)
    return {
        "real": sentence_embeddings(same[:60], model, tokenizer),
        "same": sentence_embeddings(same[60:], model, tokenizer),
        "code": sentence_embeddings(code_lines(60, seed=4), model, tokenizer),
    }


def test_mauve_ranks_same_distribution_far_above_a_different_one(mauve_features):
    f = mauve_features
    same = mauve_score(f["real"], f["same"], seed=1)
    other = mauve_score(f["real"], f["code"], seed=1)
    assert same["mauve"] > other["mauve"] + 0.5, (same, other)
    assert same["frontier_integral"] < other["frontier_integral"]
    assert same["num_buckets"] == 6 and same["n_real"] == 60 and same["n_synthetic"] == 60
    assert same["scaling_factor"] == 5.0 and same["seed"] == 1


def test_mauve_is_deterministic_for_a_seed(mauve_features):
    f = mauve_features
    first = mauve_score(f["real"], f["same"], seed=7, num_buckets=4)
    assert mauve_score(f["real"], f["same"], seed=7, num_buckets=4) == first
    assert first["num_buckets"] == 4
