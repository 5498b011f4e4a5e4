"""A frozen-prefix cache: train only the top K transformer blocks without re-running the ones below.

The maths. A decoder of L blocks computes, for a record x (token ids, right-padded in a batch),

    h^0 = E(x)  (+ P(positions) for GPT-2),   h^{l+1} = block_l(h^l, mask, positions),
    y = norm(h^L),   logits = W y.

When every trainable parameter sits in blocks s..L-1 (s = L - K), the final norm or nowhere else
(embeddings and the LM head frozen), then h^s = f(x) depends on x and frozen weights only. If,
moreover, nothing below block s is random in training mode (dropout), f is deterministic and the
same for every step: compute h^s once per record (no grad, eval mode), keep it, and each training
step runs only blocks s..L-1, the final norm and the frozen head (`dpnb.training.head_loss`). The loss of
every record and its gradient with respect to every trainable parameter are then exactly those of
the full model (up to float rounding): the gradient never flows below block s anyway, since
nothing there is trainable, so DP-SGD (per-record gradients, clipping, noise) is unchanged.

Two more facts make the cached run match the full one:

- Attention of a real token never looks at padding (key mask) or the future (causal mask), so a
  record's states do not depend on what it was batched with: the cache keeps each record's states
  unpadded and `collate_cached` pads each physical batch to its own longest record (with zeros,
  which only padded query positions see, and which the loss mask ignores).
- The top blocks need what the full model gives them: the causal + padding mask built from the
  2-D attention mask (`create_causal_mask`, as `LlamaModel` / `GPT2Model` do) and, for Llama, the
  rotary embeddings of the position ids. GPT-2 adds its learned position embeddings at the input,
  so they are part of the cached h^s.

Privacy. The cached states are a function of the private records: keep them as private as the
records (in memory, or in a directory only the owner can read: `PrefixCache.save` creates it with
mode 0700 and refuses a directory others can read) and delete them with the run's other private
intermediates. They are never released; only the DP-trained weights are.

Faults. A saved cache carries a checksum of its contents, checked when it is loaded: a truncated or
corrupted file is never used (the sweep's shared cache is rebuilt). Runs that need the same shared
cache at once build it one at a time (`building_lock`): the later ones wait and map it.

Use in the training loop (Opacus hooks mode):

    cache = build_prefix_cache(model, records)            # once, before training
    top = TopBlocks(model)                                # blocks s..L-1 + final norm
    dp_top, optimizer, loader = engine.make_private(module=top, ...)  # Opacus wraps `top`, not the model
    batch = collate_cached(cache, collate(records, indices, pad_id), indices).to(device)  # per batch
    final = dp_top(**batch.model_inputs())                           # [B, T, d]
    losses = head_loss(final[:, :-1], head.weight, batch.targets, batch.target_mask)
    losses.mean().backward()                                          # loss_reduction="mean"

The trainable parameters are the model's own (TopBlocks holds references to its blocks), so the
weights are saved from the model as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from dpnb.errors import DpnbError
from dpnb.io import DamagedFile, load_torch_verified, save_torch_atomic

CACHE_FILE = "prefix_states.pt"
LOCK_FILE = "build.lock"  # `building_lock`
CACHE_FORMAT = 2  # 2: with a checksum of its contents
SUPPORTED = ("llama", "gpt2")


# =========================================================================== the model's anatomy


@dataclass(frozen=True)
class ModelParts:
    """Where a causal LM keeps what the cache splits: its decoder blocks, final norm and head."""

    kind: str  # "llama" or "gpt2"
    causal_lm: nn.Module  # the Hugging Face *ForCausalLM (unwrapped from peft)
    body: nn.Module  # LlamaModel / GPT2Model
    blocks: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module | None  # Llama's rotary embedding (no parameters); None for GPT-2

    @property
    def config(self) -> Any:
        return self.body.config

    @property
    def depth(self) -> int:
        return len(self.blocks)


def model_parts(model: nn.Module) -> ModelParts:
    """The parts of a Llama or GPT-2 causal LM, plain or wrapped by peft's `get_peft_model`."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal_lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise DpnbError(f"the prefix cache supports {', '.join(SUPPORTED)} models; {type(causal_lm).__name__} "
                        f"(model_type {kind!r}) is not one: train it without the cache")
    body = causal_lm.base_model
    head = causal_lm.get_output_embeddings()
    if kind == "llama":
        return ModelParts(kind, causal_lm, body, body.layers, body.norm, head, body.rotary_emb)
    return ModelParts(kind, causal_lm, body, body.h, body.ln_f, head, None)


def _module_ids(modules: Sequence[nn.Module]) -> set[int]:
    return {id(m) for top in modules for m in top.modules()}


