"""Sampling with vLLM: the optional engine for paper-scale sets on a GPU (`pip install dpnb[vllm]`).

vLLM batches continuously (a finished sample frees its slot at once), pages its key/value cache and
runs its own CUDA kernels: at 25,000 samples of 300 tokens per model that is the difference between
hours and minutes. It samples the same distribution as the other engines (`dpnb.decoding`, HF
`generate`): temperature, then top-k, then top-p over the model's next-token logits, with EOS masked
before `min_new_tokens`. Its random streams differ, so the samples themselves differ.

How it fits the shards (`dpnb.sampling`). A shard is one request for `n` samples of one label's
prompt, seeded from (seed, label, shard) alone, as in the other engines: a resumed run samples the
missing shards only. vLLM loads weights from a directory, so the model being sampled (the merged
fine-tuned model, or the base for the zero-shot set) is written to a temporary directory beside the
set first (`export_weights`) and removed afterwards; a QLoRA adapter on a 4-bit base cannot be merged
on the GPU, and is refused with the engines that can sample it.

Nothing here runs without vLLM; `is_available` says whether it is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpnb.errors import DpnbError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dpnb.config import GenerateConfig

GPU_MEMORY_SHARE = 0.85  # of the GPU vLLM may take for weights and cache; the rest stays for torch


def is_available() -> bool:
    """Whether vLLM is installed (`pip install dpnb[vllm]`)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not is_available():
        raise DpnbError("generate.engine is vllm but vLLM is not installed: `pip install dpnb[vllm]` (needs a CUDA "
                        "GPU), or set generate.engine to auto, fast or hf")


def sampling_params(cfg: GenerateConfig, n: int, seed: int, stop_ids: Collection[int]) -> dict[str, Any]:
    """vLLM's SamplingParams for one shard, the config's settings in vLLM's terms.

    HF's top_k 0 (off) is vLLM's -1; min_new_tokens is min_tokens; the stop tokens are given
    explicitly (the model's EOS stops too); token ids only, no detokenising (dpnb decodes).
    """
    return {"n": n, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k if cfg.top_k > 0 else -1,
            "max_tokens": cfg.max_new_tokens, "min_tokens": cfg.min_new_tokens, "seed": seed,
            "stop_token_ids": sorted(stop_ids), "detokenize": False}


def cut_at_stop(token_ids: Sequence[int], finish_reason: str | None,
                stop_ids: Collection[int]) -> tuple[list[int], bool]:
    """A sample's new tokens before its first stop token, and whether a stop token ended it (the
    format of `dpnb.sampling.strip_prompt_and_cut`); vLLM may or may not return the stop token itself."""
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


class VllmSampler:
    """One vLLM engine over the weights in `weights_dir`, sampling shards of one prompt each."""

    def __init__(self, weights_dir: Path, dtype: str, seed: int, max_model_len: int):
        require_vllm()
        from vllm import LLM  # optional dependency, imported only when this engine is chosen

        self.llm = LLM(model=str(weights_dir), tokenizer=str(weights_dir), dtype=dtype, seed=seed,
                       max_model_len=max_model_len, gpu_memory_utilization=GPU_MEMORY_SHARE,
                       enable_prefix_caching=True)  # every sample of a label shares its prompt

    def sample(self, prompt_ids: Sequence[int], n: int, seed: int, cfg: GenerateConfig,
               stop_ids: Collection[int]) -> list[tuple[list[int], bool]]:
        """`n` continuations of one prompt: (new tokens before the first stop token, stopped)."""
        from vllm import SamplingParams

        params = SamplingParams(**sampling_params(cfg, n, seed, stop_ids))
        (request,) = self.llm.generate([{"prompt_token_ids": list(prompt_ids)}], params, use_tqdm=False)
        return [cut_at_stop(output.token_ids, output.finish_reason, stop_ids) for output in request.outputs]
