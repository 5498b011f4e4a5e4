"""The DP-SGD step with Opacus: records, batches, the per-record loss, the plan, the logical steps.

One logical (noise-adding) step of DP-SGD on N records, as Opacus runs it here:

1. Poisson sampling. Every record joins the step's logical batch B independently with probability
   q = 1 / ceil(N / logical_batch_size) (Opacus's `DPDataLoader`), so |B| is random with mean N q.
   The privacy analysis (amplification by subsampling) assumes exactly this.
2. Per-record gradients g_i = grad l_i, where l_i is the record's own loss: the mean next-token
   cross-entropy over its tokens (padding never counts).
3. Clipping to C (`max_grad_norm`): g_i <- g_i * min(1, C / ||g_i||), so no record can move the
   sum by more than C.
4. Noise: G = (sum_{i in B} g_i + N(0, sigma^2 C^2 I)) / E. The divisor E is the *expected* batch
   size (Opacus's `expected_batch_size` = int(N q)), a public constant; dividing by the drawn size
   |B| would reveal how many records were sampled.
5. An AdamW update with G.

sigma (the noise multiplier) is fixed before training, calibrated so that the accountant (PRV or
RDP, `dpnb.privacy`) reports the target epsilon after exactly the T steps the loop will take at
exactly this q (`dpnb.training.plan`).

The logical batch is cut into physical batches (what fits in memory) by Opacus's
`BatchMemoryManager`, which tells the optimizer which physical batch ends a logical one: only that
one adds noise, updates the weights and counts one step in the accountant. A hand-written
accumulation loop would make Opacus count every physical batch as a step at a wrong sampling rate.
A logical batch that drew no record is still a step of the mechanism: its update is pure noise,
and the accountant counts it.

Loss reduction, precisely. Opacus's hooks assume the loss of a physical batch of n records is
`mean_i l_i` (loss_reduction="mean") and multiply the back-propagated signal by n, which recovers
g_i = grad l_i for each record, whatever n is; Poisson sampling makes n vary, and that is fine.
The optimizer then divides the noisy sum by E, not by n. Ghost clipping gets the per-record losses
from the same criterion (`reduction = "none"`). Records are padded on the right; padding is masked
by each record's length, never by token id, because the pad token is EOS for SmolLM2 and the EOS
closing each record must be learned. By default the prompt tokens are not in the loss
(`loss_on_prompt`): the model learns the review given its label prompt, which is what generation
asks of it.

The non-DP baseline (`dp: false`) takes the same steps: the same Poisson-sampled logical batches
(same q, same seed, same number of steps), cut into the same physical batches, with the plain
gradient of the logical batch's mean loss; no PrivacyEngine, no clipping, no noise, epsilon null.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import random
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from dpnb.errors import DpnbError, require
from dpnb.io import DamagedFile
from dpnb.models import quiet_transformers
from dpnb.precision import Precision, choose
from dpnb.privacy import accounting
from dpnb.training import distributed
from dpnb.training.head_loss import FrozenHeadLoss
from dpnb.training.plan import TrainingPlan
from dpnb.training.prefix_cache import (
    CACHE_FILE,
    PrefixCache,
    TopBlocks,
    build_prefix_cache,
    building_lock,
    collate_cached,
    frozen_fingerprint,
    records_fingerprint,
)

if TYPE_CHECKING:
    import datasets
    from torch import nn

    from dpnb.config import FinetuneConfig


# =========================================================================== records and the loss


@dataclass(frozen=True)
class Records:
    """The tokenised training records: ids (prompt + review + EOS) and each prompt's length."""

    input_ids: list[list[int]]
    prompt_lengths: list[int]

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset) -> Records:
        require("input_ids" in dataset.column_names,
                f"the training data has no input_ids column (columns: {', '.join(dataset.column_names)}); "
                f"prepare it with the prepare stage (dpnb.data)")
        ids = [[int(t) for t in row] for row in dataset["input_ids"]]
        if "prompt_length" in dataset.column_names:
            prompts = [int(n) for n in dataset["prompt_length"]]
        else:
            prompts = [0] * len(ids)
        require(all(len(row) >= 2 for row in ids),
                "every training record needs at least two tokens (one to predict from, one to predict)")
        return cls(ids, prompts)

    def __len__(self) -> int:
        return len(self.input_ids)

    def fingerprint(self) -> str:
        """A hash of the token ids and prompt lengths: a checkpoint resumes only on the same records."""
        lengths = np.array([len(row) for row in self.input_ids], dtype=np.int64)
        flat = np.fromiter((t for row in self.input_ids for t in row), dtype=np.int64, count=int(lengths.sum()))
        digest = hashlib.sha256()
        for array in (lengths, np.array(self.prompt_lengths, dtype=np.int64), flat):
            digest.update(array.tobytes())
        return digest.hexdigest()


