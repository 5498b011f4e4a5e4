"""The direct DP classifier: logistic regression trained with DP-SGD on the private records themselves.

What a user would choose instead of synthetic data when the one task is known in advance: train the
evaluation's classifier on the private records directly, with differential privacy, at the same
(epsilon, delta) as the synthetic data, and test it on the same real test set.

**Model.** Logistic regression on frozen sentence embeddings (`dpnb.evaluation.embeddings`): for a record with
embedding e (unit length, a fixed function of the record alone, computed by a public encoder) and
label y among K labels, p(y | e) = softmax(W e + b), loss l = -log p(y | e). Its gradient is

    dl/dW = (p - onehot(y)) e^T,    dl/db = p - onehot(y),

of norm ||p - onehot(y)|| sqrt(||e||^2 + 1) <= sqrt(2) sqrt(2) = 2, so a clipping norm C below 2 bounds
every record's influence the way DP-SGD needs (and C >= 2 would clip nothing).

**DP-SGD** (Opacus, as `dpnb.training.dpsgd` states it for the language model): each step every record joins the
batch with probability q = 1 / ceil(N / B) (Poisson sampling), each record's gradient is clipped to C,
the sum gets N(0, sigma^2 C^2 I) noise and is divided by the expected batch size E = int(N q); Adam
steps on the result (post-processing). sigma is calibrated by `dpnb.privacy.accounting.calibrate_noise` so that
the accountant reports the target epsilon after exactly T = ceil(epochs / q) steps at this q; the
noise draws from OS entropy unless `deterministic` (tests: then it is not a DP release).

**The guarantee** covers (W, b) and everything computed from them alone, the test predictions
included (post-processing): `privacy_record` states it in the fields of privacy.json, which
`dpnb verify` recomputes with Opacus and with Google's dp-accounting. `write_dp_classifier` keeps
(W, b) and privacy.json in the run's dp_classifier/ (both shareable).
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus import PrivacyEngine

from dpnb.errors import require
from dpnb.io import atomic_directory, write_json_atomic
from dpnb.models import quiet_transformers
from dpnb.privacy import accounting, guarantee

if TYPE_CHECKING:
    from dpnb.evaluation.embeddings import Embedder


@dataclass(frozen=True)
class DPClassifierSettings:
    """The recipe (chosen on a validation split of IMDb training reviews, never on the test set)."""

    target_epsilon: float
    delta: float
    epochs: float = 30.0
    batch_size: int = 256  # expected records per step: B in q = 1 / ceil(N / B)
    lr: float = 0.05  # Adam
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    seed: int = 0  # the weights' initialisation (zeros here) and, when deterministic, the noise and batches
    deterministic: bool = False


@dataclass
class DPClassifier:
    """The trained (W, b) and the guarantee they carry."""

    weight: np.ndarray  # [K, d]
    bias: np.ndarray  # [K]
    privacy: dict[str, Any]

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """The most likely label of each row of embeddings, int64."""
        return np.argmax(features @ self.weight.T + self.bias, axis=1).astype(np.int64)


def train_dp_classifier(features: np.ndarray, labels: Sequence[int], num_labels: int,
                        settings: DPClassifierSettings) -> DPClassifier:
    """Logistic regression on `features` (one row per private record) trained with DP-SGD (module docstring)."""
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    n = len(y)
    require(n == len(x) and n > 0, f"{len(x)} embeddings but {n} labels; the direct DP classifier needs both")
    batch = min(settings.batch_size, n)
    sample_rate = accounting.poisson_sample_rate(n, batch)
    steps = accounting.planned_steps(n, batch, settings.epochs)
    accounting.validate_delta(settings.delta, n)
    sigma = accounting.calibrate_noise(settings.target_epsilon, settings.delta, sample_rate, steps, settings.accountant)
    model = torch.nn.Linear(x.shape[1], num_labels)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    seeds = ((settings.seed, settings.seed + 1) if settings.deterministic
             else (secrets.randbits(63), secrets.randbits(63)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch,
                                         generator=torch.Generator().manual_seed(seeds[0]))
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's secure-RNG hint; the noise source is stated in the record
        engine = PrivacyEngine(accountant=settings.accountant)
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=settings.max_grad_norm, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seeds[1]))
    require(abs(loader.sample_rate - sample_rate) < 1e-12, "Opacus samples at another rate than the plan")
    taken = 0
    with quiet_transformers():  # Opacus's hook warnings on a module whose inputs need no gradient
        taken = _train_steps(model, optimizer, loader, steps)
    counted = sum(count for _, _, count in accounting.accountant_history(engine.accountant))
    require(counted == steps == taken, f"the accountant counted {counted} steps, the loop took {taken} of {steps}")
    record = privacy_record(settings, n, batch, sample_rate, steps, sigma)
    inner = model._module
    return DPClassifier(inner.weight.detach().numpy().copy(), inner.bias.detach().numpy().copy(), record)


def _train_steps(model: torch.nn.Module, optimizer: Any, loader: Any, steps: int) -> int:
    """`steps` DP-SGD steps over Poisson batches of (embedding, label); returns the steps taken."""
    taken = 0
    while taken < steps:
        for xb, yb in loader:
            if taken == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(yb):
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
            else:  # an empty Poisson batch is still a step: pure noise, and the accountant counts it
                for p in model.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape))
            optimizer.step()
            taken += 1
    return taken


def privacy_record(settings: DPClassifierSettings, n: int, batch: int, sample_rate: float, steps: int,
                   sigma: float) -> dict[str, Any]:
    """The classifier's guarantee in privacy.json's fields (recomputable by `dpnb verify`)."""
    noise = ({"deterministic": True, "noise_seeded_from": "the config seed", "dp_release": False,
              "release_note": "NOT a DP release: noise and batches drawn from the config seed (tests, teaching)"}
             if settings.deterministic else
             {"deterministic": False, "noise_seeded_from": "64 bits of OS entropy (not saved)", "dp_release": True})
    return {
        **guarantee.privacy_fields(sigma, sample_rate, steps, settings.delta, settings.accountant),
        "dp": True, "mechanism": "DP-SGD on logistic regression over frozen sentence embeddings",
        "dataset_size": n, "logical_batch_size": batch, "expected_batch_size": n * sample_rate,
        "divisor": int(n * sample_rate), "epochs": settings.epochs, "max_grad_norm": settings.max_grad_norm,
        "target_epsilon": settings.target_epsilon, "lr": settings.lr, **noise,
    }


def write_dp_classifier(directory: Path, trained: DPClassifier, embedder: Embedder) -> None:
    """dp_classifier/: weights.json (W, b, the encoder that makes its inputs) and privacy.json, atomically."""
    with atomic_directory(directory) as staging:
        write_json_atomic(staging / "weights.json", {
            "model": "p(y | e) = softmax(W e + b), e the unit-length mean-pooled embedding",
            "encoder": embedder.name, "max_length": embedder.max_length,
            "W": trained.weight.tolist(), "b": trained.bias.tolist()})
        write_json_atomic(staging / "privacy.json", trained.privacy)
