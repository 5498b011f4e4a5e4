"""02 finetune: differentially private fine-tuning of a pre-trained causal LM with Opacus.

One logical (noise-adding) step of DP-SGD, as Opacus runs it here:

1. Poisson sampling. Every record joins the step's logical batch independently with probability
   q = 1 / ceil(N / logical_batch_size) (Opacus's `DPDataLoader`), so the batch size is random
   with mean N*q. The privacy analysis (amplification by subsampling) assumes exactly this.
2. Per-record gradients g_i = grad l_i, where l_i is the record's own loss: the mean next-token
   cross-entropy over its tokens (padding never counts).
3. Clipping: g_i <- g_i * min(1, C / ||g_i||), so no record can move the sum by more than C.
4. Noise: G = (sum_i g_i + N(0, sigma^2 C^2 I)) / E. The divisor E is the *expected* batch size
   (Opacus's `expected_batch_size` = int(N*q)), a public constant; dividing by the drawn size would
   reveal how many records were sampled.
5. An AdamW update with G.

The logical batch is cut into physical batches (what fits in memory) by Opacus's
`BatchMemoryManager`, which tells the optimizer which physical batch ends a logical one: only that
one adds noise, updates the weights and counts one step in the accountant. A hand-written
accumulation loop would make Opacus count every physical batch as a step at a wrong sampling rate.
sigma is fixed before training, calibrated so that the accountant (PRV or RDP) reports the target
epsilon after exactly the number of steps the loop will take at exactly this q.

Loss reduction, precisely. Opacus's hooks assume the loss of a physical batch of n records is
`mean_i l_i` (loss_reduction="mean") and multiply the back-propagated signal by n, which recovers
g_i = grad l_i for each record, whatever n is; Poisson sampling makes n vary, and that is fine.
The optimizer then divides the noisy sum by the expected batch size E, not by n. Ghost clipping
gets the per-record losses from the same criterion (`reduction = "none"`). Records are padded on
the right; padding is masked by each record's length, never by token id, because the pad token is
EOS for SmolLM2 and the EOS closing each record must be learned. By default the prompt tokens are
not in the loss (`loss_on_prompt`): the model learns the review given its label prompt, which is
what generation asks of it.

The non-DP baseline (`dp: false`) runs the same loop: the same Poisson-sampled logical batches
(same q, same seed, same number of steps), cut into the same physical batches, with the plain
gradient of the logical batch's mean loss; no PrivacyEngine, no clipping, no noise, epsilon null.

What the logged losses are: train_log.jsonl holds the mean loss of each logical batch, computed
during its forward passes (with the weights before that step's update). Step 0 is the loss before
any update, on a fixed sample of min(N, logical_batch_size) records drawn with the seed, in eval mode.
These losses are statistics of the private data and are NOT covered by the DP guarantee; only the
weights (and what is sampled from them) are.

Interruption: a checkpoint (trainable weights, optimizer and scheduler state, accountant history,
every RNG state, data position) is written atomically every `checkpoint_every` logical steps and
when SIGINT or SIGTERM arrives (the loop finishes the current logical step first; a second signal
stops at once). Rerunning resumes from it with the same noise multiplier and the restored
accountant, so epsilon is never under-counted; a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpnb import privacy
from dpnb.config import FinetuneConfig
from dpnb.errors import DpnbError, require
from dpnb.models import quiet_transformers
from dpnb.rundir import (
    RunDir,
    append_jsonl,
    atomic_directory,
    config_fingerprint,
    library_versions,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)

if TYPE_CHECKING:
    import datasets
    import torch
    from matplotlib.figure import Figure
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STAGE = "finetune"
CHECKPOINT_FILE = "latest.pt"
CHECKPOINT_FORMAT = 1
MODEL_CARD = "dpnb_model.json"
# Config fields that do not change what is trained: a checkpoint written under other values resumes.
RESUME_NEUTRAL_FIELDS = ("checkpoint_every", "samples_before_after", "device")
# Library warnings that say nothing to a user of this module: the seeded (non-cryptographic) noise
# generator is recorded in privacy.json as "secure_rng": false; the backward-hook notice fires because
# the input ids, being integers, carry no gradient; peft calls a transformers method deprecated in v5.
_QUIET = ("Secure RNG turned off", "Full backward hook is firing", "`is_gradient_checkpointing` is deprecated")


class TrainingInterrupted(DpnbError):
    """Training stopped at a logical-step boundary after saving a checkpoint; rerunning resumes it."""


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
        import numpy as np

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
    import torch

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
    import torch.nn.functional as F

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


# =========================================================================== the model


def embeddings_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def untie_embeddings(model: PreTrainedModel) -> int:
    """Give the LM head its own copy of the input embedding (ghost clipping refuses shared weights).

    Returns the number of parameters this adds.
    """
    import torch

    embedding = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = torch.nn.Parameter(embedding.detach().clone())
    model.config.tie_word_embeddings = False
    return embedding.numel()


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of a model's linear layers (what LoRA can target)."""
    kinds = ("Linear", "Conv1D", "Linear4bit", "Linear8bitLt")
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if type(module).__name__ in kinds and name})


