"""The teaching notebook's toy DP-SGD (dpnb.lessons): its gradients, its step, and the ROC band of (eps, delta)-DP.

The step is checked against Opacus's DPOptimizer on the same linear model, the gradients against
torch's autograd, the band against the ROC curve of randomised response (the tightest eps-DP test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from dpnb import lessons
from dpnb.errors import DpnbError


def data(n: int = 40, dim: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return lessons.two_gaussians(n, dim, separation=2.0, seed=seed)


def test_per_record_gradients_and_losses_match_autograd():
    x, y = data()
    w = np.array([0.3, -1.2, 0.8])
    weights = torch.tensor(w, requires_grad=True)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(x) @ weights, torch.tensor(y, dtype=torch.float64), reduction="none")
    expected = np.stack([torch.autograd.grad(loss, weights, retain_graph=True)[0].numpy() for loss in losses])
    np.testing.assert_allclose(lessons.per_record_gradients(w, x, y), expected, atol=1e-12)
    np.testing.assert_allclose(lessons.record_losses(w, x, y), losses.detach().numpy(), atol=1e-12)


def test_clipping_bounds_every_norm_and_leaves_short_gradients_alone():
    gradients = np.array([[3.0, 4.0], [0.1, 0.2], [0.0, 0.0]])
    clipped = lessons.clip_gradients(gradients, 1.0)
    assert np.all(np.linalg.norm(clipped, axis=1) <= 1.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(clipped[1:], gradients[1:], atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_one_noiseless_step_is_opacus_dp_optimizer_step():
    x, y = data(n=16)
    lr, clip = 0.7, 0.5
    ours = lessons.train_logistic(x, y, steps=1, lr=lr, sample_rate=1.0, max_grad_norm=clip)

    model = GradSampleModule(torch.nn.Linear(x.shape[1], 1, bias=False).double())
    torch.nn.init.zeros_(model._module.weight)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=len(y))
    logits = model(torch.tensor(x)).squeeze(1)  # Opacus's default: a mean loss, per-record gradients rescaled
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(y, dtype=torch.float64)).backward()
    optimizer.step()
    np.testing.assert_allclose(ours, model._module.weight.detach().numpy()[0], atol=1e-9)


def test_noise_on_one_step_has_std_sigma_c_over_expected_batch():
    x, y = data(n=16)
    lr, clip, sigma, q = 1.0, 0.5, 2.0, 1.0  # q = 1: every record in the batch, so only the noise varies
    clean = lessons.train_logistic(x, y, steps=1, lr=lr, sample_rate=q, max_grad_norm=clip)
    noisy = np.stack([lessons.train_logistic(x, y, steps=1, lr=lr, sample_rate=q, max_grad_norm=clip,
                                             noise_multiplier=sigma, seed=k) for k in range(3000)])
    measured = (noisy - clean).std()
    assert measured == pytest.approx(lr * sigma * clip / (len(y) * q), rel=0.05)


def test_noise_without_clipping_is_refused():
    x, y = data()
    with pytest.raises(DpnbError, match="max_grad_norm"):
        lessons.train_logistic(x, y, steps=1, lr=1.0, sample_rate=0.5, noise_multiplier=1.0)


def test_roc_band_is_the_diagonal_without_privacy_loss_and_symmetric():
    fpr = np.linspace(0, 1, 101)
    lower, upper = lessons.roc_region(fpr, 0.0, 0.0)
    np.testing.assert_allclose(lower, fpr, atol=1e-12)
    np.testing.assert_allclose(upper, fpr, atol=1e-12)
    lower, upper = lessons.roc_region(fpr, 1.5, 1e-3)
    assert np.all((lower <= fpr) & (fpr <= upper)) and np.all((lower >= 0) & (upper <= 1))
    np.testing.assert_allclose(upper, 1 - lessons.roc_region(1 - fpr, 1.5, 1e-3)[0], atol=1e-12)


def test_roc_band_touches_randomised_response():
    # randomised response (tell the truth with probability e^eps / (1 + e^eps)) is eps-DP and meets the bound
    eps = 1.2
    truthful = math.exp(eps) / (1 + math.exp(eps))
    _, upper = lessons.roc_region(np.array([1 - truthful]), eps, 0.0)
    assert upper[0] == pytest.approx(truthful)
    delta = 1e-3  # below the corner the bound is e^eps FPR + delta, above it 1 - e^-eps (1 - delta - FPR)
    _, upper = lessons.roc_region(np.array([0.05, 0.9]), eps, delta)
    np.testing.assert_allclose(upper, [math.exp(eps) * 0.05 + delta, 1 - math.exp(-eps) * (1 - delta - 0.9)])
