"""Fast sampling from a causal LM: one continuation of each of many prompts, rows refilled as samples end.

What it computes. Each sample continues its prompt one token at a time (ancestral sampling), each
step's token chosen as `dpnb.generation.next_token` defines (Hugging Face `generate`'s pipeline for plain
sampling: min_new_tokens, temperature, top-k, top-p; or greedy), until a stop token or
`max_new_tokens`. `FastSampler.sample` takes any list of prompts, identical ones allowed: a label's
prompt repeated n times (the generate stage's shards) or a thousand distinct prompts (Private
Evolution's variations), and returns one `Sample` per prompt, in order.

Why it is faster than `generate` on a CPU, with the same distribution:

- each distinct prompt runs through the model once. The prefix all prompts share (with one prompt:
  all of it but its last token) is kept once, and every row attends to that one copy. The rest of
  the distinct prompts is computed in batches as rows free up (padded to the longest of the batch:
  a row's padding comes after its prompt, where causal attention never looks, and its logits are
  read at its own last token); rows take samples in order of prompt length, so a batch pads little.
  A prompt's keys are copied into every row that continues it;
- continuous batching: every row has its own position and attention mask, so a row whose sample ends
  takes the next pending sample at once instead of idling until the slowest row of its batch ends;
  when none is pending the live rows are packed to the front and the batch shrinks;
- the forward pass over a static cache with packed weights (`dpnb.generation.fast_forward`), and top-p without
  sorting the vocabulary (`dpnb.generation.next_token`).

Memory: the rows' cache (rows x (longest prompt after the shared prefix + max_new_tokens)), one prefill
batch, and the prompts some of whose samples wait for a row; never every prompt at once.

Exactness: the kept tokens and their probabilities are `dpnb.generation.next_token`'s (HF's, up to the float
rounding of one boundary token). Greedy decoding gives `generate`'s tokens as long as float rounding
(attention and matrix products are done in a different order) does not flip an argmax between
near-equal logits.

Randomness: every draw uses `generator` (the global torch generator when None), so a seeded generator
gives the same samples on the same machine. As with `generate`, the samples depend on `batch_size`
(how many rows run together) and the order of the prompts, not only on the seed.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dpnb.errors import require
from dpnb.generation.fast_forward import Cache, Runner, context_limit, is_supported, runner_for, unwrap
from dpnb.generation.next_token import Sample, SamplingSettings, next_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["FastSampler", "continue_prompts", "is_supported", "sample_continuations"]

PREFILL_TOKENS = 4096  # rows x padded length of one prefill batch (bounds its activations and attention)


class FastSampler:
    """The fast sampler over one model and one set of settings, for many calls.

    On a CPU the weights are packed for oneDNN on the first call and kept (a copy of the weights while
    the sampler lives): the sampler samples the weights the model had then.
    """

    def __init__(self, model: PreTrainedModel, settings: SamplingSettings, *, prepack: bool = True):
        self.model, self.settings, self.prepack = model, settings, prepack
        self.runner = runner_for(model)
        vocab = self.runner.model.get_output_embeddings().weight.shape[0]
        require(all(0 <= t < vocab for t in settings.stop_ids),
                f"stop ids must be token ids below the vocabulary size {vocab}")
        self.packed = False

    def sample(self, prompts: Sequence[Sequence[int]], generator: torch.Generator | None = None) -> list[Sample]:
        """One continuation of each prompt, in prompt order (see the module docstring)."""
        require(len(prompts) > 0 and all(len(p) > 0 for p in prompts), "every prompt needs at least one token")
        longest = max(map(len, prompts))
        limit = context_limit(self.model)
        require(limit is None or longest + self.settings.max_new_tokens <= limit,
                f"prompt + max_new_tokens = {longest + self.settings.max_new_tokens} tokens exceeds the model's "
                f"context of {limit}")
        inner = unwrap(self.model)
        was_training = inner.training
        inner.eval()
        try:
            with torch.inference_mode():
                if self.prepack and not self.packed:
                    self.runner.pack(self.settings.batch_size)
                    self.packed = True
                decoder = _Decoder(self.runner, [tuple(map(int, p)) for p in prompts], self.settings, generator)
                return decoder.run()
        finally:
            inner.train(was_training)


def continue_prompts(model: PreTrainedModel, prompts: Sequence[Sequence[int]], settings: SamplingSettings, *,
                     generator: torch.Generator | None = None, prepack: bool = True) -> list[Sample]:
    """One continuation of each prompt in `prompts`, in order (see the module docstring).

    `prepack`: on a CPU, reorder the weights once for oneDNN's products (a copy of the weights for the
    call's duration). Many calls on one model: `FastSampler`, which packs once.
    """
    return FastSampler(model, settings, prepack=prepack).sample(prompts, generator)


def sample_continuations(model: PreTrainedModel, prompt_ids: Sequence[int], n: int, settings: SamplingSettings, *,
                         generator: torch.Generator | None = None) -> list[Sample]:
    """`n` continuations of one prompt (its keys and values computed once)."""
    require(n >= 1, f"n must be at least 1, got {n}")
    return continue_prompts(model, [prompt_ids] * n, settings, generator=generator)


def _common_prefix(prompts: list[tuple[int, ...]]) -> int:
    """Length of the prefix every prompt starts with, leaving each prompt at least one token."""
    shortest = min(map(len, prompts))
    length = 0
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


@dataclass
class _Slot:
    """One row of the batch: which sample it holds, its prompt and how many new tokens it has."""

    sample: int
    prompt: int
    new_tokens: int
    position: int  # position of the token fed next (the sample's last token)
    token: int  # the token fed next


@dataclass
class _Prefilled:
    """A prompt's keys and values after the shared prefix (row `row` of `cache`) and its next-token logits."""

    cache: Cache
    row: int
    length: int
    logits: torch.Tensor