def lora_config(cfg: FinetuneConfig, model: PreTrainedModel) -> Any:
    """The peft LoraConfig of `cfg`, checked against the model's module names and depth."""
    from peft import LoraConfig

    available = linear_module_names(model)
    missing = [t for t in cfg.lora_targets if t not in available]
    require(not missing,
            f"finetune.lora_targets {missing} are not modules of {type(model).__name__}; its linear layers "
            f"are: {', '.join(available)} (GPT-2: c_attn, c_proj, c_fc; Llama: q_proj, k_proj, v_proj, o_proj)")
    layers = None
    if cfg.lora_top_layers is not None:
        depth = int(model.config.num_hidden_layers)
        require(cfg.lora_top_layers <= depth,
                f"finetune.lora_top_layers = {cfg.lora_top_layers} but the model has {depth} layers; "
                f"give at most {depth}")
        layers = list(range(depth - cfg.lora_top_layers, depth))
    # GPT-2's Conv1D layers store their weight transposed; peft must be told
    conv1d = any(type(module).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in cfg.lora_targets
                 for name, module in model.named_modules())
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), layers_to_transform=layers, fan_in_fan_out=conv1d,
                      task_type="CAUSAL_LM")


def is_quantized_4bit(model: nn.Module) -> bool:
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def build_model(model_name: str, cfg: FinetuneConfig, device: str,
                base_model: PreTrainedModel | None = None) -> tuple[nn.Module, list[str]]:
    """The model to train, with exactly the weights of `cfg.mode` trainable, and notes for the log.

    full: every weight (untied from the input embedding first for ghost clipping). lora: peft
    adapters on a frozen base. qlora: the base loaded in 4-bit NF4 (frozen) with LoRA adapters on
    top. The base is moved to `device` before peft wraps it (opacus issue #820: with newer peft,
    LoRA updates were silently corrupted when the model reached its device only after wrapping).
    """
    from dpnb.models import load_causal_lm

    notes: list[str] = []
    if cfg.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        model = base_model or load_causal_lm(model_name, dtype=cfg.dtype, quantize_4bit=True, device=device,
                                             seed=cfg.seed)
        require(is_quantized_4bit(model),
                f"mode qlora needs a base that bitsandbytes can quantise, but {model_name} loaded unquantised "
                f"(tiny test presets are built in memory: save one with save_pretrained and pass the directory)")
        # casts the few unquantised weights (norms, embeddings) to float32 and freezes everything;
        # gradient checkpointing stays off: Opacus's hooks need each layer's activations
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = (base_model or load_causal_lm(model_name, dtype=cfg.dtype, seed=cfg.seed)).to(device)
    if cfg.mode == "full":
        model.requires_grad_(True)
        if cfg.dp and cfg.grad_sample_mode == "ghost" and embeddings_tied(model):
            added = untie_embeddings(model)
            notes.append(f"ghost clipping does not support tied weights: the LM head was untied from the input "
                         f"embedding, adding {added:,} trainable parameters")
        return model, notes
    from peft import get_peft_model

    with quiet_warnings():
        model = get_peft_model(model, lora_config(cfg, model))
    return model, notes


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# =========================================================================== the plan


@dataclass(frozen=True)
class TrainingPlan:
    """What the loop will do, fixed before it starts: the numbers the privacy guarantee is made of."""

    dp: bool
    dataset_size: int
    logical_batch_size: int
    physical_batch_size: int
    sample_rate: float  # q, the Poisson sampling probability of each record at each step
    expected_batch_size: float  # N * q
    steps_per_epoch: int
    steps: int  # logical steps the loop takes
    delta: float | None
    noise_multiplier: float | None  # sigma; None without DP
    accountant: str
    target_epsilon: float | None


@functools.lru_cache(maxsize=64)
def _calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """`privacy.calibrate_noise`, remembered: a resumed or repeated run in one process asks it again."""
    return privacy.calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)


