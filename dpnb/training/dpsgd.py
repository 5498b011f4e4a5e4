"""The DP-SGD step with Opacus: the training session and its logical steps.

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
exactly this q (`dpnb.training.plan`). The records and the per-record loss l_i are
`dpnb.training.loss`; the fast path for top-block training is `dpnb.training.frozen_prefix`.

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
from the same criterion (`reduction = "none"`).

The non-DP baseline (`dp: false`) takes the same steps: the same Poisson-sampled logical batches
(same q, same seed, same number of steps), cut into the same physical batches, with the plain
gradient of the logical batch's mean loss; no PrivacyEngine, no clipping, no noise, epsilon null.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from dpnb.errors import require
from dpnb.models import quiet_transformers
from dpnb.precision import Precision, choose
from dpnb.privacy import accounting
from dpnb.training import distributed
from dpnb.training.frozen_prefix import FrozenPrefix
from dpnb.training.loss import Records, SequenceLoss, collate, per_record_loss
from dpnb.training.plan import TrainingPlan
from dpnb.training.prefix_cache import collate_cached

if TYPE_CHECKING:
    from torch import nn

    from dpnb.config import FinetuneConfig


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


# =========================================================================== making the session


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
