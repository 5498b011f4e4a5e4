"""Private Evolution (PE): DP synthetic text from a model that is never trained on the private data.

Lin et al. (2024) for images, Xie et al. (2024, Aug-PE) for text. A population of labelled synthetic
texts evolves towards the private data; the private data is only ever read through noisy vote counts.
For T iterations:

1. **Embed** every private record x_i (label y_i) and every synthetic text s_j (label c_j) with one frozen
   public encoder phi (MiniLM by default; unit-length mean-pooled embeddings, `dpnb.evaluation.embeddings`).
2. **Vote**: each private record gives 1/sqrt(k) to each of its k nearest texts of its own label
   (cosine similarity),

       H_j = sum_i [c_j = y_i and s_j in kNN_k(x_i)] / sqrt(k).

   Adding or removing one record changes k coordinates of H by 1/sqrt(k) each: H has L2 sensitivity
   exactly 1 (with k = 1, one whole vote). A record votes only within its own label, so the
   histograms of all labels together still have sensitivity 1.
3. **Noise**: H~ = H + N(0, sigma^2 I): the Gaussian mechanism with sensitivity 1 and noise multiplier sigma.
4. **Select**: per label, the `keep` texts of largest H~ (this reads H~ only: post-processing).
5. **Vary**: the language model writes one variation of each kept text: it is prompted with the label's
   prompt followed by the text's opening (its first `opening_fraction` of words) and continues it.
   The new population is the kept texts and their variations.

**Privacy.** Each iteration is one Gaussian mechanism of sensitivity 1 and noise multiplier sigma; the
population an iteration votes on is a function of earlier noisy histograms only (and of randomness
independent of the data), so the T iterations are an adaptive composition of T such mechanisms. In
Opacus's accountants a step at sample rate q = 1 is exactly this mechanism, so sigma is calibrated, and
epsilon computed, by the same code as DP-SGD's (`dpnb.privacy`), with history [(sigma, 1, T)]; `dpnb
verify` recomputes it with Opacus and with Google's dp-accounting. Neighbouring data sets differ by one
record (add/remove), as for DP-SGD. The released set is the last population: post-processing. When the
population comes from the DP fine-tuned model (start "finetuned"), the set depends on the private data
through both mechanisms and its epsilon is that of their composition (one accountant over both
histories), which `composed_history` gives.

What stays private: the records' embeddings and the histograms before noise (kept in `pe_private/`
to resume and to teach, never in a shareable file). The noisy histograms are DP and are shared
(`pe/votes.json`, written by the generate stage).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpnb.errors import require
from dpnb.privacy import accounting, guarantee
from dpnb.privacy.composition import Mechanism, calibrate_last, composed_record

GAUSSIAN_SAMPLE_RATE = 1.0  # one PE iteration in the accountants' terms: a Gaussian step over every record
VOTES = "Private Evolution votes"


@dataclass(frozen=True)
class EvolutionPlan:
    """The mechanism, fixed before any vote: T iterations of the Gaussian mechanism at noise multiplier sigma."""

    iterations: int
    nearest: int  # k: votes per record
    noise_multiplier: float | None  # sigma; None without DP (the histograms are used exactly)
    delta: float | None
    target_epsilon: float | None
    accountant: str

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history of the whole evolution: T Gaussian steps at q = 1."""
        if self.noise_multiplier is None:
            return []
        return [(self.noise_multiplier, GAUSSIAN_SAMPLE_RATE, self.iterations)]