@dataclass
class Batch:
    """A right-padded physical batch, with the targets each position predicts and which of them count."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on real tokens
    position_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T-1], input_ids shifted left by one
    target_mask: torch.Tensor  # [B, T-1], 1 where the target is a real token inside the loss

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: str | torch.device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def collate(records: Records, indices: Sequence[int], pad_id: int, loss_on_prompt: bool = False) -> Batch:
    """Pad `records[indices]` on the right and mark the targets of the loss.

    Position j predicts token j+1; it counts when token j+1 is a real token (j+1 < length) and,
    unless `loss_on_prompt`, not part of the prompt (j+1 >= prompt_length). Padding is found from
    the lengths, never from the pad id (which is EOS for some tokenizers). `position_ids` are built
    with `repeat`, one row per record: GPT-2's per-record position gradients need a real [B, T]
    tensor, not an `expand`ed view (opacus issue #841); for right padding they are 0..T-1.
    """
    rows = [records.input_ids[i] for i in indices]
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for k, row in enumerate(rows):
        input_ids[k, : len(row)] = torch.tensor(row, dtype=torch.long)
    positions = torch.arange(width).unsqueeze(0)
    attention_mask = (positions < lengths.unsqueeze(1)).long()
    first_target = torch.ones(len(rows), dtype=torch.long)
    if not loss_on_prompt:
        prompts = torch.tensor([records.prompt_lengths[i] for i in indices])
        first_target = torch.clamp(prompts, min=1)
    target_positions = positions[:, 1:]  # the index of the token each position predicts
    target_mask = (target_positions < lengths.unsqueeze(1)) & (target_positions >= first_target.unsqueeze(1))
    return Batch(input_ids, attention_mask, positions.repeat(len(rows), 1), input_ids[:, 1:].clone(),
                 target_mask.float())


def per_record_loss(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """l_i = sum_t mask_it * CE(logits_it, target_it) / sum_t mask_it: one mean token loss per record.

    `logits` are the model's outputs at positions 0..T-2 ([B, T-1, V]); computed in float32 so a
    bfloat16 model still gets an accurate loss.
    """
    batch, steps, vocab = logits.shape
    token_loss = F.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction="none")
    token_loss = token_loss.view(batch, steps) * target_mask
    return token_loss.sum(dim=1) / target_mask.sum(dim=1).clamp(min=1)


class SequenceLoss:
    """The per-record loss reduced as `reduction` says ("mean", "sum" or "none").

    Opacus's ghost clipping calls it with `reduction = "none"` to get one loss per record.
    """

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        losses = per_record_loss(logits, targets, target_mask)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


# =========================================================================== the session


class _RecordIndices:
    """A map-style dataset whose item i is `tensor([i])`: the loader draws indices, `collate` pads.

    (A 1-element tensor rather than an int: Opacus's DPDataLoader inspects `dataset[0]` as a sequence
    to shape an empty batch.)
    """

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index])


def batch_indices(batch: Any) -> list[int]:
    """The record indices of a collated batch (an empty batch may come as a list of empty tensors)."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0] if batch else torch.empty(0)
    return [int(i) for i in batch.reshape(-1).tolist()]


@dataclass
class Session:
    """The objects one training run steps: model, optimizer(s), Poisson loader, RNGs, accountant."""

    model: nn.Module  # what the forward pass runs (Opacus's GradSampleModule under DP)
    trainable: nn.Module  # the unwrapped model, whose weights are saved
    optimizer: Any  # Opacus's DPOptimizer under DP, else the AdamW below
    adamw: torch.optim.Optimizer  # the underlying AdamW (the DPOptimizer steps it)
    scheduler: Any
    loader: Any  # DPDataLoader: Poisson-sampled logical batches of record indices
    criterion: Any
    engine: Any  # opacus.PrivacyEngine, None without DP
    sampler_rng: torch.Generator
    noise_rng: torch.Generator | None
    ghost: bool
    prefix: FrozenPrefix | None = None  # the fast path for top-block training, when it applies
    autocast: torch.dtype | None = None  # bf16 under mixed precision (compute_precision), else None

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Where the forward pass runs: bf16 autocast under mixed precision, else as it is."""
        if self.autocast is None:
            return contextlib.nullcontext()
        device_type = next(self.trainable.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.autocast)


# =========================================================================== the fast path for top-block training


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


# =========================================================================== precision


def compute_precision(cfg: FinetuneConfig, device: str) -> Precision:
    """The precision of this training run (`dpnb.precision`), and why: what `Precision.reason` says.

    Mixed precision: the matmuls of the trainable blocks' forward and backward pass run in bf16
    (autocast), and so do the frozen computations around them (the frozen-prefix cache, the frozen
    head's loss), while the trainable weights, the per-sample gradients (`promote_grad_samples`),
    their norms, the clipping factors min(1, C / ||g_i||), the clipped sum, the Gaussian noise and
    AdamW's state stay float32. "auto" takes it where bf16 is measured to be fast (a CUDA GPU with
    bf16, a CPU with bf16 units) and never with ghost clipping (Opacus would take its norms from bf16
    activations) or a 4-bit base on a CPU.

    TF32 on CUDA. TF32 rounds a float32 matmul's inputs to a 10-bit mantissa. It is allowed for the
    float32 matmuls of the forward and backward pass, which only compute each record's gradient g_i
    (the norm is then taken of that g_i, whatever its rounding), and switched off while Opacus clips
    and sums (`float32_clipping`, around `pre_step`): there the clipped sum
    sum_i min(1, C / ||g_i||) g_i is an einsum that runs as a matmul, and TF32 would round g_i and the
    clip factors after the norms were taken, letting a record move the sum by up to about 0.2% more
    than C. So each record's contribution has norm at most C up to float32 rounding. Ghost clipping
    takes its norms and forms the clipped sum inside the backward passes, so under DP with ghost
    clipping TF32 stays off for the whole step.
    """
    cuda = torch.device(device).type == "cuda"
    tf32 = cuda and not (cfg.dp and cfg.grad_sample_mode == "ghost")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # float32 matmuls on tensor cores (10-bit mantissa inputs)
        torch.backends.cudnn.allow_tf32 = tf32
    if cfg.dtype == "bfloat16":
        return Precision(torch.bfloat16, None, torch.device(device).type, None, "weights in bfloat16 (no DP)")
    ghost = cfg.dp and cfg.grad_sample_mode == "ghost"
    if cfg.precision == "auto" and (ghost or (cfg.mode == "qlora" and not cuda)):
        why = "ghost clipping" if ghost else "a 4-bit base on the CPU"
        return Precision(torch.float32, None, torch.device(device).type, None, f"precision auto: float32 with {why}")
    return choose(cfg.precision, device, trainable=True)


@contextlib.contextmanager
def float32_clipping() -> Iterator[None]:
    """TF32 off (CUDA matmuls and cuDNN) while Opacus clips, sums and noises; the flags as they were after.

    Wraps `pre_step` (clip_and_accumulate: per-record norms, clip factors and the clipped sum as an
    einsum, accumulated over physical batches; then the noise and the division by E), so that the sum
    is formed in true float32 even when TF32 speeds up the forward and backward pass
    (`compute_precision`). A no-op on the CPU, where TF32 does not exist.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def promote_grad_samples(params: Sequence[torch.Tensor]) -> None:
    """Per-sample gradients computed in bf16 (under autocast) as float32, before Opacus takes their norms.

    Opacus computes each record's norm from `p.grad_sample` in its own dtype; a bf16 norm is rounded to
    8 significant bits, and one rounded down would let a record's clipped gradient exceed C by up to
    0.4%. Promoting first makes the norms, and everything after them, float32.
    """
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.dtype != torch.float32 and p.dtype == torch.float32:
            p.grad_sample = sample.float()


# =========================================================================== one training session


def noise_generators(cfg: FinetuneConfig, device: str) -> tuple[torch.Generator, torch.Generator]:
    """The generators of the Poisson sampler and of the noise.

    By default both are seeded from 64 bits of OS entropy (`secrets`), never written to a shareable
    file: whoever holds the config and the model cannot regenerate the noise or the batches, which
    the guarantee needs. (Their states are saved in the private checkpoint, so a resumed run
    continues exactly.) They are torch's Mersenne Twister generators, not cryptographic ones, and
    the Gaussian samples are not hardened against floating-point attacks: Opacus's secure_mode
    would do both, but needs torchcsprng, which has no build for this torch. `deterministic: true`
    seeds them from the config seed instead: reproducible, for tests and teaching, not a DP release.

    Under torchrun every rank has its own streams: OS entropy drawn by each process, or, when
    deterministic, seeds seed + 2 r and seed + 2 r + 1 for rank r (rank 0's are the single-process
    ones). Ranks sharing a sampler stream would keep the same positions of their shares together.
    """
    if cfg.deterministic:
        offset = 2 * distributed.rank()
        sampler_seed, noise_seed = cfg.seed + offset, cfg.seed + offset + 1
    else:
        sampler_seed, noise_seed = secrets.randbits(63), secrets.randbits(63)
    return torch.Generator().manual_seed(sampler_seed), torch.Generator(device=device).manual_seed(noise_seed)


def make_session(model: nn.Module, cfg: FinetuneConfig, plan: TrainingPlan, device: str,
                 accountant_history: list | None = None, prefix: FrozenPrefix | None = None,
                 precision: Precision | None = None) -> Session:
    """Wrap `model` for training: AdamW, the Poisson loader and, under DP, Opacus's PrivacyEngine.

    With `prefix`, what runs each step (and what Opacus wraps) is its top blocks, not the whole model;
    the trainable weights are the model's own either way. Under a process group (torchrun) that
    module is wrapped in Opacus's DPDDP, so make_private builds the distributed optimizer (noise on
    rank 0 only) and sampler (`dpnb.training.distributed`); q, sigma and E are the single-process ones.
    """
    require_dp_when_distributed(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    require(params, f"mode {cfg.mode} left no trainable parameter; check finetune.lora_targets")
    if cfg.dp:
        require_float32_weights(params)
    adamw = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    final = plan.steps

    def lr_factor(step: int) -> float:
        return 1.0 if cfg.lr_schedule == "constant" else max(0.0, 1.0 - step / final)

    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_factor)
    sampler_rng, noise_rng = noise_generators(cfg, device)
    # Opacus derives the accounted q = 1 / len(loader) and E = int(len(dataset) q) from this loader over the
    # plan's N (batch_size only sets len(loader) = ceil(N / B)); the records sampled are the dataset_size there are
    plain = DataLoader(_RecordIndices(plan.plan_size), batch_size=plan.logical_batch_size, generator=sampler_rng)
    poisson = DPDataLoader(_RecordIndices(plan.dataset_size), sample_rate=plan.sample_rate, generator=sampler_rng)
    stepped = prefix.top if prefix is not None else model
    if distributed.is_distributed():
        stepped = distributed.wrap_for_dp(stepped)
    if not cfg.dp:  # the same Poisson sampling, nothing private about it
        session = Session(stepped, model, adamw, adamw, scheduler, poisson, SequenceLoss("none"), None,
                          sampler_rng, None, False, prefix)
    else:
        with quiet_transformers():
            engine = PrivacyEngine(accountant=cfg.accountant)
            if accountant_history:
                engine.accountant = accounting.restore_accountant(cfg.accountant, accountant_history)
            wrapped = engine.make_private(
                module=stepped, optimizer=adamw, data_loader=plain, noise_multiplier=plan.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, loss_reduction="mean",
                grad_sample_mode=cfg.grad_sample_mode, criterion=SequenceLoss("mean"), noise_generator=noise_rng,
            )
        ghost = cfg.grad_sample_mode == "ghost"
        if ghost:
            dp_model, dp_optimizer, criterion, loader = wrapped
        else:
            (dp_model, dp_optimizer, loader), criterion = wrapped, SequenceLoss("mean")
        if distributed.is_distributed():
            loader = distributed.every_step_loader(loader, sampler_rng, poisson.dataset)
        else:
            loader = poisson
        session = Session(dp_model, model, dp_optimizer, adamw, scheduler, loader, criterion, engine,
                          sampler_rng, noise_rng, ghost, prefix)
    session.autocast = (precision or compute_precision(cfg, device)).autocast
    # training on any other q, steps or divisor than the plan's would void the calibration
    loader_rate = session.loader.batch_sampler.sample_rate
    if len(session.loader) != plan.steps_per_epoch or loader_rate != plan.sample_rate:
        raise RuntimeError(f"the loader samples at q = {loader_rate} with {len(session.loader)} steps per epoch, "
                           f"the plan at q = {plan.sample_rate} with {plan.steps_per_epoch}")
    if session.engine is not None:
        # each rank divides by its share E / W of the public divisor E = int(N q); the sum over ranks then
        # divides by E, as one process does (dpnb.training.distributed)
        divisor = session.optimizer.expected_batch_size * distributed.world_size()
        if not math.isclose(divisor, plan.divisor):
            raise RuntimeError(f"the optimizer divides by {divisor} in all, the plan by int(N q) = {plan.divisor}")
    return session


def require_float32_weights(params: Sequence[torch.Tensor]) -> None:
    """Under DP every trainable tensor is float32 (a base model passed to `train` in bf16 is refused).

    Opacus takes the per-record norms, the clipping factors, the clipped sum, its accumulation over
    physical batches and the noise in the dtype of the per-sample gradients, which is the weights'
    (or float32 after `promote_grad_samples` under bf16 autocast). In bf16 a norm rounded down lets a
    record's clipped gradient exceed C (by up to 2^-8), and the noise is drawn on bf16's coarse grid.
    """
    other = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.float32})
    require(not other, f"DP-SGD needs float32 trainable weights, but some are {', '.join(other)}; load the model in "
                       f"float32 (finetune.dtype float32) and use finetune.precision bf16-mixed for bf16 speed")