def first_trainable_block(model: nn.Module) -> int:
    """The lowest block index s holding a trainable parameter (the depth L when only the final norm trains)."""
    parts = model_parts(model)
    for index, block in enumerate(parts.blocks):
        if any(p.requires_grad for p in block.parameters()):
            return index
    if any(p.requires_grad for p in parts.norm.parameters()):
        return parts.depth
    raise DpnbError("no decoder block (nor the final norm) of the model has a trainable parameter; "
                    "nothing to train through the prefix cache")


def check_frozen_prefix(model: nn.Module, start: int | None = None) -> int:
    """Check that blocks < `start` and everything outside the blocks (but the final norm) are frozen and
    deterministic; returns `start` (by default `first_trainable_block`).

    Deterministic means: no dropout with p > 0 in training mode (nor Llama's `attention_dropout`).
    The check reads the modules' current mode, as the uncached loop would run them: call it after
    `model.train()`; a frozen part deliberately left in eval mode passes.
    """
    parts = model_parts(model)
    start = first_trainable_block(model) if start is None else start
    if not 0 <= start <= parts.depth:
        raise DpnbError(f"start block {start} is outside 0..{parts.depth}")
    top = [*parts.blocks[start:], parts.norm]
    top_ids = _module_ids(top)
    top_params = {id(p) for m in top for p in m.parameters()}
    trainable_below = [name for name, p in parts.causal_lm.named_parameters()
                       if p.requires_grad and id(p) not in top_params]
    if trainable_below:
        listed = ", ".join(trainable_below[:5]) + (" ..." if len(trainable_below) > 5 else "")
        raise DpnbError(f"the prefix cache (from block {start}) needs everything below block {start}, the "
                        f"embeddings and the LM head frozen, but these are trainable: {listed}; freeze them "
                        f"(requires_grad_(False)) or train without the cache")
    stochastic = []
    for name, module in parts.causal_lm.named_modules():
        if id(module) in top_ids or not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            stochastic.append(f"{name} (p={module.p:g})")
        elif isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            stochastic.append(f"{name}.attention_dropout ({module.attention_dropout:g})")
    if stochastic:
        listed = ", ".join(stochastic[:5]) + (" ..." if len(stochastic) > 5 else "")
        raise DpnbError(
            f"the frozen part of the model (below block {start}) is random in training mode: {listed}. The "
            f"cache holds one deterministic state per record, which would not be what training sees; switch it "
            f"off: dropout 0 in the config (GPT-2: embd_pdrop, attn_pdrop, resid_pdrop; Llama: attention_dropout) "
            f"or put the frozen part in eval mode"
        )
    return start


