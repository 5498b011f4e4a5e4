"""Sampling with vLLM: the optional engine for paper-scale sets on a GPU (`pip install dpnb[vllm]`).

vLLM batches continuously (a finished sample frees its slot at once), pages its key/value cache and
runs its own CUDA kernels: at 25,000 samples of 300 tokens per model that is the difference between
hours and minutes. It samples the same distribution as the other engines (`dpnb.generation.decoding`, HF
`generate`): temperature, then top-k, then top-p over the model's next-token logits, with EOS masked
before `min_new_tokens`. Its random streams differ, so the samples themselves differ.

How it fits the engine interface (`dpnb.generation.engines`). `VllmEngine.sample(prompts, seed)` sends one
request per distinct prompt, for as many samples as the prompt appears: a generate stage's shard (one
label's prompt n times) is one request seeded from (seed, label, shard) alone, as in the other
engines, so a resumed run samples the missing shards only. vLLM loads weights from a directory, so the
model being sampled (the merged fine-tuned model, or the base for the zero-shot set) is written to a
temporary directory first (`export_weights`, beside the set) and removed once loaded; a QLoRA adapter
on a 4-bit base cannot be merged on the GPU, and is refused with the engines that can sample it.

Nothing here runs without vLLM; `is_available` says whether it is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpnb.errors import DpnbError, require
from dpnb.generation.fast_forward import context_limit
from dpnb.models import release_memory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dpnb.generation.next_token import Sample, SamplingSettings

GPU_MEMORY_SHARE = 0.85  # of the GPU vLLM may take for weights and cache; the rest stays for torch


def is_available() -> bool:
    """Whether vLLM is installed (`pip install dpnb[vllm]`)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not is_available():
        raise DpnbError("generate.engine is vllm but vLLM is not installed: `pip install dpnb[vllm]` (needs a CUDA "
                        "GPU), or set generate.engine to auto, fast or hf")


def sampling_params(settings: SamplingSettings, n: int, seed: int) -> dict[str, Any]:
    """vLLM's SamplingParams for `n` samples of one prompt, the settings in vLLM's terms.

    HF's top_k 0 (off) is vLLM's -1; greedy is temperature 0; min_new_tokens is min_tokens; the stop
    tokens are given explicitly (the model's EOS stops too); token ids only, no detokenising (dpnb decodes).
    """
    return {"n": n, "temperature": settings.temperature if settings.do_sample else 0.0, "top_p": settings.top_p,
            "top_k": settings.top_k if settings.top_k > 0 else -1, "max_tokens": settings.max_new_tokens,
            "min_tokens": settings.min_new_tokens, "seed": seed, "stop_token_ids": list(settings.stop_ids),
            "detokenize": False}


def request_seed(seed: int, request: int) -> int:
    """The seed of the `request`-th distinct prompt of a call: `seed` itself for the first (a shard's
    only request), a hash of both for the others (one seed for all would correlate their draws)."""
    if request == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"dpnb-vllm:{seed}:{request}".encode()).digest()[:8], "big") >> 1


def cut_at_stop(token_ids: Sequence[int], finish_reason: str | None,
                stop_ids: Collection[int]) -> tuple[list[int], bool]:
    """A sample's new tokens before its first stop token, and whether a stop token ended it (the
    format of `dpnb.generation.engines.strip_prompt_and_cut`); vLLM may or may not return the stop token itself."""
    ids = [int(t) for t in token_ids]
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position], True
    return ids, finish_reason == "stop"


def export_weights(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    """Write `model` (plain weights) and its tokenizer where vLLM can load them."""
    if hasattr(model, "peft_config"):
        raise DpnbError("vLLM needs plain weights, and a QLoRA adapter on a 4-bit base cannot be merged on the GPU; "
                        "set generate.engine to fast or hf for this run")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


class VllmEngine:
    """vLLM over `model`'s weights (`dpnb.generation.engines.Engine`): exported to a temporary directory in
    `scratch_dir` and loaded; the torch copy moves to the CPU meanwhile so that vLLM has the GPU's
    memory, and goes back where it was on `close`."""

    name = "vllm"

    def __init__(self, model: PreTrainedModel, settings: SamplingSettings, *,
                 tokenizer: PreTrainedTokenizerBase | None = None, scratch_dir: Path | None = None,
                 max_prompt_tokens: int | None = None, **_: Any):
        require_vllm()
        require(tokenizer is not None, "the vLLM engine needs the model's tokenizer (saved with its weights)")
        from vllm import LLM  # optional dependency, imported only when this engine is chosen

        self.model, self.settings, self.home = model, settings, model.device
        longest = context_limit(model) if max_prompt_tokens is None else max_prompt_tokens + settings.max_new_tokens
        staging = Path(tempfile.mkdtemp(dir=scratch_dir, prefix=".dpnb-vllm-weights."))
        try:
            export_weights(model, tokenizer, staging)
            dtype = str(model.dtype).removeprefix("torch.")
            model.to("cpu")
            release_memory()
            self.llm = LLM(model=str(staging), tokenizer=str(staging), dtype=dtype, seed=0, max_model_len=longest,
                           gpu_memory_utilization=GPU_MEMORY_SHARE,
                           enable_prefix_caching=True)  # every sample of a label shares its prompt
        except BaseException:
            model.to(self.home)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def sample(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Sample]:
        """One continuation of each prompt: one request per distinct prompt, for all its samples."""
        from vllm import SamplingParams

        where: dict[tuple[int, ...], list[int]] = {}
        for index, prompt in enumerate(prompts):
            where.setdefault(tuple(map(int, prompt)), []).append(index)
        params = [SamplingParams(**sampling_params(self.settings, len(indices), request_seed(seed, i)))
                  for i, indices in enumerate(where.values())]
        requests = self.llm.generate([{"prompt_token_ids": list(p)} for p in where], params[0] if len(params) == 1
                                     else params, use_tqdm=False)
        results: list[Sample] = [([], False)] * len(prompts)
        for indices, request in zip(where.values(), requests, strict=True):
            for index, output in zip(indices, request.outputs, strict=True):
                results[index] = cut_at_stop(output.token_ids, output.finish_reason, self.settings.stop_ids)
        return results

    def close(self) -> None:
        del self.llm
        release_memory()
        self.model.to(self.home)  # back where the caller had it