def plan_training(cfg: FinetuneConfig, dataset_size: int) -> TrainingPlan:
    """Check the N-dependent parameters and calibrate sigma for exactly the steps the loop will take."""
    n, batch = dataset_size, cfg.logical_batch_size
    require(n > 0, "the training set is empty; prepare some records first")
    require(batch <= n, f"finetune.logical_batch_size ({batch}) is larger than the training set ({n} records); "
                        f"make it at most {n}")
    sample_rate = privacy.poisson_sample_rate(n, batch)
    per_epoch = privacy.steps_per_epoch(n, batch)
    steps = privacy.planned_steps(n, batch, cfg.epochs, cfg.max_steps)
    delta = sigma = None
    if cfg.dp:
        delta = cfg.delta if cfg.delta is not None else privacy.default_delta(n)
        privacy.validate_delta(delta, n)
        sigma = _calibrate_noise(cfg.target_epsilon, delta, sample_rate, steps, cfg.accountant)
    return TrainingPlan(cfg.dp, n, batch, cfg.physical_batch_size, sample_rate, n * sample_rate, per_epoch,
                        steps, delta, sigma, cfg.accountant, cfg.target_epsilon if cfg.dp else None)


# =========================================================================== one training session


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
        import torch

        return torch.tensor([index])


def batch_indices(batch: Any) -> list[int]:
    """The record indices of a collated batch (an empty batch may come as a list of empty tensors)."""
    import torch

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


def make_session(model: nn.Module, cfg: FinetuneConfig, plan: TrainingPlan, device: str,
                 accountant_history: list | None = None) -> Session:
    """Wrap `model` for training: AdamW, the Poisson loader and, under DP, Opacus's PrivacyEngine."""
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    require(params, f"mode {cfg.mode} left no trainable parameter; check finetune.lora_targets")
    adamw = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    final = plan.steps

    def lr_factor(step: int) -> float:
        return 1.0 if cfg.lr_schedule == "constant" else max(0.0, 1.0 - step / final)

    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, lr_factor)
    sampler_rng = torch.Generator().manual_seed(cfg.seed)
    # batch_size only sets len(loader) = ceil(N / B); Opacus derives q = 1 / len(loader) from it
    plain = DataLoader(_RecordIndices(plan.dataset_size), batch_size=plan.logical_batch_size,
                       generator=sampler_rng)
    if not cfg.dp:
        loader = DPDataLoader.from_data_loader(plain)  # the same Poisson sampling, nothing private about it
        session = Session(model, model, adamw, adamw, scheduler, loader, SequenceLoss("none"), None,
                          sampler_rng, None, False)
    else:
        from opacus import PrivacyEngine

        noise_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        with quiet_warnings():
            engine = PrivacyEngine(accountant=cfg.accountant)
            if accountant_history:
                engine.accountant = privacy.restore_accountant(cfg.accountant, accountant_history)
            wrapped = engine.make_private(
                module=model, optimizer=adamw, data_loader=plain, noise_multiplier=plan.noise_multiplier,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, loss_reduction="mean",
                grad_sample_mode=cfg.grad_sample_mode, criterion=SequenceLoss("mean"), noise_generator=noise_rng,
            )
        ghost = cfg.grad_sample_mode == "ghost"
        if ghost:
            dp_model, dp_optimizer, criterion, loader = wrapped
        else:
            (dp_model, dp_optimizer, loader), criterion = wrapped, SequenceLoss("mean")
        session = Session(dp_model, model, dp_optimizer, adamw, scheduler, loader, criterion, engine,
                          sampler_rng, noise_rng, ghost)
    # Opacus computes q from the loader itself; training on any other q would void the calibration
    loader_rate = 1 / len(session.loader)
    if len(session.loader) != plan.steps_per_epoch or not math.isclose(loader_rate, plan.sample_rate):
        raise RuntimeError(f"Opacus samples at q = {loader_rate} with {len(session.loader)} steps per epoch, "
                           f"the plan at q = {plan.sample_rate} with {plan.steps_per_epoch}")
    return session


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Hide the library warnings listed in `_QUIET` (and only those)."""
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        yield


@dataclass(frozen=True)
class StepResult:
    loss: float | None  # mean loss over the logical batch; None when Poisson sampling drew no record
    batch_size: int
    lr: float  # the learning rate of this step's update


def _forward_losses(session: Session, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | Any]:
    """Per-record losses (detached) and the tensor to back-propagate for one physical batch (DP)."""
    logits = session.model(**batch.model_inputs()).logits[:, :-1]
    if session.ghost:
        loss = session.criterion(logits, batch.targets, batch.target_mask)  # Opacus's two-pass loss
        return loss.loss_per_sample.detach(), loss
    losses = per_record_loss(logits, batch.targets, batch.target_mask)
    return losses.detach(), losses.mean()  # loss_reduction="mean": Opacus multiplies back by len(batch)


def _empty_physical_batch(session: Session) -> None:
    """Let the DP optimizer clip, noise and count a step for a logical batch with no record in it.

    An empty Poisson batch is still a step of the mechanism: the update is pure noise and the
    accountant must count it. Opacus clips an empty per-sample gradient to a zero sum.
    """
    import torch

    for p in session.optimizer.params:
        if session.ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def dp_logical_steps(session: Session, batches: Iterator[Any], records: Records, cfg: FinetuneConfig,
                     pad_id: int, device: str) -> Iterator[StepResult]:
    """Run physical batches from Opacus's BatchMemoryManager; yield after each noise-adding step."""
    total, count = 0.0, 0
    for raw in batches:
        indices = batch_indices(raw)
        if indices:
            batch = collate(records, indices, pad_id, cfg.loss_on_prompt).to(device)
            losses, to_backward = _forward_losses(session, batch)
            to_backward.backward()
            total, count = total + float(losses.sum()), count + len(indices)
        else:
            _empty_physical_batch(session)
        # pre_step clips and accumulates; it returns True only at the end of a logical batch, after
        # adding the noise and letting the accountant count the step
        stepped = session.optimizer.pre_step()
        lr = session.adamw.param_groups[0]["lr"]
        if stepped:
            session.adamw.step()
            session.scheduler.step()
        session.optimizer.zero_grad(set_to_none=True)
        if stepped:
            yield StepResult(total / count if count else None, count, lr)
            total, count = 0.0, 0


