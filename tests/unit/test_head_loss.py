"""dpnb.training.head_loss: per-record losses and their hidden-state gradient equal plain autograd's.

Reference: F.linear + `per_record_loss` (cross-entropy over the whole vocabulary) under autograd.
Tolerances: float32 rtol 1e-5 (losses and gradients; atol 1e-6 for entries near zero); bfloat16
(logits formed in bf16, softmax in fp32, as in the reference) rtol 2e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpnb.errors import DpnbError
from dpnb.training.head_loss import FrozenHeadLoss, head_loss
from dpnb.training.loss import Records, collate, per_record_loss

FP32 = {"rtol": 1e-5, "atol": 1e-6}


def problem(batch: int = 4, steps: int = 11, width: int = 16, vocab: int = 37, seed: int = 0,
            dtype: torch.dtype = torch.float32):
    """Hidden states, a frozen head and targets, with a prompt (unmasked start), padding and an empty row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, steps, width, generator=g).to(dtype)
    weight = (torch.randn(vocab, width, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, vocab, (batch, steps), generator=g)
    positions = torch.arange(steps)
    lengths = torch.tensor([steps, steps - 3, 4, steps - 1])[:batch]
    prompts = torch.tensor([2, 3, 4, 0])[:batch]  # row 2: all prompt, no target at all
    mask = ((positions < lengths[:, None]) & (positions >= prompts[:, None])).float()
    targets[~mask.bool()] = -100  # outside the mask a target may be anything (padding: the pad id)
    return hidden, weight, targets, mask


def reference(hidden, weight, targets, mask, bias=None):
    safe = targets.clamp(min=0)
    return per_record_loss(F.linear(hidden, weight, bias), safe, mask)


def losses_and_grad(fn, hidden, *args, upstream=None):
    h = hidden.detach().clone().requires_grad_(True)
    losses = fn(h, *args)
    upstream = torch.linspace(0.5, 2.0, losses.shape[0]) if upstream is None else upstream
    (grad,) = torch.autograd.grad((losses * upstream).sum(), h)
    return losses.detach(), grad


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 512])
def test_matches_autograd(chunk_size):
    hidden, weight, targets, mask = problem()
    assert int(mask.sum()) % 5 and int(mask.sum()) % 7  # chunks that do not divide the token count
    ours, ours_grad = losses_and_grad(lambda h: head_loss(h, weight, targets, mask, chunk_size=chunk_size), hidden)
    ref, ref_grad = losses_and_grad(lambda h: reference(h, weight, targets, mask), hidden)
    torch.testing.assert_close(ours, ref, **FP32)
    torch.testing.assert_close(ours_grad, ref_grad, **FP32)
    assert ours[2] == 0 and not ours_grad[2].any()  # the empty row: zero loss, zero gradient
    assert not ours_grad[~mask.bool()].any()  # prompt and padding positions get no gradient


def test_bias_weights_and_views():
    hidden, weight, targets, mask = problem(seed=1)
    bias = torch.randn(weight.shape[0])
    mask = mask * torch.rand(mask.shape)  # a weighted mask counts as per_record_loss counts it
    wide = torch.cat([hidden, torch.randn(hidden.shape[0], 1, hidden.shape[2])], dim=1)  # sliced: a view
    ours, ours_grad = losses_and_grad(lambda h: head_loss(h[:, :-1], weight, targets, mask, bias, chunk_size=5), wide)
    ref, ref_grad = losses_and_grad(lambda h: reference(h[:, :-1], weight, targets, mask, bias), wide)
    torch.testing.assert_close(ours, ref, **FP32)
    torch.testing.assert_close(ours_grad, ref_grad, **FP32)


def test_without_grad_and_all_masked_out():
    hidden, weight, targets, mask = problem(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(head_loss(hidden, weight, targets, mask, chunk_size=4),
                                   reference(hidden, weight, targets, mask), **FP32)
    empty = torch.zeros_like(mask)
    losses, grad = losses_and_grad(lambda h: head_loss(h, weight, targets, empty), hidden)
    assert not losses.any() and not grad.any()


def test_bfloat16():
    hidden, weight, targets, mask = problem(seed=3, dtype=torch.bfloat16)
    ours, ours_grad = losses_and_grad(lambda h: head_loss(h, weight, targets, mask, chunk_size=6), hidden)
    ref, ref_grad = losses_and_grad(lambda h: reference(h, weight, targets, mask), hidden)
    assert ours_grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(ours_grad.float(), ref_grad.float(), rtol=2e-2, atol=2e-3)


def test_refuses_a_trainable_head_and_bad_input():
    hidden, weight, targets, mask = problem()
    with pytest.raises(DpnbError, match="frozen LM head"):
        head_loss(hidden, weight.clone().requires_grad_(True), targets, mask)
    with pytest.raises(DpnbError, match="frozen LM head"):
        FrozenHeadLoss(torch.nn.Linear(16, 37))
    with pytest.raises(DpnbError, match="last_hidden_state"):
        head_loss(hidden, weight, targets[:, 1:], mask[:, 1:])
    bad = targets.clone()
    bad[0, 5] = 37
    with pytest.raises(DpnbError, match="outside the vocabulary"):
        head_loss(hidden, weight, bad, mask)


def tiny_llama(vocab: int = 53):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def test_through_a_tiny_model_equals_per_record_loss():
    """Same per-record losses and the same gradients of the trainable layers as HF logits + per_record_loss."""
    model = tiny_llama()
    model.requires_grad_(False)
    model.model.layers[1].requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    records = Records([torch.randint(1, 53, (n,), generator=g).tolist() for n in (9, 5, 12, 6)], [3, 2, 4, 6])
    batch = collate(records, [0, 1, 2, 3], pad_id=0)
    upstream = torch.tensor([0.25, 0.25, 0.25, 0.25])
    params = [p for p in model.parameters() if p.requires_grad]

    ref = per_record_loss(model(**batch.model_inputs()).logits[:, :-1], batch.targets, batch.target_mask)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    final = model.model(**batch.model_inputs()).last_hidden_state
    ours = FrozenHeadLoss.of_model(model, chunk_size=7)(final[:, :-1], batch.targets, batch.target_mask)
    grads = torch.autograd.grad((ours * upstream).sum(), params)

    torch.testing.assert_close(ours, ref, **FP32)
    assert ours[3] == 0  # record 3 is all prompt
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