def require_dp_when_distributed(cfg: FinetuneConfig) -> None:
    """The non-DP baseline runs in one process: under torchrun it is refused, with the fix."""
    require(cfg.dp or not distributed.is_distributed(),
            "finetune.dp: false (the non-DP baseline) runs in one process only; launch it without torchrun "
            "(dpnb run config.yaml), or keep dp: true to train across processes")


def accounted_steps(session: Session, plan: TrainingPlan) -> int:
    """The noise-adding steps the accountant has counted, after checking each was taken at the planned sigma and q."""
    history = accounting.accountant_history(session.engine.accountant)
    for sigma, rate, _ in history:
        if not (math.isclose(sigma, plan.noise_multiplier) and math.isclose(rate, plan.sample_rate)):
            raise RuntimeError(f"the accountant saw steps at sigma={sigma}, q={rate}; the plan has "
                               f"sigma={plan.noise_multiplier}, q={plan.sample_rate}")
    return sum(count for _, _, count in history)


# =========================================================================== logical steps


@dataclass(frozen=True)
class StepResult:
    loss: float | None  # mean loss over the logical batch; None when Poisson sampling drew no record
    batch_size: int
    lr: float  # the learning rate of this step's update


def record_losses(session: Session, records: Records, indices: Sequence[int], pad_id: int, loss_on_prompt: bool,
                  device: str) -> torch.Tensor:
    """The per-record losses l_i of one physical batch, differentiable, by the fast path when it applies."""
    batch = collate(records, indices, pad_id, loss_on_prompt)
    if session.prefix is not None:
        cached = collate_cached(session.prefix.cache, batch, indices).to(device)
        with session.forward_context():
            final = session.model(**cached.model_inputs())
        return session.prefix.head_loss(final[:, :-1], cached.targets, cached.target_mask)
    batch = batch.to(device)
    with session.forward_context():
        logits = session.model(**batch.model_inputs()).logits[:, :-1]
    return per_record_loss(logits, batch.targets, batch.target_mask)  # in float32