def plain_logical_steps(session: Session, batches: Iterator[Any], records: Records, cfg: FinetuneConfig,
                        pad_id: int, device: str) -> Iterator[StepResult]:
    """The non-DP loop: the same logical batches and physical split, the exact mean-loss gradient."""
    import numpy as np

    for raw in batches:
        indices = batch_indices(raw)
        total, lr = 0.0, session.adamw.param_groups[0]["lr"]
        if indices:
            for chunk in np.array_split(indices, math.ceil(len(indices) / cfg.physical_batch_size)):
                batch = collate(records, chunk.tolist(), pad_id, cfg.loss_on_prompt).to(device)
                logits = session.model(**batch.model_inputs()).logits[:, :-1]
                losses = per_record_loss(logits, batch.targets, batch.target_mask)
                (losses.sum() / len(indices)).backward()  # the mean over the whole logical batch
                total += float(losses.detach().sum())
            session.adamw.step()
        session.scheduler.step()
        session.adamw.zero_grad(set_to_none=True)
        yield StepResult(total / len(indices) if indices else None, len(indices), lr)


def initial_loss(model: nn.Module, records: Records, cfg: FinetuneConfig, pad_id: int, device: str) -> float:
    """Step 0 of the log: the mean loss before any update, on min(N, logical batch) records drawn with the seed."""
    import torch

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


# =========================================================================== checkpoints


@dataclass
class Position:
    """Where the loop is: logical steps done in all, the epoch, and steps done within it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def training_identity(model_name: str, cfg: FinetuneConfig, records: Records, train_sha256: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model, the training config and the records."""
    trained = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_NEUTRAL_FIELDS}
    return {"model": model_name, "config": config_fingerprint(trained), "records": records.fingerprint(),
            "dataset_size": len(records), "train_sha256": train_sha256}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise DpnbError("the checkpoint's trainable weights do not match this model; delete the checkpoints "
                        "directory or rerun with force=True")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def rng_states(session: Session) -> dict[str, Any]:
    import numpy as np
    import torch

    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "sampler": session.sampler_rng.get_state(),
              "noise": session.noise_rng.get_state() if session.noise_rng is not None else None}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_global_rngs(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, session: Session, position: Position, identity: dict[str, Any],
                    log_length: int, wall_s: float) -> None:
    """Write the resumable state atomically (a temporary file renamed over the old checkpoint)."""
    import torch

    state = {
        "format": CHECKPOINT_FORMAT, "identity": identity, "position": dataclasses.asdict(position),
        "log_length": log_length, "wall_s": wall_s, "trainable": trainable_state(session.trainable),
        "optimizer": session.adamw.state_dict(), "scheduler": session.scheduler.state_dict(),
        "accountant": privacy.accountant_history(session.engine.accountant) if session.engine else None,
        "rng": rng_states(session),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


# =========================================================================== stopping cleanly


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop at the next logical-step boundary.

    The first signal sets the flag; a second one restores the previous handlers and interrupts at
    once (losing the work since the last checkpoint). Handlers can only be set from the main thread;
    elsewhere the request comes only from `should_stop`.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"{self.reason} received: stopping after the current logical step (send it again to stop now)",
              flush=True)


# =========================================================================== train


