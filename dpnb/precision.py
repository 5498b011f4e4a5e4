"""Which number format to compute in: float32, or bfloat16 where this machine runs it fast.

bfloat16 (bf16) keeps float32's 8-bit exponent and cuts the mantissa to 7 bits (about 2-3 significant
digits). Where a processor has bf16 units (CUDA GPUs since Ampere; CPUs with AVX512-BF16 or AMX) a
bf16 matrix product runs several times faster than a float32 one; where it has none, bf16 is emulated
and runs at well under 1 GFLOP/s, hundreds of times slower. Machines of one kind differ, so the choice
is made by measuring, never by assuming: `bf16_speedup` times a square matrix product in both formats
on the device (about a second, once per process) and "auto" takes bf16 when it is at least
`MIN_SPEEDUP` times faster.

What runs in bf16 when it is chosen, and what never does:

- frozen forward passes, whose outputs are data, not something the privacy guarantee rests on:
  the frozen blocks below the trained ones (the frozen-prefix cache), the frozen LM head's loss,
  sampling, the sentence encoder of the embedding classifier, MAUVE and Private Evolution;
- the trainable blocks' forward and backward under autocast (`torch.autocast`), with float32 weights;
- never in bf16: the trainable weights, the per-record gradients (promoted to float32 before Opacus
  takes their norms: a bf16 norm rounded down would let a record exceed the clipping bound C), the
  norms, the clip factors, the clipped sum, the Gaussian noise and AdamW's state
  (`dpnb.training.dpsgd.compute_precision`). bf16 changes which function of a record the model computes, by
  rounding; it never changes how much one record can move the update, so the guarantee is unchanged.

The choice and the measured ratio are recorded in the files of the stage that used them (the model
card, generation.json, metrics.json), so a reader can tell which numbers came from which format.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dpnb.errors import DpnbError

MIN_SPEEDUP = 2.0  # bf16 must beat float32 by at least this much to be worth its rounding
SPEEDUP_ENV = "DPNB_BF16_SPEEDUP"  # a stated ratio instead of the measurement (tests; forcing float32)
MATMUL_SIZE = 768  # a square product of the size of a small model's projections (timed in both formats)


@dataclass(frozen=True)
class Precision:
    """The format chosen for one device: `dtype` for frozen computations, `autocast` for trained ones."""

    dtype: torch.dtype  # frozen weights and their forward passes (float32 or bfloat16)
    autocast: torch.dtype | None  # the trainable blocks' forward and backward (None: as the weights are)
    device_type: str  # "cpu" or "cuda"
    bf16_speedup: float | None  # measured float32 / bf16 time of a matmul on this device; None if not measured
    reason: str  # one sentence: what was chosen and why

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def frozen_forward(self) -> contextlib.AbstractContextManager:
        """Where a frozen forward pass over float32 weights runs: bf16 autocast when bf16 was chosen."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def record(self) -> dict[str, Any]:
        """What a stage writes into its files about the format it computed in."""
        record = asdict(self)
        record["dtype"] = self.dtype_name
        record["autocast"] = None if self.autocast is None else str(self.autocast).removeprefix("torch.")
        record["bf16_speedup"] = None if self.bf16_speedup is None else round(self.bf16_speedup, 2)
        return record


def _matmul_seconds(dtype: torch.dtype, device: torch.device, size: int = MATMUL_SIZE, repeats: int = 4) -> float:
    """Best-of-three seconds of one size x size matrix product in `dtype` on `device`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: the first call pays for kernel selection
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


@functools.lru_cache(maxsize=8)
def bf16_speedup(device: str = "cpu", threads: int | None = None) -> float:
    """float32 time / bf16 time of a matrix product on `device` with this process's torch threads.

    Measured once per process and device (about a second on a CPU without bf16 units, whose bf16
    product is timed on a smaller matrix so that the measurement itself stays short). `threads` only
    keys the cache: a process that changes its thread count measures again.
    """
    del threads  # part of the cache key only
    where = torch.device(device)
    fp32 = _matmul_seconds(torch.float32, where)
    # a CPU without bf16 units takes minutes for a 768^3 bf16 product: probe a small one first
    probe = 128
    small_bf16 = _matmul_seconds(torch.bfloat16, where, size=probe, repeats=1)
    small_fp32 = _matmul_seconds(torch.float32, where, size=probe, repeats=1)
    if small_bf16 > 20 * small_fp32:
        return small_fp32 / small_bf16
    return fp32 / _matmul_seconds(torch.bfloat16, where)


def _measured(device: str) -> float:
    """The measured speedup, or the one `$DPNB_BF16_SPEEDUP` states (tests pin both branches of "auto"
    with it, and a user can force float32 everywhere with DPNB_BF16_SPEEDUP=0)."""
    stated = os.environ.get(SPEEDUP_ENV)
    if stated:
        try:
            return float(stated)
        except ValueError as bad:
            raise DpnbError(f"${SPEEDUP_ENV} = {stated!r} is not a number; unset it to measure, or give a "
                            f"ratio such as 0 (always float32) or 5") from bad
    return bf16_speedup(device, torch.get_num_threads())


def choose(setting: str, device: str, *, trainable: bool = False) -> Precision:
    """The precision for `setting` ("auto", "fp32"/"float32", "bf16"/"bfloat16"/"bf16-mixed") on `device`.

    "auto": bf16 when the device runs a bf16 matrix product at least MIN_SPEEDUP times faster than a
    float32 one (measured), else float32. `trainable`: the caller trains weights (DP-SGD), so bf16
    means autocast over float32 weights, never bf16 weights.
    """
    where = torch.device(device)
    if setting in ("fp32", "float32"):
        return Precision(torch.float32, None, where.type, None, f"{setting} as configured")
    if setting in ("bf16", "bfloat16", "bf16-mixed"):
        speedup = _measured(device)
        return _bf16(where.type, speedup, trainable, f"{setting} as configured (bf16 matmul {speedup:.1f}x float32)")
    if setting != "auto":
        raise ValueError(f"unknown precision setting {setting!r}")
    if where.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(torch.float32, None, "cuda", None, "auto: this GPU has no bf16 support, float32")
    speedup = _measured(device)
    if speedup >= MIN_SPEEDUP:
        return _bf16(where.type, speedup, trainable,
                     f"auto: bf16 matmul measured {speedup:.1f}x float32 on this {where.type} (>= {MIN_SPEEDUP:g}x)")
    return Precision(torch.float32, None, where.type, speedup,
                     f"auto: bf16 matmul measured {speedup:.2f}x float32 on this {where.type} "
                     f"(< {MIN_SPEEDUP:g}x), float32")


def _bf16(device_type: str, speedup: float, trainable: bool, reason: str) -> Precision:
    return Precision(torch.bfloat16, torch.bfloat16 if trainable else None, device_type, speedup, reason)