def forward_losses(session: Session, records: Records, indices: Sequence[int], pad_id: int, loss_on_prompt: bool,
                   device: str) -> tuple[torch.Tensor, torch.Tensor | Any]:
    """Per-record losses (detached) and the tensor to back-propagate for one physical batch (DP)."""
    if session.ghost:
        batch = collate(records, indices, pad_id, loss_on_prompt).to(device)
        logits = session.model(**batch.model_inputs()).logits[:, :-1]
        loss = session.criterion(logits, batch.targets, batch.target_mask)  # Opacus's two-pass loss
        return loss.loss_per_sample.detach(), loss
    losses = record_losses(session, records, indices, pad_id, loss_on_prompt, device)
    return losses.detach(), losses.mean()  # loss_reduction="mean": Opacus multiplies back by len(batch)


def _empty_physical_batch(session: Session) -> None:
    """Let the DP optimizer clip, noise and count a step for a logical batch with no record in it.

    An empty Poisson batch is still a step of the mechanism: the update is pure noise and the
    accountant must count it. Opacus clips an empty per-sample gradient to a zero sum.
    """
    for p in session.optimizer.params:
        if session.ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def dp_logical_steps(session: Session, batches: Iterator[Any], records: Records, cfg: FinetuneConfig,
                     pad_id: int, device: str) -> Iterator[StepResult]:
    """Run physical batches from Opacus's BatchMemoryManager; yield after each noise-adding step.

    Under torchrun each rank runs its own share of the logical batch; at its end the gradients are
    summed across ranks (noise on rank 0 only) and the logged loss is the mean over all ranks' records.
    """
    total, count = 0.0, 0
    for raw in batches:
        indices = batch_indices(raw)
        if indices:
            losses, to_backward = forward_losses(session, records, indices, pad_id, cfg.loss_on_prompt, device)
            to_backward.backward()
            if session.autocast is not None:
                promote_grad_samples(session.optimizer.params)
            total, count = total + float(losses.sum()), count + len(indices)
        else:
            _empty_physical_batch(session)
        # pre_step clips and accumulates; it returns True only at the end of a logical batch, after
        # adding the noise and letting the accountant count the step
        with float32_clipping():
            stepped = session.optimizer.pre_step()
        lr = session.adamw.param_groups[0]["lr"]
        if stepped:
            distributed.reduce_gradients(session.optimizer)
            session.adamw.step()
            session.scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
        if stepped:
            total, summed_count = distributed.sum_across_ranks(total, count)
            count = round(summed_count)
            yield StepResult(total / count if count else None, count, lr)
            total, count = 0.0, 0


