"""The frozen LM head and its cross-entropy, computed only where the loss looks, in chunks.

The maths. Let h_bt (in R^d) be the final hidden state of record b at position t = 0..T-2, W (V x d)
and c (V) the LM head's weight and bias, y_bt the token position t predicts, and m_bt >= 0 the
target mask (1 on the review's tokens; 0 on the prompt and on padding). With z = W h + c,

    CE_bt = logsumexp(z_bt) - z_bt[y_bt],        l_b = sum_t m_bt CE_bt / max(1, sum_t m_bt),

exactly the per-record loss of `per_record_loss` (a record with no target has l_b = 0). Since the
head is frozen, the only gradient wanted is the one with respect to the hidden states:

    dl_b / dh_bt = (m_bt / max(1, n_b)) W^T (softmax(z_bt) - e_{y_bt}),     n_b = sum_t m_bt.

That vector is d-dimensional and does not depend on anything above the head, so the forward pass
computes it right away, chunk by chunk of selected tokens, and keeps it ([tokens, d]: small). The
backward pass only multiplies it by the incoming grad_output[b]. In all it costs two matmuls per
chunk (z = W h, then (softmax - onehot) @ W), the same as autograd's forward plus its input
gradient, but:

- only at positions with m_bt != 0: prompt and padding positions never reach the vocabulary;
- never materialising the [tokens, vocab] logits of the whole batch, only [chunk, vocab] at a time;
- with fewer passes over the logits: the softmax is formed in place and its normaliser and the
  one-hot are folded into the [chunk, d] result, g = (exp(z - max) @ W) / sum - W[y].

Most of the saving is the first point (for the demo's chat prompts, about a third of the positions
are prompt); measured on 2 CPU cores with every position in the loss, the two matmuls are ~85% of
the cost and this function is ~5-10% cheaper than autograd's logits + cross-entropy.

The logits are formed in the head's dtype and the softmax in float32 (like `per_record_loss`,
which casts the logits to float32); the gradient is returned in the hidden states' dtype.

Opacus. The per-record losses [B] are what `per_record_loss` returns, and their backward delivers
the same dl/dh to whatever produced h, so Opacus's per-sample-gradient hooks on the trainable
layers below see the same backprops as with HF logits + `per_record_loss` (`losses.mean()` with
loss_reduction="mean", as in the training loop). The head must be frozen: this function computes
no weight gradient and refuses a head whose weight (or bias) requires grad. Double backward is not
supported. Heads that transform the logits (a logit scale or soft-capping, as some architectures
have) are not covered: for Llama and GPT-2 the logits are exactly `lm_head(h)`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dpnb.errors import DpnbError

# Tokens per chunk: big enough for efficient matmuls (W, 113 MB for SmolLM2, is read twice per chunk;
# on 2 CPU cores 64-token chunks cost twice as much as 512), small enough that a chunk's logits
# (chunk x vocab x 4 bytes: 100 MB at 512 x 49,152) stay modest.
DEFAULT_CHUNK_SIZE = 512


def _check_frozen(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise DpnbError(
            "head_loss needs a frozen LM head, but its weight requires grad; freeze it "
            "(head.requires_grad_(False); with tied embeddings this freezes the input embedding too) "
            "or compute the loss from ordinary logits with per_record_loss"
        )


def _token_terms(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 scale: torch.Tensor, chunk_size: int, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE of each selected token ([N] float32) and, if asked, scale_n * dCE_n/dh_n ([N, d], hidden's dtype)."""
    count = hidden.shape[0]
    losses = torch.empty(count, dtype=torch.float32, device=hidden.device)
    grads = torch.empty_like(hidden) if with_grad else None
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        h = hidden[start:stop]
        y = targets[start:stop].unsqueeze(1)
        z = F.linear(h.to(weight.dtype), weight, bias)  # [c, V]
        if z.dtype != torch.float32:
            z = z.float()
        peak = z.amax(dim=1, keepdim=True)
        z.sub_(peak)  # z - max
        shifted_target = z.gather(1, y).squeeze(1)
        z.exp_()  # exp(z - max), in place: the unnormalised softmax
        total = z.sum(dim=1)
        losses[start:stop] = total.log() - shifted_target  # logsumexp(z) - z[y]
        if grads is not None:
            # (softmax - onehot) @ W = (exp(z - max) @ W) / sum - W[y]: the normaliser and the one-hot
            # act on [c, d] rather than on [c, V]
            g = torch.mm(z.to(weight.dtype), weight).float()
            g.div_(total.unsqueeze(1)).sub_(weight.index_select(0, y.squeeze(1)).float())
            grads[start:stop] = g.mul_(scale[start:stop].unsqueeze(1)).to(grads.dtype)
    return losses, grads


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-record losses in the forward pass, with dl/dh computed there too; backward only rescales it."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, target_mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
        batch = hidden.shape[0]
        selected = target_mask != 0  # [B, T]
        rows = selected.nonzero()[:, 0]  # the record of each selected token, in row-major order
        counts = target_mask.float().sum(dim=1).clamp(min=1)  # as per_record_loss: the sum of the mask
        scale = target_mask[selected].float() / counts[rows]  # m_bt / max(1, n_b)
        chosen_targets = targets[selected]
        vocab = weight.shape[0]
        if chosen_targets.numel() and (int(chosen_targets.min()) < 0 or int(chosen_targets.max()) >= vocab):
            raise DpnbError(f"a target inside the loss mask is outside the vocabulary [0, {vocab})")
        with_grad = bool(ctx.needs_input_grad[0])
        token_loss, grads = _token_terms(hidden[selected], weight, bias, chosen_targets, scale, chunk_size,
                                         with_grad)
        losses = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
        losses.index_add_(0, rows, token_loss * scale)
        if with_grad:
            ctx.save_for_backward(grads, rows, selected)
            ctx.hidden_shape = hidden.shape
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads, rows, selected = ctx.saved_tensors
        grad_hidden = torch.zeros(ctx.hidden_shape, dtype=grads.dtype, device=grads.device)
        grad_hidden[selected] = grads * grad_losses.index_select(0, rows).unsqueeze(1).to(grads.dtype)
        return grad_hidden, None, None, None, None, None


