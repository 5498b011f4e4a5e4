"""How each next token is chosen and when a sample ends: the sampling settings and the token selection.

`SamplingSettings` is the one description of a sampling run that every engine reads (the fast
sampler `dpnb.generation.decoding`, Hugging Face `generate` and vLLM, `dpnb.generation.engines`); it
is built once from the generate stage's config (`SamplingSettings.from_config`).

What one step computes. The model's next-token logits `l` go, in float32 (HF `generate` upcasts them
too), through the pipeline `generate` applies for plain sampling, in the same order:

1. min_new_tokens: while a sample has fewer than `min_new_tokens` new tokens, the stop tokens' logits
   are -inf (MinNewTokensLengthLogitsProcessor);
2. temperature: `s = l / temperature` (TemperatureLogitsWarper);
3. top-k (`top_k > 0`): tokens whose score is below the k-th largest are removed; ties with the k-th
   are kept (TopKLogitsWarper);
4. top-p (`top_p < 1`): with the remaining tokens sorted by probability `q = softmax(s)` from the
   largest, a token is kept when the probability of the tokens before it is below `top_p`: the
   smallest head of the ranking whose mass reaches `top_p`, never less than one token (TopPLogitsWarper,
   which removes the tokens whose ascending cumulative probability is at most 1 - top_p);
5. the next token is drawn from `softmax(s)` renormalised over the kept tokens.

With `do_sample=False` the token is `argmax(l)` after step 1 (greedy). A sample ends after its first
stop token or after `max_new_tokens` tokens; it is returned as its new tokens before the first stop
token and whether a stop token ended it (`Sample`).

Top-p without sorting the vocabulary (`generate` sorts all 49k logits of every row every step). The
kept set is the head of the ranking that first reaches `top_p` of the mass, so it lies inside any head
holding at least `top_p`: the tokens above a probability cut are gathered and sorted, and a row is
settled when they hold `top_p` of its mass; otherwise a lower cut, down to one that always holds it
(the tokens below (1 - top_p) / vocabulary weigh less than 1 - top_p together), then (float rounding)
a full sort. The gathered tokens of all rows are ranked in one integer sort (row, then the float's
bits, which order non-negative floats as the floats), and every row's draw inverts its cumulative
distribution at one uniform number (float64), all rows laid end to end on one cumulative sum.

Ties: tokens of exactly equal probability at the top-p boundary (frequent with bfloat16 logits) are
kept in an order the sort chooses, as `generate`'s sort does; the kept mass is the same either way.

Exactness: the kept set and its probabilities are the definition above, computed in float64 from the
float32 softmax. `generate` sums float32 probabilities from the smallest, so the two can differ by the
one boundary token when the mass before it is within about 1e-6 of `top_p`; nothing else differs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dpnb.errors import require

if TYPE_CHECKING:
    from dpnb.config import GenerateConfig

Sample = tuple[list[int], bool]  # new tokens before the first stop token, and whether a stop token ended it


@dataclass(frozen=True)
class SamplingSettings:
    """What a sample depends on, besides the model, its prompt and the seed.

    `batch_size`: rows decoded together. As with `generate`, the samples of a seed depend on it (which
    rows share a random stream), never their distribution.
    """

    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()  # tokens that end a sample (sorted, distinct)
    temperature: float = 1.0
    top_p: float = 1.0  # 1 disables nucleus sampling
    top_k: int = 0  # 0 disables top-k
    min_new_tokens: int = 0  # the stop tokens are masked before this many new tokens
    do_sample: bool = True  # False: greedy
    batch_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(sorted({int(t) for t in self.stop_ids})))
        require(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        require(0 <= self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens = {self.min_new_tokens} must be between 0 and max_new_tokens "
                f"({self.max_new_tokens})")
        require(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"top_k must be >= 0 (0 disables top-k), got {self.top_k}")
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")

    @classmethod
    def from_config(cls, cfg: GenerateConfig, stop_ids: Collection[int]) -> SamplingSettings:
        """The generate stage's sampling: plain ancestral sampling with the config's settings."""
        return cls(max_new_tokens=cfg.max_new_tokens, stop_ids=tuple(stop_ids), temperature=cfg.temperature,
                   top_p=cfg.top_p, top_k=cfg.top_k, min_new_tokens=cfg.min_new_tokens, batch_size=cfg.batch_size)

    def record(self) -> dict[str, Any]:
        """The settings as generation.json and the shards' plan record them (the stop ids are kept apart).

        Greedy decoding adds `do_sample: false`; sampling, the generate stage's only mode, writes the
        same keys as plans written before this object existed, so their shards still resume.
        """
        record: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                                  "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                                  "batch_size": self.batch_size}
        if not self.do_sample:
            record["do_sample"] = False
        return record


# --------------------------------------------------------------------------- steps 1-2


def processed_scores(logits: torch.Tensor, settings: SamplingSettings, under_min: torch.Tensor | None) -> torch.Tensor:
    """Steps 1-2: float32 scores (rows x vocabulary), stop tokens at -inf in rows `under_min`, over temperature.

    Works in place on float32 `logits` (one float32 copy of other formats: PyTorch's CPU softmax and
    comparisons read bfloat16 several times slower than float32). Greedy keeps the logits' format:
    the argmax of a float32 copy is the argmax of the original.
    """
    scores = logits.float() if settings.do_sample else logits
    if under_min is not None and settings.stop_ids and bool(under_min.any()):
        rows = under_min.nonzero().squeeze(1)
        stops = torch.tensor(settings.stop_ids, device=scores.device)
        scores[rows[:, None], stops[None, :]] = float("-inf")
    if settings.do_sample and settings.temperature != 1.0:
        scores = scores.div_(settings.temperature)
    return scores


# --------------------------------------------------------------------------- steps 3-5: the kept tokens


@dataclass
class Kept:
    """The tokens some rows may draw, flat: each row's entries together, from the most probable.

    Row `rows[entry_row[j]]` draws token `ids[j]` with probability weights[j] / (the sum of its
    entries' weights); tokens top-p removes have weight 0 (after the kept ones).
    """

    rows: torch.Tensor  # (n,) rows of the scores
    entry_row: torch.Tensor  # (entries,) index into `rows`, nondecreasing
    ids: torch.Tensor  # (entries,) token ids
    weights: torch.Tensor  # (entries,) unnormalised probabilities

    @classmethod
    def dense(cls, rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Kept:
        """From (rows x width) ids and weights, each row sorted from the most probable."""
        entry_row = torch.arange(len(rows), device=rows.device).repeat_interleave(ids.shape[1])
        return cls(rows, entry_row, ids.reshape(-1), weights.reshape(-1))

    def select(self, keep: torch.Tensor) -> Kept:
        """The rows where `keep` (n,) is True."""
        if bool(keep.all()):
            return self
        entries = keep[self.entry_row]
        renumbered = keep.cumsum(0) - 1
        return Kept(self.rows[keep], renumbered[self.entry_row[entries]], self.ids[entries], self.weights[entries])

    def normalised(self) -> torch.Tensor:
        """float64 weights that sum to 1 in each row."""
        weights = self.weights.double()
        totals = torch.zeros(len(self.rows), dtype=torch.float64, device=weights.device)
        return weights / totals.index_add_(0, self.entry_row, weights)[self.entry_row]

    def draw(self, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row: the inverse of the row's cumulative distribution at a uniform number.

        The rows' distributions lie end to end on one float64 cumulative sum (each of mass 1), so one
        search places every row's draw."""
        cumulative = self.normalised().cumsum(0)
        counts = torch.bincount(self.entry_row, minlength=len(self.rows))
        ends = counts.cumsum(0)
        starts = ends - counts
        base = torch.nn.functional.pad(cumulative, (1, 0))[starts]
        uniform = torch.rand(len(self.rows), dtype=torch.float64, device=cumulative.device, generator=generator)
        drawn = torch.searchsorted(cumulative, base + uniform, right=True)
        kept = torch.zeros_like(counts).index_add_(0, self.entry_row, (self.weights > 0).long())
        drawn = torch.minimum(torch.maximum(drawn, starts), starts + kept - 1)  # float rounding at the ends
        return self.ids[drawn]


def candidates(scores: torch.Tensor, top_k: int, top_p: float, head_cuts: Sequence[float] | None = None) -> list[Kept]:
    """The tokens each row may draw and their unnormalised probabilities (steps 3-5 of the docstring),
    with top-k or top-p on (without either, every token: `torch.softmax` itself).

    `scores` (rows x vocabulary) are logits after min_new_tokens and temperature. The returned groups
    together cover every row once. Top-p alone: the cuts of `head_cuts` (default (1 - top_p) / 2000,
    then (1 - top_p) / vocabulary, which always holds top_p) are tried in turn; rows no cut settles
    are sorted in full. The cuts change the speed, never the result.
    """
    rows, vocab = scores.shape
    every_row = torch.arange(rows, device=scores.device)
    k_cut = top_k if 0 < top_k < vocab else 0
    groups: list[Kept] = []
    if k_cut:
        values, ids = torch.topk(scores, k_cut, dim=-1)  # sorted from the largest
        weights = (values - values[:, :1]).exp_()
        if top_p < 1.0:
            weights, _ = _nucleus(weights, weights.sum(dim=-1, keepdim=True), top_p)
        # top-k keeps every token tied with the k-th score: settled here only without such ties
        settled = (scores >= values[:, -1:]).sum(dim=-1) == k_cut
        groups.append(Kept.dense(every_row, ids, weights).select(settled))
        left = every_row[~settled]
    else:
        probs = scores.softmax(dim=-1)
        left = every_row
        for cut in head_cuts if head_cuts is not None else ((1 - top_p) / 2000, (1 - top_p) / vocab):
            if not len(left):
                break
            settled, kept = _head(probs if len(left) == rows else probs[left], cut, top_p)
            groups.append(Kept(left[kept.rows], kept.entry_row, kept.ids, kept.weights))
            left = left[~settled]
    if len(left):
        ids, weights = _candidates_by_sort(scores if len(left) == rows else scores[left], k_cut, top_p)
        groups.append(Kept.dense(left, ids, weights))
    return [group for group in groups if len(group.rows)]


def _head(probs: torch.Tensor, cut: float, top_p: float) -> tuple[torch.Tensor, Kept]:
    """Top-p among each row's tokens of probability >= `cut`.

    Returns which rows are settled (their tokens above the cut hold at least top_p of the mass, so the
    kept set lies among them) and the kept tokens of the settled rows (`Kept.rows` indexes `probs`).
    """
    entry_row, ids = (probs >= cut).nonzero(as_tuple=True)
    values = probs[entry_row, ids]
    # by row, then from the largest: the bits of a float32 >= 0 rank as integers as the float does
    order = ((entry_row << 32) | (0x7FFFFFFF - values.view(torch.int32).long())).argsort()
    entry_row, ids, values = entry_row[order], ids[order], values[order]
    counts = torch.bincount(entry_row, minlength=probs.shape[0])
    ends = counts.cumsum(0)
    below = torch.nn.functional.pad(values.double().cumsum(0), (1, 0))  # float64: the boundary is sharp
    before = below[:-1] - below[ends - counts][entry_row]  # the row's mass ranked before each token
    settled = below[ends] - below[ends - counts] >= top_p
    rows = torch.arange(probs.shape[0], device=probs.device)
    return settled, Kept(rows, entry_row, ids, values.masked_fill(before >= top_p, 0.0)).select(settled)


def _nucleus(weights: torch.Tensor, total: torch.Tensor | float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights (rows sorted from the largest) of tokens after the first `top_p` of the mass.

    A token is kept when the probability of the tokens ranked before it is below top_p. Returns the
    filtered weights and the probability mass of all the given tokens.
    """
    cumulative = (weights.double() / total).cumsum(dim=-1)  # float64: the boundary is sharp
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    return weights.masked_fill(before >= top_p, 0.0), cumulative[:, -1]


def _candidates_by_sort(scores: torch.Tensor, k_cut: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`candidates` for rows no head settles: a full sort of each row's scores."""
    values, ids = torch.sort(scores, dim=-1, descending=True)
    weights = (values - values[:, :1]).exp_()
    if k_cut:
        weights = weights.masked_fill(values < values[:, k_cut - 1: k_cut], 0.0)
    if top_p < 1.0:
        weights, _ = _nucleus(weights, weights.sum(dim=-1, keepdim=True), top_p)
    return ids, weights


# --------------------------------------------------------------------------- the draw


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, under_min: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `logits` (rows x vocabulary; overwritten): steps 1-5 of the docstring.

    `under_min`: rows with fewer than min_new_tokens new tokens (None: none).
    """
    scores = processed_scores(logits, settings, under_min)
    if not settings.do_sample:
        return scores.argmax(dim=-1)
    if not 0 < settings.top_k < scores.shape[1] and settings.top_p >= 1.0:
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for kept in candidates(scores, settings.top_k, settings.top_p):
        tokens[kept.rows] = kept.draw(generator)
    return tokens


def token_probabilities(logits: torch.Tensor, settings: SamplingSettings,
                        head_cuts: Sequence[float] | None = None) -> torch.Tensor:
    """The distribution one sampling step draws from, per row of `logits` (rows x vocabulary).

    Dense (zeros for removed tokens) and computed by the same code the sampler uses; for checking it
    against Hugging Face's warpers. `head_cuts` overrides the probability cuts tried before a full
    sort (see `candidates`).
    """
    scores = processed_scores(logits.clone(), settings, None)
    if not 0 < settings.top_k < scores.shape[1] and settings.top_p >= 1.0:
        return scores.softmax(dim=-1)
    probs = torch.zeros_like(scores)
    for kept in candidates(scores, settings.top_k, settings.top_p, head_cuts):
        probs[kept.rows[kept.entry_row], kept.ids] = kept.normalised().float()
    return probs