def plan_evolution(iterations: int, nearest: int, target_epsilon: float | None, delta: float | None,
                   dataset_size: int, accountant: str = "prv", spent: Sequence[Mechanism] = ()) -> EvolutionPlan:
    """Calibrate sigma so that T iterations spend exactly the target epsilon at delta (None: no DP).

    With `spent` (the mechanisms the population already went through: DP fine-tuning, a DP labelling
    classifier), the target is the total of all of them, composed (`dpnb.privacy.composition.calibrate_last`).
    """
    require(iterations >= 1, f"Private Evolution needs at least one iteration, got {iterations}")
    require(nearest >= 1, f"each record votes for at least one text, got nearest = {nearest}")
    if target_epsilon is None:
        return EvolutionPlan(iterations, nearest, None, None, None, accountant)
    delta = accounting.default_delta(dataset_size) if delta is None else delta
    accounting.validate_delta(delta, dataset_size)
    if spent:
        votes = calibrate_last(target_epsilon, delta, spent, VOTES, GAUSSIAN_SAMPLE_RATE, iterations, accountant)
        sigma = votes.noise_multiplier
    else:
        sigma = accounting.calibrate_noise(target_epsilon, delta, GAUSSIAN_SAMPLE_RATE, iterations, accountant)
    return EvolutionPlan(iterations, nearest, sigma, delta, target_epsilon, accountant)


def privacy_record(plan: EvolutionPlan, spent: Sequence[Mechanism], dataset_size: int,
                   deterministic: bool) -> dict[str, Any]:
    """The PE set's privacy.json: its votes alone, or composed with what the population went through before."""
    common = {"mechanism": "Private Evolution: noisy nearest-neighbour votes of the private records",
              "dataset_size": dataset_size, "iterations": plan.iterations, "nearest": plan.nearest,
              "target_epsilon": plan.target_epsilon, **noise_note(deterministic)}
    if plan.noise_multiplier is None:
        return {"dp": False, "epsilon": None, "delta": None, "noise_multiplier": None, **common,
                "note": "exact votes (no noise) or a start model trained without DP: no guarantee"}
    votes = Mechanism(VOTES, plan.noise_multiplier, GAUSSIAN_SAMPLE_RATE, plan.iterations)
    if spent:
        return {**composed_record([*spent, votes], plan.delta, plan.accountant), **common,
                "composed_with": [m.name for m in spent]}
    fields = guarantee.privacy_fields(plan.noise_multiplier, GAUSSIAN_SAMPLE_RATE, plan.iterations, plan.delta,
                                    plan.accountant)
    return {**fields, "dp": True, **common}


def noise_note(deterministic: bool) -> dict[str, Any]:
    """Where the votes' noise came from, and whether that makes the set a DP release."""
    if deterministic:
        return {"deterministic": True, "dp_release": False,
                "release_note": "NOT a DP release: the votes' noise was drawn from the config seed (tests, teaching)"}
    return {"deterministic": False, "dp_release": True,
            "release_note": "the votes' noise drawn from a torch generator seeded with OS entropy (not saved)"}


def vote_histogram(private: np.ndarray, private_labels: Sequence[int], population: np.ndarray,
                   population_labels: Sequence[int], nearest: int) -> np.ndarray:
    """H: each private record's 1/sqrt(k) votes for its k nearest texts of its own label (L2 sensitivity 1).

    `private` and `population` are unit-length embeddings (rows), so the dot product is the cosine
    similarity. A label with fewer than k texts gets each of its records' votes on all of them.
    """
    private_labels = np.asarray(private_labels)
    population_labels = np.asarray(population_labels)
    require(len(private) == len(private_labels) and len(population) == len(population_labels),
            "every embedding needs a label")
    histogram = np.zeros(len(population), dtype=np.float64)
    for label in np.unique(private_labels):
        candidates = np.flatnonzero(population_labels == label)
        if not len(candidates):
            continue  # nobody to vote for: the records of this label add nothing (and so change nothing)
        k = min(nearest, len(candidates))
        similarity = private[private_labels == label] @ population[candidates].T
        chosen = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        np.add.at(histogram, candidates[chosen.ravel()], 1.0 / math.sqrt(nearest))
    return histogram


def add_noise(histogram: np.ndarray, noise_multiplier: float | None, generator: torch.Generator) -> np.ndarray:
    """H + N(0, sigma^2 I), drawn from `generator` (float64); H itself without DP."""
    if noise_multiplier is None:
        return histogram.copy()
    noise = torch.randn(len(histogram), generator=generator, dtype=torch.float64).numpy()
    return histogram + noise_multiplier * noise