def train(model_name: str, train: datasets.Dataset, cfg: FinetuneConfig, out_dir: str | os.PathLike, *,
          train_sha256: str = "", tokenizer: PreTrainedTokenizerBase | None = None,
          base_model: PreTrainedModel | None = None, resume: bool = True,
          should_stop: Callable[[int], bool] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Fine-tune `model_name` on the records of `train`; write model/, train_log.jsonl, privacy.json.

    Resumes from out_dir/checkpoints when it holds a checkpoint of the same model, config and
    records (`resume=False` starts afresh, deleting earlier outputs). When out_dir already holds
    the finished result of the same training it is returned without training again.
    `base_model` (optional) is the loaded base to train, modified in place; `should_stop(step)` is
    asked after every logical step and, when it answers True, training checkpoints and raises
    `TrainingInterrupted`, as on SIGINT. Returns the privacy record (privacy.json).
    """
    from dpnb.models import load_tokenizer, resolve_device

    out = Path(out_dir)
    records = Records.from_dataset(train)
    plan = plan_training(cfg, len(records))  # every N-dependent check before any model is loaded
    identity = training_identity(model_name, cfg, records, train_sha256)
    paths = OutputPaths(out)
    finished = _finished_record(paths, identity)
    if finished is not None and resume:
        return finished
    checkpoint = load_checkpoint(paths.checkpoint) if resume and paths.checkpoint.exists() else None
    if checkpoint is not None and checkpoint.get("identity") != identity:
        raise DpnbError(f"{paths.checkpoint} was written by another training setup (model, config or data "
                        f"differ); rerun with force=True to start afresh, or restore the original settings")
    if checkpoint is None:
        paths.clear()

    device = resolve_device(cfg.device)
    tokenizer = tokenizer or load_tokenizer(model_name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    import torch

    torch.manual_seed(cfg.seed)  # adapter initialisation
    with quiet_transformers():
        model, notes = build_model(model_name, cfg, device, base_model)
    say = print if verbose else (lambda *a, **k: None)
    for note in notes:
        say(note)
    position, wall_before = Position(), 0.0
    if checkpoint is None:
        loss0 = initial_loss(model, records, cfg, pad_id, device)
        append_jsonl(paths.log, {"step": 0, "epoch": 0.0, "epsilon": 0.0 if cfg.dp else None, "loss": loss0,
                                 "lr": cfg.lr, "batch_size": None, "wall_s": 0.0})
    else:
        load_trainable_state(model, checkpoint["trainable"])
        position, wall_before = Position(**checkpoint["position"]), float(checkpoint["wall_s"])
        _truncate_log(paths.log, int(checkpoint["log_length"]))
        say(f"resuming from the checkpoint at step {position.step} of {plan.steps}")
    session = make_session(model, cfg, plan, device, checkpoint["accountant"] if checkpoint else None)
    if checkpoint is not None:
        session.adamw.load_state_dict(checkpoint["optimizer"])
        session.scheduler.load_state_dict(checkpoint["scheduler"])
        if session.noise_rng is not None:
            session.noise_rng.set_state(checkpoint["rng"]["noise"])
        restore_global_rngs(checkpoint["rng"])
    say(describe_plan(plan, trainable_parameters(model), cfg))
    tracker = (privacy.EpsilonTracker(plan.noise_multiplier, plan.sample_rate, plan.delta, cfg.accountant, plan.steps)
               if cfg.dp else None)

    sampler_state = checkpoint["rng"]["sampler"] if checkpoint else None
    started = time.time()
    with StopRequest() as stop, quiet_warnings():
        while position.step < plan.steps:
            steps = min(plan.steps_per_epoch - position.step_in_epoch, plan.steps - position.step)
            for result in _epoch(session, records, cfg, pad_id, device, steps, position, sampler_state):
                sampler_state = None
                position.step += 1
                position.step_in_epoch += 1
                if position.step_in_epoch == plan.steps_per_epoch:
                    position.epoch, position.step_in_epoch = position.epoch + 1, 0
                wall = wall_before + time.time() - started
                epsilon = tracker.epsilon(accounted_steps(session, plan)) if tracker else None
                record = {"step": position.step, "epoch": round(position.step / plan.steps_per_epoch, 4),
                          "epsilon": epsilon, "loss": result.loss, "lr": result.lr,
                          "batch_size": result.batch_size, "wall_s": round(wall, 2)}
                append_jsonl(paths.log, record)
                _report_step(say, record, plan.steps)
                asked = should_stop is not None and should_stop(position.step)
                if stop.reason or asked or position.step % cfg.checkpoint_every == 0:
                    save_checkpoint(paths.checkpoint, session, position, identity, position.step + 1, wall)
                if (stop.reason or asked) and position.step < plan.steps:
                    raise TrainingInterrupted(
                        f"training stopped at step {position.step} of {plan.steps} ({stop.reason or 'as asked'}); "
                        f"the checkpoint in {paths.checkpoint.parent} resumes it: rerun the stage")
    wall = wall_before + time.time() - started
    record = privacy_record(session, plan, cfg, position, trainable_parameters(model), train_sha256, identity)
    save_trained(session.trainable, tokenizer, paths.model, model_card(model_name, cfg, notes))
    write_json_atomic(paths.privacy, record)
    paths.checkpoint.unlink(missing_ok=True)  # model/ holds the weights now; the state is not needed
    say(f"done: {position.step} steps in {wall:.0f} s" + (f", epsilon = {record['epsilon']:.3f}" if cfg.dp else ""))
    return record


@dataclass(frozen=True)
class OutputPaths:
    root: Path

    model = property(lambda self: self.root / "model")
    log = property(lambda self: self.root / "train_log.jsonl")
    privacy = property(lambda self: self.root / "privacy.json")
    checkpoint = property(lambda self: self.root / "checkpoints" / CHECKPOINT_FILE)

    def clear(self) -> None:
        """Remove earlier outputs before a fresh start, so none can be mistaken for the new run's."""
        self.privacy.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)
        self.checkpoint.unlink(missing_ok=True)
        if self.model.exists():
            shutil.rmtree(self.model)


