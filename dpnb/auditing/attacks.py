"""Membership attacks and the one-run audit of epsilon: the maths stage 06 applies to the scores.

**Scores.** A record's loss is the mean negative log-likelihood (nats per token) of a span of its
tokens (`span_losses`): a canary's random words, or a review after its prompt. Higher scores mean
"more likely trained on": the loss score is -loss_finetuned, the calibrated score (a reference-model
attack) is loss_base - loss_finetuned, which removes how predictable a text was before fine-tuning.

**One-run audit** (Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training Run").
Each of m canaries is inserted independently with probability 1/2. After training, the auditor
guesses r of them from the model alone (`guess_membership`): "inserted" for the r // 2 highest
scores, "not inserted" for the r - r // 2 lowest, abstaining on the rest, ties broken at random.
If training is eps-DP, the number W of correct guesses is stochastically dominated by
X ~ Binomial(r, q) with q = e^eps / (1 + e^eps) (eps-randomised response), so seeing v correct has
p-value

    p(eps)        = P[X >= v]                                                  (delta = 0)
    p(eps, delta) = P[X >= v] + 2 m delta max_{i = 1..v} P[v - i <= X < v] / i  ((eps, delta)-DP)

(the second is the p-value of their Algorithm 2 for approximate DP; both capped at 1;
`one_run_p_value`). The lower bound at confidence c is the largest epsilon this rejects,
sup{eps : p(eps, delta) <= 1 - c}, or 0 when eps = 0 is not rejected (`epsilon_lower_bound`): a
scan of 401 points on [0, eps_cap] and a bisection of the last rejected point to 1e-4, never
reporting an unchecked value. No eps above eps_cap = logit((1 - c)^(1/r)) can be rejected, since
there even r correct guesses out of r have probability q^r > 1 - c. Without a fixed number of
guesses, r = 10%, 20%, 50% and 100% of m are tried (`guess_counts`), each at confidence
1 - (1 - c) / (number of counts) (Bonferroni), and the largest bound is reported (`one_run_audit`).

**Ceiling.** Even a perfect attacker, right on every guess, proves only so much: with v = r and
delta = 0 the p-value is q^r, so the bound is logit(s^(1/r)), s the per-test significance, about
ln(r / ln(1/s)). The largest such value over the guess counts tried is the audit's ceiling
(`audit_ceiling`): 2.65 with 64 canaries and 5.43 with 1,000 at 95% confidence. It grows only with
the log of the canary count: certifying eps needs about ln(1/s) e^eps canaries (`canaries_to_certify`;
about 13,000 for eps = 8). A claim above the ceiling cannot be contradicted by this audit, whatever
the model does; delta > 0 lowers the ceiling further (delta = 1 makes it 0).

**Group privacy.** A canary inserted k times is a group of k records: (eps, delta)-DP per record
gives (k eps, k e^((k - 1) eps) delta)-DP for the group (`group_privacy`), the claim the audit tests.
That claim is far weaker than the per-record one (its delta often reaches 1: vacuous), so canaries
are inserted once by default. A lower bound above the claimed epsilon proves the claim wrong (at
confidence c); it can only happen when the claim is below the ceiling.

**Membership inference** on real reviews: ROC AUC and the TPR at low FPR of a score (`roc_summary`).
**Synthetic-data attack**: an attacker who sees only released text fits an n-gram model on it
(`NgramModel`) and scores each canary by the log-probability of its random words
(`synthetic_attack`). Exposure of canaries is in `dpnb.auditing.canaries`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from dpnb.auditing.canaries import canary_text_ids, exposure, exposure_extrapolated
from dpnb.errors import DpnbError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MIA_FPRS = (0.01, 0.001)  # false-positive rates at which membership attacks report their TPR
# Records to score, grouped by name: each group's token ids and the [start, end) span whose loss is its score.
Groups = dict[str, tuple[list[list[int]], list[tuple[int, int]]]]


# =========================================================================== one-run epsilon audit


def tie_break_stream(seed: int) -> np.random.Generator:
    """The guesses' own random stream: the first child of the seed's SeedSequence.

    The audit draws its canaries and their coins from `np.random.default_rng(seed)`; a spawned child
    is a stream independent of that one, so the tie-breaks carry nothing about the coins.
    """
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])


def guess_membership(scores: Sequence[float], n_guesses: int, seed: int = 0) -> np.ndarray:
    """Guesses for the one-run audit: +1 "inserted", -1 "not inserted", 0 abstain.

    The n_guesses // 2 highest scores are guessed +1 and the n_guesses - n_guesses // 2 lowest -1;
    the rest abstain (Steinke et al.'s k+ / k- scheme with k+ = k-). Ties are broken at random, never
    by index, so record order cannot leak into the guesses, by `tie_break_stream(seed)`: seeded, and
    independent of the stream the coins come from.
    """
    scores = np.asarray(scores, dtype=float)
    if not 0 < n_guesses <= scores.size:
        raise DpnbError(f"audit.n_guesses = {n_guesses} must be between 1 and the number of canaries "
                        f"({scores.size})")
    tie_break = tie_break_stream(seed).random(scores.size)
    order = np.lexsort((tie_break, scores))  # ascending by score, ties in random order
    guesses = np.zeros(scores.size, dtype=int)
    n_in = n_guesses // 2
    guesses[order[: n_guesses - n_in]] = -1
    if n_in:
        guesses[order[-n_in:]] = 1
    return guesses


def one_run_p_value(n_canaries: int, n_guesses: int, n_correct: int, epsilon: float,
                    delta: float = 0.0) -> float:
    """Probability of at least `n_correct` correct guesses out of `n_guesses` if training is (eps, delta)-DP.

    Steinke, Nasr and Jagielski (2023): when each of m canaries is included independently with
    probability 1/2 and the guesses depend only on the trained model, then for an eps-DP training
    algorithm the number of correct guesses W is stochastically dominated by Binomial(r, q) with
    q = e^eps / (1 + e^eps) (eps-randomised response), so P[W >= v] <= P[Binomial(r, q) >= v].
    With delta > 0 their bound for approximate DP (the p-value of their Algorithm 2) adds a term:

        P[W >= v] <= P[X >= v] + 2 m delta * max_{i = 1..v} P[v - i <= X < v] / i,   X ~ Binomial(r, q).
    """
    m, r, v = n_canaries, n_guesses, n_correct
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[X >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = np.arange(1, v + 1)
    # P[v - i <= X < v] = P[X >= v - i] - P[X >= v], for i = 1..v
    band = stats.binom.sf(v - below - 1, r, q) - tail
    return min(tail + 2 * m * delta * float(np.max(band / below)), 1.0)


def epsilon_lower_bound(n_canaries: int, n_guesses: int, n_correct: int, confidence: float = 0.95,
                        delta: float = 0.0, resolution: float = 1e-4) -> float:
    """The largest epsilon that `n_correct` of `n_guesses` correct guesses rule out at `confidence`.

    Returns sup{eps : p(eps) <= 1 - confidence} with p = `one_run_p_value`, or 0 when even eps = 0
    is not rejected. Any eps below the bound is rejected too, because (eps, delta)-DP implies
    (eps', delta)-DP for every eps' >= eps. p is increasing in eps when delta = 0; with delta > 0 the
    extra term need not be monotone, so the search scans a grid and then bisects the last
    crossing, keeping only points where p <= 1 - confidence was checked (the result is never above
    a rejected value).

    No eps above logit((1 - confidence)^(1/r)) can be rejected: there even all r guesses correct has
    probability q^r > 1 - confidence. That is the most a run with r guesses can show.
    """
    significance = 1.0 - confidence
    if n_guesses == 0 or one_run_p_value(n_canaries, n_guesses, n_correct, 0.0, delta) > significance:
        return 0.0
    q_cap = significance ** (1.0 / n_guesses)
    eps_cap = math.log(q_cap / (1.0 - q_cap)) + 1e-9 if q_cap < 1 else 50.0
    grid = np.linspace(0.0, eps_cap, 401)
    rejected = [one_run_p_value(n_canaries, n_guesses, n_correct, e, delta) <= significance for e in grid]
    last = max(i for i, ok in enumerate(rejected) if ok)
    if last == len(grid) - 1:
        return float(grid[last])
    low, high = float(grid[last]), float(grid[last + 1])
    while high - low > resolution:
        mid = (low + high) / 2
        if one_run_p_value(n_canaries, n_guesses, n_correct, mid, delta) <= significance:
            low = mid
        else:
            high = mid
    return low


def guess_counts(n_canaries: int) -> list[int]:
    """Guess counts tried when audit.n_guesses is not set: 10%, 20%, 50% and all of the canaries.

    Trying several and keeping the best is a multiple test; `one_run_audit` pays for it with a
    Bonferroni correction (each count is tested at (1 - confidence) / number of counts).
    """
    counts = sorted({max(2, min(n_canaries, round(f * n_canaries))) for f in (0.1, 0.2, 0.5, 1.0)})
    return [k for k in counts if k <= n_canaries]


def per_test_confidence(confidence: float, n_tests: int) -> float:
    """Bonferroni: each of `n_tests` tests at 1 - (1 - confidence) / n_tests, so all hold at `confidence`."""
    return 1.0 - (1.0 - confidence) / n_tests


def audit_ceiling(n_canaries: int, *, n_guesses: int | None = None, confidence: float = 0.95,
                  delta: float = 0.0) -> float:
    """The largest epsilon the one-run audit could certify with `n_canaries`: every guess right.

    The maximum over the guess counts tried (`n_guesses`, or each of `guess_counts`) of
    `epsilon_lower_bound(m, r, r, c', delta)`, with c' the Bonferroni-corrected confidence that
    `one_run_audit` uses, so no outcome of the audit can report a larger bound. With delta = 0 the
    p-value of r correct guesses out of r is q^r, q = e^eps / (1 + e^eps), so the bound is

        logit(s^(1/r)) = ln(s^(1/r) / (1 - s^(1/r))) ~ ln(r / ln(1/s)),   s = 1 - c',

    largest at r = m: 2.65 for m = 64 and 5.43 for m = 1,000 at 95% confidence (4 counts, s = 0.0125).
    A delta > 0 adds 2 m delta max_i P[r - i <= X < r] / i to the p-value, which grows with m: the
    ceiling is lower, peaks at some m and then falls, and is 0 at delta = 1. A claimed epsilon above
    the ceiling cannot be contradicted by the audit, whatever the model does. It bounds what the audit
    reports from above: with unbalanced coins even perfect scores get some of the r = m guesses wrong.
    """
    counts = [n_guesses] if n_guesses is not None else guess_counts(n_canaries)
    per_test = per_test_confidence(confidence, len(counts))
    return max(epsilon_lower_bound(n_canaries, k, k, per_test, delta) for k in counts)


def canaries_to_certify(epsilon: float, *, confidence: float = 0.95, delta: float = 0.0,
                        max_canaries: int = 1_000_000) -> int | None:
    """The fewest canaries whose `audit_ceiling` (guess counts of `guess_counts`) reaches `epsilon`.

    With delta = 0 and the 4 guess counts of m >= 13, the ceiling reaches eps when
    s^(1/m) >= q, i.e. m >= ln(1/s) / ln(1 + e^-eps) ~ ln(1/s) e^eps with s = (1 - confidence) / 4:
    about 13,000 canaries for eps = 8 at 95% confidence. The search starts there and ends on the
    exact count of `audit_ceiling`. With delta > 0 the ceiling is never higher than at delta = 0 (so
    the count is at least the delta-0 one) and it rises to a peak and then falls as m grows: the
    search doubles m from the delta-0 count and gives up (None) once the ceiling stops rising, or
    past `max_canaries`. Slow for large counts when delta > 0 (the p-value sums over every count).
    None: no count up to `max_canaries` certifies `epsilon`.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")

    def ceiling(m: int) -> float:
        return audit_ceiling(m, confidence=confidence, delta=delta)

    significance = (1.0 - confidence) / 4
    estimate = math.ceil(math.log(1.0 / significance) / math.log1p(math.exp(-epsilon)))
    if estimate > max_canaries:
        return None
    high = max(2, estimate)
    if ceiling(high) >= epsilon:  # walk down to a count that falls short
        low, step = high - 1, 1
        while low >= 2 and ceiling(low) >= epsilon:
            high, step = low, step * 2
            low = max(1, high - step)  # 1: fewer than 2 canaries certify nothing
    else:  # walk up, doubling, to a count that reaches it
        low, previous = high, ceiling(high)
        while True:
            high = min(2 * low, max_canaries)
            reached = ceiling(high)
            if reached >= epsilon:
                break
            if high == max_canaries or reached <= previous:  # the cap, or past the peak (delta > 0)
                return None
            low, previous = high, reached
    while high - low > 1:  # ceiling(low) < epsilon <= ceiling(high)
        mid = (low + high) // 2
        if ceiling(mid) >= epsilon:
            high = mid
        else:
            low = mid
    return high


def one_run_audit(scores: Sequence[float], inserted: Sequence[bool], *, n_guesses: int | None = None,
                  confidence: float = 0.95, delta: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """The one-run audit on canary scores (higher: more likely inserted) and the true coin flips.

    With `n_guesses` set, that many guesses are made; otherwise every count of `guess_counts` is
    tried with a Bonferroni-corrected confidence and the largest bound is reported. `delta` is the
    delta of the claim being tested (the accountant's, or its group-privacy version for repeats; 0
    without a claim). The result holds the `ceiling` too: the bound had every guess been right.
    """
    scores = np.asarray(scores, dtype=float)
    truth = np.where(np.asarray(inserted, dtype=bool), 1, -1)
    m = scores.size
    counts = [n_guesses] if n_guesses is not None else guess_counts(m)
    per_test = per_test_confidence(confidence, len(counts))
    trials = []
    for k in counts:
        guesses = guess_membership(scores, k, seed=seed)
        correct = int(np.sum(guesses * truth == 1))
        trials.append({"n_guesses": k, "n_correct": correct,
                       "epsilon_lower_bound": epsilon_lower_bound(m, k, correct, per_test, delta)})
    best = max(trials, key=lambda t: (t["epsilon_lower_bound"], t["n_guesses"]))  # ties: the most guesses
    return {"epsilon_lower_bound": best["epsilon_lower_bound"], "n_guesses": best["n_guesses"],
            "n_correct": best["n_correct"], "n_canaries": m, "confidence": confidence,
            "confidence_per_test": per_test, "delta": delta,
            "ceiling": audit_ceiling(m, n_guesses=n_guesses, confidence=confidence, delta=delta), "trials": trials}


def group_privacy(epsilon: float, delta: float, group_size: int) -> tuple[float, float]:
    """(eps, delta)-DP for one record gives (k eps, k e^((k-1) eps) delta)-DP for k records.

    A canary repeated k times is a group of k records; this is the claim the audit can test for it
    (Dwork and Roth 2014, Theorem 2.2, extended to delta > 0). Delta is capped at 1.
    """
    k = group_size
    return k * epsilon, min(1.0, k * math.exp((k - 1) * epsilon) * delta)


# =========================================================================== membership metrics


def roc_summary(member_scores: Sequence[float], non_member_scores: Sequence[float],
                fprs: Sequence[float] = MIA_FPRS) -> dict[str, Any]:
    """ROC AUC and the best TPR at each FPR <= target, for scores where higher means "member".

    TPR at FPR f is the largest true-positive rate of any threshold whose false-positive rate is at
    most f (sklearn's ROC points, intermediate ones kept). With n non-members, an FPR below 1/n can
    only be met with no false positive at all, so tiny FPRs need many non-members to be meaningful.
    """
    members = np.asarray(member_scores, dtype=float)
    others = np.asarray(non_member_scores, dtype=float)
    if members.size == 0 or others.size == 0:
        raise DpnbError("a membership attack needs members and non-members; raise audit.n_mia / n_canaries")
    truth = np.r_[np.ones(members.size), np.zeros(others.size)]
    scores = np.r_[members, others]
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    return {
        "auc": float(roc_auc_score(truth, scores)),
        "tpr_at_fpr": {str(f): float(np.max(tpr[fpr <= f])) for f in fprs},
        "n_members": int(members.size),
        "n_non_members": int(others.size),
        "curve": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


# =========================================================================== synthetic-data attack


class NgramModel:
    """An order-n token model with add-k smoothing, fitted on released (synthetic) text.

        P(w | c) = (count(c, w) + k) / (count(c) + k V)

    where c is the n - 1 tokens before w (sequences are padded on the left with a start symbol) and
    V the vocabulary size. It is what an attacker who sees only the synthetic data can build.
    """

    START = -1  # padding symbol before the first token; never a real token id

    def __init__(self, order: int, vocab_size: int, smoothing: float):
        if order < 1 or vocab_size < 1 or smoothing <= 0:
            raise DpnbError("n-gram model needs order >= 1, vocab_size >= 1 and smoothing > 0 "
                            f"(got {order}, {vocab_size}, {smoothing})")
        self.order, self.vocab_size, self.smoothing = order, vocab_size, smoothing
        self.context_counts: Counter[tuple[int, ...]] = Counter()
        self.ngram_counts: Counter[tuple[int, ...]] = Counter()

    def _ngrams(self, tokens: Sequence[int]) -> Iterable[tuple[int, ...]]:
        padded = [self.START] * (self.order - 1) + list(tokens)
        for end in range(self.order - 1, len(padded)):
            yield tuple(padded[end - self.order + 1: end + 1])

    def fit(self, sequences: Iterable[Sequence[int]]) -> NgramModel:
        for tokens in sequences:
            for gram in self._ngrams(tokens):
                self.ngram_counts[gram] += 1
                self.context_counts[gram[:-1]] += 1
        return self

    def token_log_probs(self, tokens: Sequence[int]) -> np.ndarray:
        """Natural log-probability of each token given the n - 1 before it."""
        k, kv = self.smoothing, self.smoothing * self.vocab_size
        return np.array([
            math.log((self.ngram_counts[g] + k) / (self.context_counts[g[:-1]] + kv)) for g in self._ngrams(tokens)
        ])

    def span_log_prob(self, tokens: Sequence[int], start: int, end: int | None = None) -> float:
        """Mean log-probability of tokens[start:end], each in the context of all tokens before it."""
        span = self.token_log_probs(tokens)[start:end]
        return float(np.mean(span)) if span.size else float("nan")


# =========================================================================== scores of one model


def token_losses(model: PreTrainedModel, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                 device: str = "cpu") -> list[np.ndarray]:
    """Per-token negative log-likelihoods: element t - 1 of a sequence's array is -log p(x_t | x_<t).

    Sequences are sorted by length and right-padded in batches (padding is masked and never scored).
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    losses: list[np.ndarray] = [np.empty(0)] * len(sequences)
    model.eval()
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            batch = order[first: first + batch_size]
            width = max(len(sequences[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
                mask[row, : len(sequences[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            for row, i in enumerate(batch):
                losses[i] = nll[row, : len(sequences[i]) - 1].cpu().numpy()
    return losses


def span_losses(model: PreTrainedModel, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                *, batch_size: int = 16, device: str = "cpu") -> np.ndarray:
    """Mean loss (nats per token) of the tokens at positions [start, end) of each sequence."""
    per_token = token_losses(model, sequences, batch_size=batch_size, device=device)
    return np.array([float(np.mean(nll[start - 1: end - 1])) for nll, (start, end) in zip(per_token, spans,
                                                                                               strict=True)])


def membership_scores(finetuned_loss: np.ndarray, base_loss: np.ndarray | None, kind: str) -> np.ndarray:
    """Higher means "more likely trained on": -loss, or base loss - fine-tuned loss ("calibrated").

    The calibrated score removes how predictable a text was before fine-tuning (a reference model
    attack): common phrasing scores low under both models, only what training added stands out.
    """
    if kind == "loss":
        return -finetuned_loss
    if base_loss is None:
        raise ValueError("the calibrated score needs the base model's losses")
    return base_loss - finetuned_loss


def model_losses(model: PreTrainedModel, groups: Groups, *, batch_size: int, device: str) -> dict[str, np.ndarray]:
    """Mean span loss of every record of every group, in one batched pass."""
    sequences = [s for ids, _ in groups.values() for s in ids]
    spans = [s for _, group_spans in groups.values() for s in group_spans]
    losses = span_losses(model, sequences, spans, batch_size=batch_size, device=device)
    out, first = {}, 0
    for name, (ids, _) in groups.items():
        out[name] = losses[first: first + len(ids)]
        first += len(ids)
    return out


# =========================================================================== the attacks


def canary_attack(scores: np.ndarray, reference_scores: np.ndarray, inserted: np.ndarray, *,
                  n_guesses: int | None, confidence: float, delta: float, seed: int) -> dict[str, Any]:
    """Exposure, the one-run epsilon lower bound and the ROC of canary scores (inserted vs not)."""
    exposures = exposure(scores, reference_scores)
    extrapolated = exposure_extrapolated(scores, reference_scores) if reference_scores.size >= 3 else None

    summary: dict[str, Any] = {
        "exposure": {
            "inserted": _spread(exposures[inserted]),
            "not_inserted": _spread(exposures[~inserted]),
            "max_measurable": float(np.log2(reference_scores.size + 1)),
            "unseen_expectation": 1 / math.log(2),
        },
        "exposure_extrapolated": {
            "inserted": _spread(extrapolated[inserted]) if extrapolated is not None else None,
            "not_inserted": _spread(extrapolated[~inserted]) if extrapolated is not None else None,
        },
        "one_run": one_run_audit(scores, inserted, n_guesses=n_guesses, confidence=confidence, delta=delta,
                                 seed=seed),
        # the same test against pure epsilon-DP (delta = 0): not comparable with an (eps, delta) claim, but
        # informative when the claim's delta is large (group privacy for repeated canaries)
        "one_run_pure": one_run_audit(scores, inserted, n_guesses=n_guesses, confidence=confidence, delta=0.0,
                                      seed=seed),
    }
    if inserted.any() and (~inserted).any():
        summary["roc"] = roc_summary(scores[inserted], scores[~inserted])
    details = {"exposure": exposures.tolist(),
               "exposure_extrapolated": extrapolated.tolist() if extrapolated is not None else None}
    return {**summary, "per_canary": details}


def _spread(values: np.ndarray) -> dict[str, float] | None:
    """Mean, median and max of per-canary values (None when there are none to describe)."""
    if values.size == 0 or np.isnan(values).all():
        return None
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def synthetic_attack(synthetic_texts: Sequence[str], canaries: Sequence[dict[str, Any]], inserted: np.ndarray,
                     tokenizer: PreTrainedTokenizerBase, *, order: int, smoothing: float) -> dict[str, Any]:
    """Membership of canaries judged from the released synthetic text alone.

    An n-gram model fitted on the synthetic texts scores each canary by the mean log-probability of
    its random words in the context of the words before them (Meeus et al. 2025): a canary the
    generator regurgitates leaves its n-grams in the synthetic data.
    """
    corpus = tokenizer(list(synthetic_texts), add_special_tokens=False)["input_ids"] if synthetic_texts else []
    model = NgramModel(order, len(tokenizer), smoothing).fit(corpus)
    scores = []
    for canary in canaries:
        ids, start = canary_text_ids(canary, tokenizer)
        scores.append(model.span_log_prob(ids, start))
    scores_array = np.array(scores)
    result: dict[str, Any] = {"n_texts": len(corpus), "n_tokens": int(sum(map(len, corpus))),
                              "scores": scores_array.tolist()}
    if inserted.any() and (~inserted).any():
        result["roc"] = roc_summary(scores_array[inserted], scores_array[~inserted])
    return result