def select(noisy: np.ndarray, labels: Sequence[int], keep: int | dict[int, int]) -> np.ndarray:
    """Per label, the indices of the `keep` (or `keep[label]`) texts of largest noisy count (ties: the earlier
    text), label by label."""
    labels = np.asarray(labels)
    kept = []
    for label in np.unique(labels):
        candidates = np.flatnonzero(labels == label)
        order = np.lexsort((candidates, -noisy[candidates]))  # largest count first, then position
        kept.append(candidates[order[: keep if isinstance(keep, int) else keep[int(label)]]])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def opening(text: str, fraction: float, min_words: int = 2) -> str:
    """The first `fraction` of a text's words (at least `min_words`): what its variation continues."""
    words = text.split()
    return " ".join(words[: max(min_words, int(len(words) * fraction))])


def composed_history(*histories: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """One accountant history for a set that several mechanisms made (DP-SGD, then PE): their concatenation."""
    return [tuple(step) for history in histories for step in history]  # type: ignore[misc]


# --------------------------------------------------------------------------- the loop


@dataclass
class Population:
    """Labelled synthetic texts: what Private Evolution evolves."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def parents_of_children(kept: Sequence[int], labels: Sequence[int], sizes: dict[int, int]) -> list[int]:
    """Which kept text each new text varies: per label, the kept texts in turn until the label is full again."""
    parents: list[int] = []
    for label, size in sizes.items():
        mine = [i for i in kept if labels[i] == label]
        parents += [mine[j % len(mine)] for j in range(size - len(mine))] if mine else []
    return parents


def iteration_log(iteration: int, noisy: np.ndarray, labels: Sequence[int], kept: np.ndarray,
                  children: int, dropped: int) -> dict[str, object]:
    """What one iteration did, from the noisy histogram only (shareable): vote mass and selection per label."""
    labels = np.asarray(labels)
    per_label: dict[str, dict[str, Any]] = {}
    for label in np.unique(labels):
        mine = noisy[labels == label]
        chosen = noisy[kept[labels[kept] == label]]
        per_label[str(label)] = {"texts": int(len(mine)), "noisy_votes": round(float(mine.sum()), 2),
                                 "kept": int(len(chosen)),
                                 "lowest_kept_votes": round(float(chosen.min()), 3) if len(chosen) else None}
    return {"iteration": iteration, "per_label": per_label, "varied": children, "dropped_variations": dropped}


def evolve_once(population: Population, private: np.ndarray, private_labels: Sequence[int], plan: EvolutionPlan,
                keep: dict[int, int], embed: Callable[[list[str]], np.ndarray],
                vary: Callable[[list[str], list[int]], list[str | None]] | None, generator: torch.Generator,
                iteration: int) -> tuple[Population, np.ndarray, np.ndarray, dict[str, object]]:
    """One iteration (module docstring, steps 1-5): the next population, the histogram before noise
    (private), the noisy histogram (the mechanism's output: shareable) and the iteration's log (shareable).

    `keep[label]` texts of each label are kept; with `vary`, each label is refilled to its former size with
    variations of its kept texts (None from `vary`: a degenerate variation, left out); the last iteration
    passes no `vary`, and its kept texts are the set.
    """
    clean = vote_histogram(private, private_labels, embed(population.texts), population.labels, plan.nearest)
    noisy = add_noise(clean, plan.noise_multiplier, generator)
    kept = select(noisy, population.labels, keep)
    born: list[tuple[str, int]] = []
    dropped = 0
    if vary is not None:
        sizes = {label: population.labels.count(label) for label in dict.fromkeys(population.labels)}
        parents = parents_of_children(kept.tolist(), population.labels, sizes)
        children = vary([population.texts[i] for i in parents], [population.labels[i] for i in parents])
        born = [(text, population.labels[p]) for text, p in zip(children, parents, strict=True) if text]
        dropped = len(children) - len(born)
    texts = [population.texts[i] for i in kept] + [text for text, _ in born]
    labels = [population.labels[i] for i in kept] + [label for _, label in born]
    log = iteration_log(iteration, noisy, population.labels, kept, len(born), dropped)
    return Population(texts, labels), clean, noisy, log