class _Decoder:
    """One call: the rows, the samples they hold and those pending, the prompts' prefills, the results."""

    def __init__(self, runner: Runner, prompts: list[tuple[int, ...]], settings: SamplingSettings,
                 generator: torch.Generator | None):
        self.runner, self.settings, self.generator = runner, settings, generator
        self.device = runner.device
        distinct: dict[tuple[int, ...], int] = {}
        self.prompt_of = [distinct.setdefault(p, len(distinct)) for p in prompts]
        self.distinct = list(distinct)
        self.start = _common_prefix(self.distinct)
        self.shared = self._prefix_cache()
        # rows take samples by prompt length (a prefill batch pads little), a prompt's samples together
        by_length = sorted(range(len(prompts)), key=lambda s: (len(prompts[s]), self.prompt_of[s]))
        self.pending = deque(by_length)
        self.unstarted = Counter(self.prompt_of)  # samples of each prompt that no row has taken yet
        self.kept: dict[int, _Prefilled] = {}  # prefilled prompts with samples still to start
        self.n_rows = min(settings.batch_size, len(prompts))
        capacity = max(map(len, self.distinct)) - self.start + settings.max_new_tokens
        self.cache = runner.new_cache(self.n_rows, capacity, self.shared)
        self.holds = [-1] * self.n_rows  # prompt whose keys and values each row holds
        self.slots: list[_Slot | None] = [None] * self.n_rows
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.results: list[Sample | None] = [None] * len(prompts)
        self.stops = set(settings.stop_ids)

    def run(self) -> list[Sample]:
        self._fill(list(range(self.n_rows)))
        while live := (self._pack() if not self.pending else self.n_rows):
            self._step(live)
        assert all(result is not None for result in self.results)
        return [result for result in self.results if result is not None]

    def _prefix_cache(self) -> Cache | None:
        """The keys and values of the prefix every prompt shares, once (None when there is none)."""
        if not self.start:
            return None
        shared = self.runner.new_cache(1, self.start)
        tokens = torch.tensor([self.distinct[0][: self.start]], device=self.device)
        self.runner.logits(tokens, torch.arange(self.start, device=self.device)[None], shared)
        return shared

    def _step(self, live: int) -> None:
        """One token for each of the first `live` rows; rows whose sample ends take pending ones."""
        active = [slot for slot in self.slots[:live] if slot is not None]
        assert len(active) == live, "live rows are packed to the front"
        tokens = torch.tensor([[s.token] for s in active], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.position] for s in active], dtype=torch.long, device=self.device)
        logits = self.runner.logits(tokens, positions, self.cache)
        free: list[int] = []
        for row, (slot, token) in enumerate(zip(active, self._choose(logits, [s.new_tokens for s in active]),
                                                strict=True)):
            slot.new_tokens += 1
            if self._finish(slot.sample, token, slot.new_tokens):
                self.slots[row] = None
                free.append(row)
            else:
                slot.position += 1
                slot.token = token
        self._fill(free)

    def _choose(self, logits: torch.Tensor, new_tokens: list[int]) -> list[int]:
        under_min = None
        if self.settings.min_new_tokens and self.settings.stop_ids:
            under_min = torch.tensor([t < self.settings.min_new_tokens for t in new_tokens], device=self.device)
        return next_tokens(logits, self.settings, under_min, self.generator).tolist()

    def _finish(self, sample: int, token: int, new_tokens: int) -> bool:
        """Record `token`; True when it ends the sample."""
        if token in self.stops:
            self.results[sample] = (self.outputs[sample], True)
            return True
        self.outputs[sample].append(token)
        if new_tokens >= self.settings.max_new_tokens:
            self.results[sample] = (self.outputs[sample], False)
            return True
        return False

    def _fill(self, free: list[int]) -> None:
        """Start pending samples in the free rows: their prompts' keys, then each one's first token."""
        while free and self.pending:
            starting = [(free.pop(0), self.pending.popleft()) for _ in range(min(len(free), len(self.pending)))]
            logits = self._start(starting)
            for (row, sample), token in zip(starting, self._choose(logits, [0] * len(starting)), strict=True):
                if self._finish(sample, token, 1):
                    free.append(row)
                    self.slots[row] = None
                else:
                    prompt = self.prompt_of[sample]
                    self.slots[row] = _Slot(sample, prompt, 1, len(self.distinct[prompt]), token)
            free.sort()

    def _start(self, starting: list[tuple[int, int]]) -> torch.Tensor:
        """Put each (row, sample)'s prompt into its row; the next-token logits after each prompt."""
        prompts = [self.prompt_of[sample] for _, sample in starting]
        fresh = self._prefill([p for p in dict.fromkeys(prompts) if p not in self.kept])
        logits = []
        for (row, _), prompt in zip(starting, prompts, strict=True):
            source = self.kept.get(prompt) or fresh[prompt]
            if self.holds[row] != prompt:
                self.cache.copy_row(row, source.cache, source.row, source.length)
                self.holds[row] = prompt
            logits.append(source.logits)
            self.unstarted[prompt] -= 1
        for prompt, prefilled in fresh.items():  # keep a copy of the prompts whose samples are not all started
            if self.unstarted[prompt]:
                self.kept[prompt] = _Prefilled(_row_copy(prefilled), 0, prefilled.length, prefilled.logits.clone())
        for prompt in [p for p in self.kept if not self.unstarted[p]]:
            del self.kept[prompt]
        return torch.stack(logits)

    def _prefill(self, prompts: list[int]) -> dict[int, _Prefilled]:
        """The keys, values and next-token logits of `prompts` after the shared prefix, in padded batches."""
        if not prompts:
            return {}
        per_batch = max(1, PREFILL_TOKENS // (max(len(self.distinct[p]) for p in prompts) - self.start))
        done: dict[int, _Prefilled] = {}
        for first in range(0, len(prompts), per_batch):
            batch = prompts[first: first + per_batch]
            rests = [list(self.distinct[p][self.start:]) for p in batch]
            width = max(map(len, rests))
            tokens = torch.tensor([rest + rest[-1:] * (width - len(rest)) for rest in rests], device=self.device)
            positions = torch.arange(self.start, self.start + width, device=self.device).expand(len(batch), width)
            last = torch.tensor([len(rest) - 1 for rest in rests], device=self.device)
            cache = self.runner.new_cache(len(batch), width, self.shared)
            logits = self.runner.logits(tokens, positions, cache, last)
            for i, (prompt, rest) in enumerate(zip(batch, rests, strict=True)):
                done[prompt] = _Prefilled(cache, i, len(rest), logits[i])
        return done

    def _pack(self) -> int:
        """Move live rows into the free rows before them (nothing is pending); the live row count."""
        live = [row for row, slot in enumerate(self.slots) if slot is not None]
        holes = [row for row in range(len(live)) if self.slots[row] is None]
        movers = [row for row in live if row >= len(live)]
        if holes:
            self.cache.move_rows(movers, holes)
            for hole, mover in zip(holes, movers, strict=True):
                self.slots[hole], self.slots[mover] = self.slots[mover], None
                self.holds[hole], self.holds[mover] = self.holds[mover], -1
        return len(live)


def _row_copy(prefilled: _Prefilled) -> Cache:
    """A one-row cache holding `prefilled`'s prompt (so that its prefill batch can be freed)."""
    cache, row, length = prefilled.cache, prefilled.row, prefilled.length
    return Cache(cache.keys[:, row: row + 1, ..., :length].clone(), cache.values[:, row: row + 1, :, :length].clone(),
                 cache.start, cache.shared_keys, cache.shared_values)
