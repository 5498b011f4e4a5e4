"""The fast path for top-block training: the frozen blocks run once per record, the frozen head's loss fused.

When every trainable weight sits in the top K blocks (LoRA on the top layers, or mode full with
`top_layers`), the input of the lowest trainable block is a fixed function of each record: the
frozen-prefix cache (`dpnb.training.prefix_cache`) computes it once, and each DP-SGD step runs only
the top blocks and the frozen LM head's cross-entropy at the review's tokens
(`dpnb.training.head_loss`). Per-record losses and gradients are those of the full model, so
clipping, noise and the accounting are unchanged. A sweep's runs on the same records share one
cache (`shared_prefix_cache`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dpnb.errors import DpnbError
from dpnb.io import DamagedFile
from dpnb.precision import Precision
from dpnb.training.head_loss import FrozenHeadLoss
from dpnb.training.prefix_cache import (
    CACHE_FILE,
    PrefixCache,
    TopBlocks,
    build_prefix_cache,
    building_lock,
    frozen_fingerprint,
    records_fingerprint,
)

if TYPE_CHECKING:
    from torch import nn

    from dpnb.config import FinetuneConfig
    from dpnb.training.loss import Records


@dataclass
class FrozenPrefix:
    """Top-block training without the frozen blocks: their outputs cached, the head's loss fused.

    When every trainable weight sits in the top K blocks (LoRA on the top layers, or mode full with
    `top_layers`), the input h^s of the lowest trainable block is a fixed function of each record
    (`dpnb.training.prefix_cache`): it is computed once, and each step runs only the top blocks (`top`, which
    Opacus wraps in place of the whole model) and the frozen LM head's cross-entropy at the review's
    tokens only (`dpnb.training.head_loss`). Per-record losses and gradients are those of the full model, so
    clipping, noise and the accounting are unchanged.
    """

    cache: PrefixCache
    top: TopBlocks
    head_loss: FrozenHeadLoss


def frozen_prefix(model: nn.Module, records: Records, cfg: FinetuneConfig, pad_id: int,
                  device: str, shared_dir: Path | None = None,
                  precision: Precision | None = None) -> tuple[FrozenPrefix | None, str]:
    """The fast path for `model` when it applies, else None; and a note saying which, and why.

    Under a bf16 `precision` the frozen blocks run under bf16 autocast while the cache is built, and
    the frozen head's loss forms its logits from a bf16 copy of the head (softmax in float32): both
    are frozen computations, so only their rounding changes, never the clipping bound.

    With `shared_dir` (the runs of a sweep: `dpnb.rundir.shared_store`) the cache is kept there, under
    a key naming the records, the frozen weights and how it was built, and a later run with the same
    key maps it instead of building it again.
    """
    if not cfg.prefix_cache:
        return None, "frozen-prefix cache off (finetune.prefix_cache: false): every step runs the whole model"
    if cfg.dp and cfg.grad_sample_mode == "ghost":
        return None, "frozen-prefix cache off: it runs with Opacus hooks, not ghost clipping"
    try:
        top = TopBlocks(model)  # checks that nothing below is trainable or random
        head_loss = FrozenHeadLoss.of_model(model, dtype=precision.dtype if precision else None)
    except DpnbError as why:
        return None, f"frozen-prefix cache off: {why}"
    if top.start == 0:
        return None, "frozen-prefix cache off: the lowest block is trainable, so there is nothing to cache"
    frozen = frozen_copy(model, precision)
    with precision.frozen_forward() if precision else contextlib.nullcontext():
        if shared_dir is None:
            cache = build_prefix_cache(frozen, records, start=top.start, batch_size=cfg.physical_batch_size,
                                       device=device, pad_id=pad_id, fingerprint=False)
            kept = "in memory only: private, like the records"
        else:
            dtype = precision.dtype_name if precision else "float32"
            cache, kept = shared_prefix_cache(model, records, top.start, cfg.physical_batch_size, device, pad_id,
                                              shared_dir, dtype, frozen)
    del frozen
    if cache.states.dtype != torch.float32:  # the trained blocks' residual stream stays float32
        cache = PrefixCache(cache.states.float(), cache.offsets, cache.start, cache.meta)
    return FrozenPrefix(cache, top, head_loss), (
        f"frozen-prefix cache: blocks 0-{top.start - 1} run once per record ({cache.nbytes / 2**20:.0f} MiB, "
        f"{kept}); each step runs blocks {top.start}-{top.depth - 1} and the frozen head's loss at the "
        f"review's tokens")


def frozen_copy(model: nn.Module, precision: Precision | None) -> nn.Module:
    """What runs the frozen blocks while the cache is built: a bf16 copy of `model` on a CPU where bf16
    was chosen (measured 4x float32 there, against 2.7x for autocast, which casts the float32 weights at
    every call), else `model` itself (on a GPU autocast is as fast; a 4-bit base is never copied)."""
    if precision is None or precision.dtype != torch.bfloat16 or precision.device_type != "cpu":
        return model
    if any(getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8 for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)


def shared_prefix_cache(model: nn.Module, records: Records, start: int, batch_size: int, device: str, pad_id: int,
                        shared_dir: Path, dtype: str = "float32",
                        frozen: nn.Module | None = None) -> tuple[PrefixCache, str]:
    """The prefix cache of these records and frozen weights from `shared_dir`, built and saved there first
    if no earlier run did; and where it came from.

    The key hashes the records, the frozen weights below `start` and the batch size, device and
    compute dtype it is built with (batching and the format change the float rounding of the states,
    so a shared cache gives a run exactly the states it would have built itself). The directory is
    private (0700), like the records.
    """
    records_hash, frozen_hash = records_fingerprint(records.input_ids), frozen_fingerprint(model, start)
    key = hashlib.sha256(f"{records_hash}:{frozen_hash}:{batch_size}:{torch.device(device).type}:{dtype}".encode())
    directory = shared_dir / f"prefix-cache-{key.hexdigest()[:16]}"
    with building_lock(directory):  # runs that need this cache at once: the first builds it, the others map it
        if (directory / CACHE_FILE).exists():
            try:
                cache = PrefixCache.load(directory, mmap=True)
                if cache.meta.get("records") == records_hash and cache.meta.get("frozen") == frozen_hash:
                    return cache, f"shared by the sweep's runs, mapped from {directory} (private)"
            except DamagedFile as why:  # never used: built again and replaced
                print(f"{why}: building it again")
        cache = build_prefix_cache(frozen if frozen is not None else model, records, start=start,
                                   batch_size=batch_size, device=device, pad_id=pad_id, fingerprint=False)
        cache.meta["frozen"] = frozen_hash  # the float32 weights' identity, whatever format ran them
        cache.save(directory)
    return cache, f"built and saved for the sweep's other runs in {directory} (private)"