def frozen_fingerprint(model: nn.Module, start: int) -> str:
    """sha256 of the frozen weights below block `start` (embeddings and blocks 0..start-1): what the
    cached states depend on besides the records."""
    parts = model_parts(model)
    top_params = {id(p) for m in [*parts.blocks[start:], parts.norm] for p in m.parameters()}
    digest = hashlib.sha256(f"{parts.kind}:{start}".encode())
    for name, p in parts.body.named_parameters():
        if id(p) in top_params:
            continue
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
    for name, buffer in parts.body.named_buffers():  # e.g. Llama's rotary inv_freq (used only above)
        if "rotary" not in name:
            digest.update(name.encode())
            digest.update(buffer.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def records_fingerprint(input_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of the records' token ids and lengths."""
    lengths = np.array([len(row) for row in input_ids], dtype=np.int64)
    flat = np.fromiter((t for row in input_ids for t in row), dtype=np.int64, count=int(lengths.sum()))
    digest = hashlib.sha256(lengths.tobytes())
    digest.update(flat.tobytes())
    return digest.hexdigest()


# =========================================================================== the cache


class _Captured(Exception):
    """Raised by the capturing hook to stop the forward pass once the wanted states are in hand."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states


@dataclass
class PrefixCache:
    """Each record's hidden states entering block `start`, unpadded, in one flat [tokens, d] tensor.

    Record i is `states[offsets[i]:offsets[i+1]]` (`cache[i]`). `meta` says what built it.
    """

    states: torch.Tensor  # [total tokens, d]
    offsets: torch.Tensor  # [N + 1], int64
    start: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.states[int(self.offsets[index]) : int(self.offsets[index + 1])]

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    @property
    def hidden_size(self) -> int:
        return int(self.states.shape[1])

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def padded(self, indices: Sequence[int], width: int | None = None) -> torch.Tensor:
        """The states of `indices`, right-padded with zeros to `width` (default: their longest) [B, T, d]."""
        lengths = [self.length(i) for i in indices]
        width = max(lengths, default=0) if width is None else width
        out = self.states.new_zeros((len(indices), width, self.hidden_size))
        for row, (index, length) in enumerate(zip(indices, lengths, strict=True)):
            if length > width:
                raise DpnbError(f"record {index} has {length} cached states, more than the width {width}")
            out[row, :length] = self[index]
        return out

    def verify(self, model: nn.Module | None = None, records: Any = None) -> None:
        """Raise unless the cache was built from these records (and this model's frozen weights)."""
        if records is not None:
            ids = getattr(records, "input_ids", records)
            if self.meta.get("records") != records_fingerprint(ids):
                raise DpnbError("the prefix cache was built from other records; rebuild it (build_prefix_cache)")
        if model is not None:
            if self.meta.get("frozen") is None:
                raise DpnbError("the prefix cache holds no fingerprint of the frozen weights; rebuild it")
            if self.meta["frozen"] != frozen_fingerprint(model, self.start):
                raise DpnbError(f"the prefix cache was built from other weights below block {self.start} (or "
                                f"another start block); rebuild it (build_prefix_cache)")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the cache to `directory`/prefix_states.pt (atomically, with a checksum of its contents); the
        directory is created private (0700) and must not be readable by others: the states are as sensitive
        as the records."""
        path = _private_directory(Path(directory))
        state = {"format": CACHE_FORMAT, "states": self.states.cpu(), "offsets": self.offsets.cpu(),
                 "start": self.start, "meta": dict(self.meta)}
        return save_torch_atomic(path / CACHE_FILE, state, private=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> PrefixCache:
        """The cache saved in `directory`; `mmap` maps the states from the file instead of reading them.

        The states are checked against the checksum saved with them (reading them once): a truncated or
        corrupted file, or one of another format, is a `DamagedFile` error, never used.
        """
        path = Path(directory) / CACHE_FILE
        if not path.exists():
            raise DpnbError(f"{path} does not exist; build the cache with build_prefix_cache and save it")
        saved = load_torch_verified(path, mmap=mmap)
        if saved.get("format") != CACHE_FORMAT:
            raise DamagedFile(f"{path} has cache format {saved.get('format')}, not {CACHE_FORMAT}; rebuild it")
        return cls(saved["states"], saved["offsets"], int(saved["start"]), dict(saved["meta"]))

    @staticmethod
    def delete(directory: str | os.PathLike) -> None:
        """Remove a saved cache (the directory too when it is left empty)."""
        path = Path(directory)
        (path / CACHE_FILE).unlink(missing_ok=True)
        (path / LOCK_FILE).unlink(missing_ok=True)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _private_directory(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:  # made earlier, or just now by another run of the sweep: it must be private
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise DpnbError(f"{path} is readable by others (mode {mode:o}); the prefix cache holds states computed "
                            f"from the private records: give a directory with mode 0700 (chmod 700 {path})") from None
    return path


@contextlib.contextmanager
def building_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold `directory`/build.lock exclusively: one process at a time looks for, builds and saves this cache.

    Two runs of a sweep that need the same cache at once: the second waits while the first builds
    and saves it, then maps it (a cache takes minutes to build; waiting costs nothing more). The lock
    is the kernel's (`flock`), so a process killed while holding it releases it. The directory is
    created private first (`PrefixCache.save`'s rule).
    """
    path = _private_directory(Path(directory))
    with open(path / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _TrainingModes:
    """Put every module in eval mode, then give each its own mode back (a frozen part may differ)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode


@torch.no_grad()
def build_prefix_cache(model: nn.Module, records: Any, start: int | None = None, batch_size: int = 8,
                       device: str | torch.device | None = None, pad_id: int = 0,
                       fingerprint: bool = True) -> PrefixCache:
    """The hidden states entering block `start` (default: the lowest trainable) of every record.

    `records` is a `dpnb.training.loss.Records` or a list of token-id lists. Records are run through the
    model's own embedding and lower blocks in eval mode, without grad, `batch_size` at a time
    (sorted by length, right-padded as `collate` pads: the pad id does not matter), and the forward
    pass stops at block `start`. States stay on `device` (default: the model's) only while computed
    and are kept on the CPU, in the dtype the model computes them in. `check_frozen_prefix` runs first.
    Memory: tokens x hidden size x 4 bytes in float32 (221 KB per 96-token SmolLM2 record).
    """
    parts = model_parts(model)
    start = check_frozen_prefix(model, start)
    ids = list(getattr(records, "input_ids", records))
    if not ids or any(len(row) == 0 for row in ids):
        raise DpnbError("the prefix cache needs at least one record, and no empty record")
    device = torch.device(device) if device is not None else next(parts.body.parameters()).device
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.long)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    states: torch.Tensor | None = None  # allocated at the first batch, in the dtype of the states
    target = parts.blocks[start] if start < parts.depth else parts.norm

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args[0] if args else kwargs["hidden_states"])

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    handle = target.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with _TrainingModes(parts.causal_lm):
            for first in range(0, len(order), batch_size):
                chosen = order[first : first + batch_size]
                width = int(lengths[chosen].max())
                input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
                for row, index in enumerate(chosen):
                    input_ids[row, : len(ids[index])] = torch.tensor(ids[index], dtype=torch.long)
                positions = torch.arange(width).unsqueeze(0)
                attention_mask = (positions < lengths[chosen].unsqueeze(1)).long()
                try:
                    parts.body(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               position_ids=positions.repeat(len(chosen), 1).to(device), use_cache=False)
                except _Captured as caught:
                    hidden = caught.states.detach().cpu()
                else:
                    raise RuntimeError(f"block {start} was never called by {type(parts.body).__name__}")
                if states is None:
                    states = hidden.new_empty((int(offsets[-1]), hidden.shape[-1]))
                for row, index in enumerate(chosen):
                    states[int(offsets[index]) : int(offsets[index + 1])] = hidden[row, : len(ids[index])]
    finally:
        handle.remove()
    assert states is not None  # at least one record, so at least one batch
    meta = {"kind": parts.kind, "depth": parts.depth, "start": start, "hidden_size": parts.config.hidden_size,
            "dtype": str(states.dtype).removeprefix("torch."), "records": records_fingerprint(ids),
            "frozen": frozen_fingerprint(model, start) if fingerprint else None}
    return PrefixCache(states, offsets, start, meta)


# =========================================================================== batches of cached states


@dataclass
class CachedBatch:
    """A right-padded physical batch of cached states, with the targets and mask of `loss.collate`."""

    hidden_states: torch.Tensor  # [B, T, d], zeros on padding
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T-1]
    target_mask: torch.Tensor  # [B, T-1]

    def __len__(self) -> int:
        return int(self.hidden_states.shape[0])

    def to(self, device: str | torch.device) -> CachedBatch:
        return CachedBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of `TopBlocks.forward`."""
        return {"hidden_states": self.hidden_states, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def collate_cached(cache: PrefixCache, batch: Any, indices: Sequence[int]) -> CachedBatch:
    """The cached states of records `indices`, padded like `batch` (their `dpnb.training.loss.collate`), with its
    targets, target mask, attention mask and position ids (so the loss counts the same tokens)."""
    indices = [int(i) for i in indices]
    lengths = batch.attention_mask.sum(dim=1).tolist()
    for index, length in zip(indices, lengths, strict=True):
        if cache.length(index) != int(length):
            raise DpnbError(f"the prefix cache holds {cache.length(index)} states for record {index}, which has "
                            f"{int(length)} tokens: the cache was built from other records")
    states = cache.padded(indices, width=int(batch.input_ids.shape[1]))
    return CachedBatch(states, batch.attention_mask, batch.position_ids, batch.targets, batch.target_mask)


# =========================================================================== the top blocks


class TopBlocks(nn.Module):
    """Blocks `start`..L-1 and the final norm of a causal LM: from cached states to final hidden states.

    `forward(hidden_states, attention_mask, position_ids)` builds the causal + padding mask from the
    2-D attention mask and (Llama) the rotary embeddings of `position_ids` exactly as the model's
    body does, runs the blocks and returns the normalised final hidden states [B, T, d] (the body's
    `last_hidden_state`). The blocks are the model's own modules (shared, not copied): training them
    here trains the model. Wrap this module (not the model) with Opacus.
    """

    def __init__(self, model: nn.Module, start: int | None = None, check: bool = True):
        super().__init__()
        parts = model_parts(model)
        start = check_frozen_prefix(model, start) if check else (first_trainable_block(model)
                                                                  if start is None else start)
        self.kind = parts.kind
        self.start = start
        self.depth = parts.depth
        self.config = parts.config
        self.blocks = nn.ModuleList(list(parts.blocks[start:]))
        self.norm = parts.norm
        self.rotary = parts.rotary

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        if self.kind == "llama":
            rotary = self.rotary(hidden_states, position_ids=position_ids)
            for block in self.blocks:
                hidden_states = block(hidden_states, attention_mask=mask, position_embeddings=rotary,
                                      position_ids=position_ids, use_cache=False)
        else:
            for block in self.blocks:
                hidden_states = block(hidden_states, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return self.norm(hidden_states)
