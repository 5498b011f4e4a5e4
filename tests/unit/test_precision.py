"""dpnb.precision: "auto" takes bf16 only where it is measured to be fast, and what runs in it."""

from __future__ import annotations

import pytest
import torch

from dpnb import precision
from dpnb.config import FinetuneConfig
from dpnb.errors import DpnbError
from dpnb.training.dpsgd import compute_precision
from dpnb.training.head_loss import FrozenHeadLoss, head_loss


def test_auto_follows_the_measured_speedup(monkeypatch):
    monkeypatch.setenv(precision.SPEEDUP_ENV, "5")
    fast = precision.choose("auto", "cpu", trainable=True)
    assert fast.dtype == torch.bfloat16 and fast.autocast == torch.bfloat16 and fast.bf16_speedup == 5
    assert precision.choose("auto", "cpu").autocast is None  # nothing trains: frozen bf16 only
    monkeypatch.setenv(precision.SPEEDUP_ENV, "1.5")  # below MIN_SPEEDUP: not worth its rounding
    slow = precision.choose("auto", "cpu", trainable=True)
    assert slow.dtype == torch.float32 and slow.autocast is None and "1.50x" in slow.reason
    assert precision.choose("fp32", "cpu").bf16_speedup is None  # a stated format is not measured


def test_a_bad_stated_speedup_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(precision.SPEEDUP_ENV, "fast")
    with pytest.raises(DpnbError, match="DPNB_BF16_SPEEDUP"):
        precision.choose("auto", "cpu")


def test_the_measurement_is_a_positive_ratio(monkeypatch):
    monkeypatch.delenv(precision.SPEEDUP_ENV, raising=False)
    precision.bf16_speedup.cache_clear()
    ratio = precision.bf16_speedup("cpu", torch.get_num_threads())
    assert ratio > 0
    assert precision.choose("auto", "cpu").bf16_speedup == pytest.approx(ratio)


def test_record_names_the_choice(monkeypatch):
    monkeypatch.setenv(precision.SPEEDUP_ENV, "4")
    record = precision.choose("auto", "cpu", trainable=True).record()
    assert record["dtype"] == "bfloat16" and record["autocast"] == "bfloat16" and record["bf16_speedup"] == 4.0
    assert "measured" in record["reason"]


def test_training_keeps_float32_where_bf16_would_weaken_the_bound(monkeypatch):
    monkeypatch.setenv(precision.SPEEDUP_ENV, "5")
    assert compute_precision(FinetuneConfig(mode="lora"), "cpu").autocast == torch.bfloat16
    # ghost clipping takes its norms from activations: bf16 there could let a record exceed C
    assert compute_precision(FinetuneConfig(grad_sample_mode="ghost"), "cpu").autocast is None
    assert compute_precision(FinetuneConfig(mode="lora", precision="fp32"), "cpu").autocast is None


def test_frozen_head_loss_in_bf16_is_close_to_float32():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    mask = torch.ones(3, 5)
    exact = head_loss(hidden, head.weight, targets, mask)
    rounded = FrozenHeadLoss(head, dtype=torch.bfloat16)(hidden, targets, mask)
    assert rounded.dtype == torch.float32  # the softmax and the loss stay float32
    assert torch.allclose(rounded, exact, rtol=2e-2, atol=2e-2) and not torch.equal(rounded, exact)
    (grad_exact,) = torch.autograd.grad(exact.sum(), hidden)
    (grad_rounded,) = torch.autograd.grad(rounded.sum(), hidden)
    assert torch.allclose(grad_rounded, grad_exact, atol=5e-2)