def _finished_record(paths: OutputPaths, identity: dict[str, Any]) -> dict[str, Any] | None:
    """privacy.json of a finished training of the same identity, when its model is there too."""
    if not (paths.privacy.exists() and (paths.model / MODEL_CARD).exists()) or paths.checkpoint.exists():
        return None
    saved = read_json(paths.privacy)
    return saved if saved.get("identity") == identity else None


def _truncate_log(path: Path, length: int) -> None:
    """Keep the first `length` lines: steps after the checkpoint are redone, exactly as before."""
    kept = read_jsonl(path)[:length]
    write_text_atomic(path, "".join(_json_line(r) for r in kept))


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record) + "\n"


def _epoch(session: Session, records: Records, cfg: FinetuneConfig, pad_id: int, device: str, steps: int,
           position: Position, sampler_state: torch.Tensor | None) -> Iterator[StepResult]:
    """The next `steps` logical steps of the current epoch.

    The sampler's generator is restored (on resume) where the uninterrupted run had it: a data
    loader draws one number from it when it starts iterating, so a resumed epoch start restores
    before that draw, a resumed mid-epoch position after it.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    session.loader.batch_sampler.steps = steps  # UniformWithReplacementSampler: logical batches per pass
    mid_epoch = position.step_in_epoch > 0
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


def _report_step(say: Callable[..., Any], record: dict[str, Any], total: int) -> None:
    every = max(1, total // 50)
    if record["step"] % every and record["step"] != total:
        return
    loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
    eps = "" if record["epsilon"] is None else f"  epsilon {record['epsilon']:.3f}"
    say(f"step {record['step']}/{total}  epoch {record['epoch']:.2f}  loss {loss}{eps}  ({record['wall_s']:.0f} s)",
        flush=True)


def describe_plan(plan: TrainingPlan, trainable: int, cfg: FinetuneConfig) -> str:
    """One paragraph with the numbers of the run, for the log and the notebook."""
    lines = [
        f"{plan.steps} logical steps over {plan.dataset_size} records: each record is sampled with probability "
        f"q = {plan.sample_rate:.6g} per step (expected logical batch {plan.expected_batch_size:.1f}, physical "
        f"batches of at most {plan.physical_batch_size}); {trainable:,} trainable parameters ({cfg.mode})."
    ]
    if plan.dp:
        sigma = plan.noise_multiplier
        lines.append(
            f"DP-SGD: clip each record's gradient to C = {cfg.max_grad_norm:g}, add Gaussian noise with "
            f"sigma = {sigma:.4f} (std sigma*C = {sigma * cfg.max_grad_norm:.3g}); target epsilon "
            f"{plan.target_epsilon:g} at delta = {plan.delta:.3g} ({plan.accountant} accountant)."
        )
    else:
        lines.append("No DP: no clipping, no noise (epsilon = infinity).")
    return "\n".join(lines)


# =========================================================================== results


def accounted_steps(session: Session, plan: TrainingPlan) -> int:
    """The noise-adding steps the accountant has counted, after checking each was taken at the planned sigma and q."""
    history = privacy.accountant_history(session.engine.accountant)
    for sigma, rate, _ in history:
        if not (math.isclose(sigma, plan.noise_multiplier) and math.isclose(rate, plan.sample_rate)):
            raise RuntimeError(f"the accountant saw steps at sigma={sigma}, q={rate}; the plan has "
                               f"sigma={plan.noise_multiplier}, q={plan.sample_rate}")
    return sum(count for _, _, count in history)


def privacy_record(session: Session, plan: TrainingPlan, cfg: FinetuneConfig, position: Position,
                   trainable: int, train_sha256: str, identity: dict[str, Any]) -> dict[str, Any]:
    """privacy.json: the guarantee of the finished run, for the steps the accountant counted.

    Epsilon is computed by `privacy.privacy_fields`, the path `privacy.verify_privacy` retraces, so
    anyone can recompute it from (noise_multiplier, sample_rate, steps, delta, accountant).
    """
    common = {
        "dp": cfg.dp, "mode": cfg.mode, "dataset_size": plan.dataset_size,
        "logical_batch_size": plan.logical_batch_size, "physical_batch_size": plan.physical_batch_size,
        "expected_batch_size": plan.expected_batch_size, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "planned_steps": plan.steps, "trainable_parameters": trainable, "train_sha256": train_sha256,
        "versions": library_versions(), "identity": identity,
    }
    if not cfg.dp:
        return {"epsilon": None, "epsilons": None, "delta": None, "noise_multiplier": None,
                "sample_rate": plan.sample_rate, "steps": position.step, "accountant": None, "max_grad_norm": None,
                "grad_sample_mode": None, "target_epsilon": None, "secure_rng": None, **common}
    steps = accounted_steps(session, plan)
    if steps != position.step:
        raise RuntimeError(f"the accountant counted {steps} noise-adding steps, the loop {position.step}")
    return {
        **privacy.privacy_fields(plan.noise_multiplier, plan.sample_rate, steps, plan.delta, cfg.accountant),
        "max_grad_norm": cfg.max_grad_norm, "grad_sample_mode": cfg.grad_sample_mode,
        "target_epsilon": cfg.target_epsilon,
        "secure_rng": False,  # a seeded torch generator (reproducible), not a cryptographic one
        **common,
    }


def model_card(model_name: str, cfg: FinetuneConfig, notes: Sequence[str]) -> dict[str, Any]:
    """dpnb_model.json: what `load_trained` needs to rebuild the model."""
    untied = any("untied" in note for note in notes)
    return {"base": model_name, "mode": cfg.mode, "dtype": cfg.dtype, "base_seed": cfg.seed, "dp": cfg.dp,
            "untied_embeddings": untied}


def save_trained(model: nn.Module, tokenizer: PreTrainedTokenizerBase, target: Path, card: dict[str, Any]) -> None:
    """model/: the whole model (full) or the peft adapter (lora, qlora), the tokenizer and the card."""
    with atomic_directory(target) as staging, quiet_transformers():
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / MODEL_CARD, card)


def load_trained(model_dir: str | os.PathLike, device: str = "cpu",
                 dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The fine-tuned model of `model_dir` (a run's model/) in eval mode, and its tokenizer.

    LoRA adapters are merged into the base (plain weights, fastest to sample). A QLoRA adapter was
    trained on the 4-bit base: on a GPU the base is loaded in 4-bit with the adapter on top; on the
    CPU (where 4-bit kernels are slow) the 4-bit base is dequantised to `dtype`, which gives exactly
    the weights the adapter was trained against, and the adapter is merged into it.
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    require((path / MODEL_CARD).exists(),
            f"{path} holds no fine-tuned model ({MODEL_CARD} is missing); run the finetune stage first")
    card = read_json(path / MODEL_CARD)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with quiet_transformers():
        model = _load_model(path, card, device, dtype)
    return model.to(device).eval(), tokenizer


def _load_model(path: Path, card: dict[str, Any], device: str, dtype: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    from dpnb.models import load_causal_lm, torch_dtype

    mode, base = card["mode"], card["base"]
    if mode == "full":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    else:
        from peft import PeftModel

        if mode == "qlora":
            base_model = load_causal_lm(base, dtype=dtype, quantize_4bit=True, device=device,
                                        seed=card.get("base_seed", 0))
            if device != "cuda":
                base_model = base_model.dequantize().to(torch_dtype(dtype))
        else:
            base_model = load_causal_lm(base, dtype=dtype, seed=card.get("base_seed", 0)).to(device)
        with quiet_warnings():
            model = PeftModel.from_pretrained(base_model, path)
            if not (mode == "qlora" and device == "cuda"):
                model = model.merge_and_unload()
    return model


def read_train_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of train_log.jsonl (`path` may be the file or the directory holding it)."""
    path = Path(path)
    return read_jsonl(path / "train_log.jsonl" if path.is_dir() else path)