def plain_logical_steps(session: Session, batches: Iterator[Any], records: Records, cfg: FinetuneConfig,
                        pad_id: int, device: str) -> Iterator[StepResult]:
    """The non-DP loop: the same logical batches and physical split, the exact mean-loss gradient."""
    for raw in batches:
        indices = batch_indices(raw)
        total, lr = 0.0, session.adamw.param_groups[0]["lr"]
        if indices:
            for chunk in np.array_split(indices, math.ceil(len(indices) / cfg.physical_batch_size)):
                losses = record_losses(session, records, chunk.tolist(), pad_id, cfg.loss_on_prompt, device)
                (losses.sum() / len(indices)).backward()  # the mean over the whole logical batch
                total += float(losses.detach().sum())
            session.adamw.step()
        session.scheduler.step()
        session.adamw.zero_grad(set_to_none=True)
        yield StepResult(total / len(indices) if indices else None, len(indices), lr)


def epoch_steps(session: Session, records: Records, cfg: FinetuneConfig, pad_id: int, device: str, steps: int,
                mid_epoch: bool, sampler_state: torch.Tensor | None) -> Iterator[StepResult]:
    """The next `steps` logical steps of the current epoch (`mid_epoch`: some of its steps are done).

    The sampler's generator is restored (on resume) where the uninterrupted run had it: a data
    loader draws one number from it when it starts iterating, so a resumed epoch start restores
    before that draw, a resumed mid-epoch position after it.
    """
    session.loader.batch_sampler.steps = steps  # UniformWithReplacementSampler: logical batches per pass
    if sampler_state is not None and not mid_epoch:
        session.sampler_rng.set_state(sampler_state)
    if session.engine is None:
        batches = iter(session.loader)
        if sampler_state is not None and mid_epoch:
            session.sampler_rng.set_state(sampler_state)
        yield from plain_logical_steps(session, batches, records, cfg, pad_id, device)
        return
    with BatchMemoryManager(data_loader=session.loader, max_physical_batch_size=cfg.physical_batch_size,
                            optimizer=session.optimizer) as physical:
        batches = iter(physical)
        if sampler_state is not None and mid_epoch:
            session.sampler_rng.set_state(sampler_state)
        yield from dp_logical_steps(session, batches, records, cfg, pad_id, device)


def initial_loss(model: nn.Module, records: Records, cfg: FinetuneConfig, pad_id: int, device: str) -> float:
    """Step 0 of the log: the mean loss before any update, on min(N, logical batch) records drawn with the seed."""
    chosen = sorted(random.Random(cfg.seed).sample(range(len(records)), min(len(records), cfg.logical_batch_size)))
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(chosen), cfg.physical_batch_size):
            batch = collate(records, chosen[start : start + cfg.physical_batch_size], pad_id,
                            cfg.loss_on_prompt).to(device)
            logits = model(**batch.model_inputs()).logits[:, :-1]
            total += float(per_record_loss(logits, batch.targets, batch.target_mask).sum())
    model.train(was_training)
    return total / len(chosen)
