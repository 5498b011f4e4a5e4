"""Sampling engines: one interface over the fast sampler, Hugging Face `generate` and vLLM, and the choice.

Every engine samples one continuation of each prompt it is given (identical prompts allowed: a
label's prompt n times, or many distinct prompts), from the same distribution (`dpnb.generation.next_token`):

    settings = SamplingSettings.from_config(cfg.generate, stop_ids)  # or SamplingSettings(max_new_tokens=64, ...)
    with open_engine("auto", model, settings, tokenizer=tokenizer) as engine:
        samples = engine.sample(prompts, seed)  # [(new token ids before the stop token, stopped), ...]

The same prompts, settings and seed give the same samples on the same machine and engine; another
engine or batch size gives other samples of the same distribution.

| engine | what | "auto" takes it |
|---|---|---|
| `vllm` | vLLM (`vllm_engine`; optional, for a GPU) | on a GPU with vLLM installed, no adapter |
| `fast` | `decoding` (static cache, rows refilled, top-p without a sort) | for the architectures it supports |
| `hf` | transformers' `generate` | otherwise |
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import GenerationConfig

from dpnb.errors import require
from dpnb.generation import vllm_engine
from dpnb.generation.decoding import FastSampler
from dpnb.generation.fast_forward import is_supported, runner_for
from dpnb.generation.next_token import Sample, SamplingSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class Engine(Protocol):
    """What every sampling engine does."""

    name: str

    def sample(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Sample]:
        """One continuation of each prompt (token ids), in prompt order, drawn with randomness from `seed`."""
        ...

    def close(self) -> None:
        """Give back what the engine holds (vLLM: the GPU, and the model back where it was)."""
        ...


# --------------------------------------------------------------------------- the fast sampler


class FastEngine:
    """`dpnb.generation.decoding.FastSampler`: on a CPU the weights are packed once, for every call of this engine."""

    name = "fast"

    def __init__(self, model: PreTrainedModel, settings: SamplingSettings, **_: Any):
        self.sampler = FastSampler(model, settings)
        self.device = model.device

    def sample(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Sample]:
        return self.sampler.sample(prompts, torch.Generator(device=self.device).manual_seed(seed))

    def close(self) -> None:
        del self.sampler


# --------------------------------------------------------------------------- Hugging Face generate


def generation_config(settings: SamplingSettings, pad_id: int) -> GenerationConfig:
    """Plain ancestral sampling (or greedy) with the settings, and nothing else.

    Penalties and other processors a model's own generation_config.json may carry are switched off
    explicitly, so the settings recorded in the dataset card are the whole story.
    """
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    return GenerationConfig(
        do_sample=settings.do_sample, num_beams=1, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
        eos_token_id=list(settings.stop_ids) or None, pad_token_id=pad_id, **(sampling if settings.do_sample else {}),
    )


def strip_prompt_and_cut(sequence: Sequence[int], prompt_length: int,
                         stop_ids: Collection[int]) -> tuple[list[int], bool]:
    """The new tokens of one generated sequence, up to (not including) the first stop token.

    Returns the tokens and whether a stop token ended the sample (False: it ran to max_new_tokens).
    Everything after the stop token is padding that `generate` adds to rows that finished early.
    """
    new_tokens = [int(t) for t in sequence[prompt_length:]]
    for position, token in enumerate(new_tokens):
        if token in stop_ids:
            return new_tokens[:position], True
    return new_tokens, False


class HFEngine:
    """transformers' `generate`, `batch_size` rows per call, prompts in order of length.

    Prompts of different lengths share a call left-padded (with the attention mask `generate` takes);
    a label's prompt repeated n times needs no padding and gives the same batches, and samples, as one
    `generate` call per `batch_size` rows.
    """

    name = "hf"

    def __init__(self, model: PreTrainedModel, settings: SamplingSettings, *,
                 tokenizer: PreTrainedTokenizerBase | None = None, **_: Any):
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad = pad if pad is not None else (settings.stop_ids[0] if settings.stop_ids else 0)
        self.model, self.settings, self.config = model, settings, generation_config(settings, self.pad)

    def sample(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Sample]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: a shard keeps its order
        results: list[Sample] = [([], False)] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        cuda = [self.model.device] if self.model.device.type == "cuda" else []
        try:  # fork_rng: seeding must not disturb the caller's random state
            with torch.random.fork_rng(devices=cuda), torch.inference_mode():
                torch.manual_seed(seed)
                for start in range(0, len(order), self.settings.batch_size):
                    batch = order[start: start + self.settings.batch_size]
                    for index, sample in zip(batch, self._generate([prompts[i] for i in batch]), strict=True):
                        results[index] = sample
        finally:
            self.model.train(was_training)
        return results

    def _generate(self, prompts: list[Sequence[int]]) -> list[Sample]:
        """One `generate` call, shorter prompts left-padded (masked out)."""
        width = max(map(len, prompts))
        rows = [[self.pad] * (width - len(p)) + [int(t) for t in p] for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        device = self.model.device
        output = self.model.generate(input_ids=torch.tensor(rows, device=device),
                                     attention_mask=torch.tensor(mask, device=device), generation_config=self.config)
        return [strip_prompt_and_cut(row, width, self.settings.stop_ids) for row in output.tolist()]

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class EngineKind:
    """An engine in the registry: how to open it, whether it can sample a model, whether "auto" takes it."""

    name: str
    open: Callable[..., Engine]  # (model, settings, *, tokenizer, scratch_dir, max_prompt_tokens) -> Engine
    check: Callable[[Any], Any]  # raises a DpnbError with the fix when it cannot sample this model
    auto: Callable[[Any], bool]


def _vllm_suits(model: Any) -> bool:
    return model.device.type == "cuda" and vllm_engine.is_available() and not hasattr(model, "peft_config")


ENGINES = {kind.name: kind for kind in (  # "auto" takes the first that suits, in this order
    EngineKind("vllm", vllm_engine.VllmEngine, lambda model: vllm_engine.require_vllm(), _vllm_suits),
    EngineKind("fast", FastEngine, runner_for, is_supported),
    EngineKind("hf", HFEngine, lambda model: None, lambda model: True),
)}


def engine_name(setting: str, model: Any) -> str:
    """The engine that `setting` ("auto" or an engine's name) samples `model` with; a named engine that
    cannot sample it is refused with the fix."""
    if setting == "auto":
        return next(name for name, kind in ENGINES.items() if kind.auto(model))
    require(setting in ENGINES, f"unknown sampling engine {setting!r}; choose auto, {', '.join(ENGINES)}")
    ENGINES[setting].check(model)
    return setting


@contextmanager
def open_engine(setting: str, model: PreTrainedModel, settings: SamplingSettings, *,
                tokenizer: PreTrainedTokenizerBase | None = None, scratch_dir: Path | None = None,
                max_prompt_tokens: int | None = None) -> Iterator[Engine]:
    """The engine `setting` names (or "auto" chooses) over `model`, closed on leaving the block.

    `tokenizer`: saved with the weights for vLLM, and HF's padding id. `scratch_dir`: where vLLM's
    copy of the weights is written (and removed once loaded). `max_prompt_tokens`: the longest prompt
    vLLM will be given (it sizes its cache; None: the model's context).
    """
    engine = ENGINES[engine_name(setting, model)].open(model, settings, tokenizer=tokenizer, scratch_dir=scratch_dir,
                                                       max_prompt_tokens=max_prompt_tokens)
    try:
        yield engine
    finally:
        engine.close()