def stage_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
    """privacy.json plus the first and last logged losses: what run_stage returns, read from the files."""
    out = Path(out_dir)
    record = read_json(out / "privacy.json")
    losses = [r["loss"] for r in read_train_log(out) if r.get("loss") is not None]
    return {**record, "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None}


def run_stage(run: RunDir, cfg: FinetuneConfig, force: bool = False) -> dict[str, Any]:
    """Fine-tune the run's generator on its prepared records (stage 02); skip when already done."""
    from dpnb.data import load_prepared

    run.require_stage("prepare")
    if not run.should_run(STAGE, cfg, force):
        return stage_summary(run.path)
    started = time.time()
    train_set, _, manifest = load_prepared(run)
    train(manifest["model"], train_set, cfg, run.path, train_sha256=manifest.get("train_sha256", ""),
          resume=not force)
    run.mark_complete(STAGE, cfg, started)
    return stage_summary(run.path)


# =========================================================================== for the notebook


def plot_loss_vs_epsilon(log: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Training loss against the epsilon spent so far (the paper's figure); against steps without DP."""
    import matplotlib.pyplot as plt

    points = [r for r in log if r.get("loss") is not None]
    private = all(r.get("epsilon") is not None for r in points)
    xs = [r["epsilon"] if private else r["step"] for r in points]
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot(xs, [r["loss"] for r in points], marker="o", markersize=3, linewidth=1.2)
    axis.set_xlabel("epsilon spent" if private else "logical step (no DP: epsilon is infinite)")
    axis.set_ylabel("training loss (nats per token)")
    axis.set_title(title or ("Training loss against epsilon" if private else "Training loss (no DP)"))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def load_base(model_name: str, cfg: FinetuneConfig, device: str) -> PreTrainedModel:
    """The base model as training saw it, for samples "before fine-tuning" (4-bit weights for qlora).

    For qlora on the CPU the 4-bit base is dequantised: the same weights, without the slow kernels.
    """
    from dpnb.models import load_causal_lm

    if cfg.mode == "qlora":
        model = load_causal_lm(model_name, dtype=cfg.dtype, quantize_4bit=True, device=device, seed=cfg.seed)
        model = model if device == "cuda" else model.dequantize()
    else:
        model = load_causal_lm(model_name, dtype=cfg.dtype, seed=cfg.seed)
    return model.to(device).eval()


def sample_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: dict[str, list[int]],
                 n_per_label: int, max_new_tokens: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """`n_per_label` seeded top-p samples for each label's prompt ids: a quick look, not the generate stage.

    Sampling rather than greedy decoding: greedy would give one text per label however many are asked.
    """
    import torch

    device = next(model.parameters()).device
    rows = []
    for label, ids in prompts.items():
        if n_per_label <= 0:
            continue
        torch.manual_seed(seed)
        inputs = torch.tensor([ids] * n_per_label, device=device)
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True, top_p=0.95,
                                 top_k=0, temperature=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, len(ids):]:
            rows.append({"label": label, "text": tokenizer.decode(row, skip_special_tokens=True).strip()})
    return rows


def explain_privacy(record: dict[str, Any]) -> str:
    """What clipping, noise and accounting did in this run, in words, with its numbers (privacy.json)."""
    n, rate, steps = record["dataset_size"], record["sample_rate"], record["steps"]
    lines = [
        f"Training set: N = {n} records; mode {record['mode']}, {record['trainable_parameters']:,} trainable "
        f"parameters.",
        f"Sampling: at each step every record joins the batch independently with probability q = {rate:.6g} "
        f"(= 1/{round(1 / rate)}), so a logical batch holds N*q = {n * rate:.1f} records on average; the actual "
        f"number varies from step to step (Poisson sampling).",
        f"Steps: {steps} noise-adding steps ({steps * rate:.2f} epochs: each record was expected in "
        f"{steps * rate:.2f} batches).",
    ]
    if not record["dp"]:
        lines.append("No DP: gradients were neither clipped nor noised. Nothing bounds what the weights reveal "
                     "about one record (epsilon is infinite); this run is the baseline that shows what the noise "
                     "costs.")
        return "\n".join(lines)
    sigma, clip = record["noise_multiplier"], record["max_grad_norm"]
    by_accountant = ", ".join(f"{name.upper()}: {value:.2f}" for name, value in (record.get("epsilons") or {}).items())
    lines += [
        f"Clipping: each record's gradient is scaled down to norm at most C = {clip:g}, so adding or removing "
        f"one record moves the summed gradient by at most C.",
        f"Noise: Gaussian noise of standard deviation sigma*C = {sigma:.4f} * {clip:g} = {sigma * clip:.4g} is "
        f"added to every coordinate of that sum (sigma = {sigma:.4f}, chosen before training for exactly "
        f"these {steps} steps at this q), and the result is divided by the expected batch size.",
        f"Guarantee: (epsilon, delta) = ({record['epsilon']:.2f}, {record['delta']:.3g}) by the "
        f"{record['accountant'].upper()} accountant ({by_accountant}); target epsilon "
        f"{record['target_epsilon']:g}. delta is below 1/N = {1 / n:.3g}.",
        f"Meaning: any outcome of this training is at most e^epsilon = {math.exp(record['epsilon']):.3g} times as "
        f"likely with any one review in the data as without it (and the other way round), up to probability delta.",
    ]
    return "\n".join(lines)
