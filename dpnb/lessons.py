"""The toy model of the teaching notebook (00): DP-SGD on logistic regression, small enough to draw.

Notebook 00 shows DP-SGD with Opacus on a small network; here the same algorithm is written out
for a model whose per-record gradients have a closed form, so that a 2-D gradient can be
drawn as an arrow and hundreds of short trainings run in a second.

The model
---------
Records `(x_i, y_i)` with `x_i` in R^d and `y_i` in {0, 1}; weights `w` in R^d (no bias: the two
classes of `two_gaussians` are symmetric about the origin). The model says `p_i = s(w . x_i)` with
`s(z) = 1 / (1 + e^-z)`, and a record's loss and gradient are

    l_i(w) = -y_i log p_i - (1 - y_i) log(1 - p_i),        g_i(w) = (p_i - y_i) x_i.

One DP-SGD step (`train_logistic`)
----------------------------------
1. Poisson sampling: each of the `N` records joins the batch `S` independently with probability `q`.
2. Clipping: `g_i <- g_i min(1, C / ||g_i||)`, so adding or removing one record changes the sum of
   clipped gradients by a vector of norm at most `C` (the sensitivity).
3. Noise: `g = (sum_{i in S} g_i + N(0, sigma^2 C^2 I_d)) / (N q)`, divided by the *expected* batch size.
4. `w <- w - lr g`.

Without clipping and noise (`max_grad_norm=None`, `noise_multiplier=0`) the same loop is ordinary
minibatch SGD (still divided by `N q`): the non-private reference. Epsilon is not computed here:
it depends only on `(sigma, q, steps, delta)` and comes from `dpnb.privacy`'s accountants.

What an (epsilon, delta) guarantee allows an attacker (`roc_region`)
--------------------------------------------------------------------
A membership test on one record is a hypothesis test between two neighbouring data sets. Under
(epsilon, delta)-DP, every test's true- and false-positive rates satisfy (Kairouz, Oh, Viswanath 2015)

    TPR <= e^eps FPR + delta,           1 - FPR <= e^eps (1 - TPR) + delta,

and, with the two data sets swapped, the same with TPR and FPR exchanged. So every ROC curve lies
between `lower(FPR)` and `upper(FPR)`:

    upper = min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)),
    lower = max(0, e^-eps (FPR - delta), 1 - delta - e^eps (1 - FPR)).
"""

from __future__ import annotations

import numpy as np

from dpnb.errors import require


def two_gaussians(n: int, dim: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` records: label 0 or 1 with probability 1/2, features N(+-mu, I_dim) with ||mu|| = separation / 2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    direction = np.ones(dim) / np.sqrt(dim)
    features = rng.standard_normal((n, dim)) + np.outer(2 * labels - 1, direction) * separation / 2
    return features, labels


def probabilities(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`s(w . x_i)` for every record, computed without overflow."""
    z = x @ w
    return np.exp(-np.logaddexp(0.0, -z))


def record_losses(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each record's cross-entropy loss `l_i(w)` (nats), stable for large |w . x_i|."""
    z = x @ w
    return np.logaddexp(0.0, z) - y * z


def per_record_gradients(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`g_i = (p_i - y_i) x_i`, one row per record."""
    return (probabilities(w, x) - y)[:, None] * x


def clip_gradients(gradients: np.ndarray, max_grad_norm: float) -> np.ndarray:
    """Each row scaled to norm at most C: `g_i min(1, C / ||g_i||)` (Opacus adds 1e-6 to the norm; so do we)."""
    norms = np.linalg.norm(gradients, axis=1)
    return gradients * np.minimum(1.0, max_grad_norm / (norms + 1e-6))[:, None]


def accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of records whose predicted label (`w . x_i > 0`) is right."""
    return float(np.mean((x @ w > 0) == (y == 1)))


def train_logistic(x: np.ndarray, y: np.ndarray, *, steps: int, lr: float, sample_rate: float,
                   max_grad_norm: float | None = None, noise_multiplier: float = 0.0, seed: int = 0) -> np.ndarray:
    """Weights after `steps` steps of (DP-)SGD from w = 0, as in the module docstring.

    DP-SGD needs `max_grad_norm` (C); `noise_multiplier` (sigma) then sets the noise `sigma C`. The
    batches and the noise are drawn from `seed`: a teaching run, not a private release.
    """
    require(noise_multiplier == 0 or max_grad_norm is not None,
            "noise without clipping protects nothing: give max_grad_norm (C) together with noise_multiplier")
    require(0 < sample_rate <= 1, f"the sample rate must be in (0, 1], got {sample_rate!r}")
    rng = np.random.default_rng(seed)
    n, dim = x.shape
    w = np.zeros(dim)
    for _ in range(steps):
        batch = rng.random(n) < sample_rate
        gradients = per_record_gradients(w, x[batch], y[batch])
        if max_grad_norm is not None:
            gradients = clip_gradients(gradients, max_grad_norm)
        total = gradients.sum(axis=0)
        if noise_multiplier > 0:
            total = total + rng.normal(0.0, noise_multiplier * max_grad_norm, size=dim)
        w = w - lr * total / (n * sample_rate)
    return w


def roc_region(fpr: np.ndarray, epsilon: float, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest TPR that (epsilon, delta)-DP allows any membership test at each FPR."""
    fpr = np.asarray(fpr, dtype=float)
    grow, shrink = np.exp(epsilon), np.exp(-epsilon)
    upper = np.minimum.reduce([np.ones_like(fpr), grow * fpr + delta, 1 - shrink * (1 - delta - fpr)])
    lower = np.maximum.reduce([np.zeros_like(fpr), shrink * (fpr - delta), 1 - delta - grow * (1 - fpr)])
    return lower, upper
