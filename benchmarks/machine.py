"""The machine a benchmark ran on, printed first by every benchmark: a speed figure means little without it.

CPU model, its bf16 flags (AVX512-BF16, AMX), the cores this process may use, torch's threads and
the load average (a busy machine's figures are indicative only), and bf16's matrix-product speedup
over float32 as `dpnb.precision.bf16_speedup` measures it (what `precision: auto` decides on: bf16
where it is at least `MIN_SPEEDUP`). The speedup is always measured here, even when
$DPNB_BF16_SPEEDUP states one (which the facts record beside it), so a reader can set the plain
matmul ratio against the ratios a benchmark realises.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of BF16_FLAGS it has (from /proc/cpuinfo; none elsewhere)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name, [flag for flag in BF16_FLAGS if flag in flags]


def machine_facts(threads: int | None = None) -> dict[str, Any]:
    """The machine's facts with `threads` torch threads (set here when given), bf16's speedup measured."""
    import torch

    from dpnb.precision import MIN_SPEEDUP, SPEEDUP_ENV, bf16_speedup

    if threads:
        torch.set_num_threads(threads)
    name, flags = cpu_model_and_flags()
    speedup = bf16_speedup("cpu", torch.get_num_threads())  # measured, never the stated one
    return {
        "cpu": name, "bf16_flags": flags, "cores": len(os.sched_getaffinity(0)), "os_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "bf16_matmul_speedup": round(speedup, 2),
        "auto_picks": "bfloat16" if speedup >= MIN_SPEEDUP else "float32",
        "bf16_speedup_stated": os.environ.get(SPEEDUP_ENV),
    }


def describe(facts: dict[str, Any]) -> str:
    """Two lines for the top of a benchmark's output."""
    from dpnb.precision import MIN_SPEEDUP, SPEEDUP_ENV

    stated = facts["bf16_speedup_stated"]
    return (f"machine: {facts['cpu']}; flags {', '.join(facts['bf16_flags']) or 'none of ' + '/'.join(BF16_FLAGS)}; "
            f"{facts['cores']} cores, {facts['torch_threads']} torch threads, torch {facts['torch']} "
            f"({facts['cpu_capability']}); load average {' '.join(map(str, facts['load_average']))}\n"
            f"bf16 matmul measured {facts['bf16_matmul_speedup']:.2f}x float32 (dpnb.precision, "
            f"{facts['torch_threads']} threads): precision auto picks {facts['auto_picks']} here "
            f"(bf16 at >= {MIN_SPEEDUP:g}x)" + (f"; ${SPEEDUP_ENV}={stated} is set" if stated else ""))
