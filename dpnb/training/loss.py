"""The training records and the loss DP-SGD clips: records, right-padded batches, the per-record loss.

A record is the token ids of prompt + review + EOS and the length of its prompt. Position j of a
record predicts token j+1; its loss l_i is the mean next-token cross-entropy over the tokens that
count: real tokens (padding never counts) after the prompt (unless `loss_on_prompt`: by default the
model learns the review given its label prompt, which is what generation asks of it). Records are
padded on the right, and padding is found from each record's length, never from the token id,
because the pad token is EOS for SmolLM2 and the EOS closing each record must be learned.

l_i is what `dpnb.training.dpsgd` differentiates per record and clips; `dpnb.training.head_loss`
computes the same l_i from the frozen LM head on the fast path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from dpnb.errors import require

if TYPE_CHECKING:
    import datasets
    from torch import nn

    from dpnb.config import FinetuneConfig


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