def head_loss(hidden_states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor,
              bias: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Per-record mean token cross-entropy [B] of a frozen LM head, as `per_record_loss` on its logits.

    `hidden_states` are the final (post-norm) hidden states at positions 0..T-2 ([B, T-1, d], i.e.
    `last_hidden_state[:, :-1]`, the positions whose logits `per_record_loss` takes); `targets` and
    `target_mask` are the batch's ([B, T-1]). `weight` ([V, d]) and `bias` ([V] or None) are the
    head's and must not require grad. Logits are formed only where `target_mask != 0`, `chunk_size`
    tokens at a time. Differentiable with respect to `hidden_states` only.
    """
    _check_frozen(weight, bias)
    if hidden_states.dim() != 3 or targets.shape != hidden_states.shape[:2] or target_mask.shape != targets.shape:
        raise DpnbError(f"head_loss wants hidden states [B, T, d] with targets and mask [B, T]; got "
                        f"{tuple(hidden_states.shape)}, {tuple(targets.shape)} and {tuple(target_mask.shape)} "
                        f"(pass last_hidden_state[:, :-1], the positions that predict a token)")
    if weight.dim() != 2 or weight.shape[1] != hidden_states.shape[2]:
        raise DpnbError(f"the head weight {tuple(weight.shape)} does not match hidden size {hidden_states.shape[2]}")
    if chunk_size < 1:
        raise DpnbError(f"chunk_size must be at least 1, got {chunk_size}")
    return _FrozenHeadCrossEntropy.apply(hidden_states, weight, bias, targets, target_mask, int(chunk_size))


class FrozenHeadLoss:
    """`head_loss` bound to one frozen head module (an `nn.Linear`, e.g. `model.get_output_embeddings()`).

    A plain callable, not an `nn.Module`, so that wrapping it (or not) never changes which modules
    Opacus hooks; the head's tensors are read at each call, so moving the model moves it too.
    """

    def __init__(self, head: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, dtype: torch.dtype | None = None):
        weight = getattr(head, "weight", None)
        if weight is None or weight.dim() != 2:
            raise DpnbError(f"{type(head).__name__} is not a linear LM head (no 2-D weight)")
        _check_frozen(weight, getattr(head, "bias", None))
        self.head = head
        self.chunk_size = chunk_size
        self.dtype = dtype  # the logits' matmul format (None: the head's own); the softmax is float32 either way
        self._copy: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def of_model(cls, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 dtype: torch.dtype | None = None) -> FrozenHeadLoss:
        """The head of a Hugging Face causal LM (plain or peft-wrapped)."""
        head = model.get_output_embeddings()
        if head is None:
            raise DpnbError(f"{type(model).__name__} has no output embeddings (LM head)")
        return cls(head, chunk_size, dtype)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's weight and bias in `dtype`: a copy made once (and again if the head moves or changes)."""
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        if self.dtype is None or weight.dtype == self.dtype:
            return weight, bias
        key = (weight.data_ptr(), weight.device, weight._version)
        if self._copy is None or self._copy[0] != key:
            self._copy = (key, weight.detach().to(self.dtype), None if bias is None else bias.detach().to(self.dtype))
        return self._copy[1], self._copy[2]

    def __call__(self, hidden_states: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights()
        return head_loss(hidden_states, weight, targets, target_mask, bias, self.chunk_size)
