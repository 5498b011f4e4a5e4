"""benchmarks/bench_finetune.py at tiny shapes: each case computes in the format its label says.

It runs the benchmark (a flat script) in a subprocess with tiny-llama, random records and one timed
step of 4 records, on the float32 top-block case and the float32/bf16 pair, and checks what each case
reports it ran: the float32 cases in float32 throughout (no bf16 autocast left on by `precision:
auto`), the bf16 case as the finetune stage runs bf16 (bf16 frozen computations, bf16 autocast over
float32 weights), both on the same records with first losses that differ by bf16 rounding only; and
that the ratios and the machine's facts are in the JSON. Timings are not checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict:
    # bf16 stated fast: a float32 case that left `precision: auto` on would then run under bf16 autocast
    env = dict(os.environ, HF_HUB_OFFLINE="1", DPNB_BF16_SPEEDUP="5")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_finetune.py"), "--model", "tiny-llama",
                           "--tops", "1", "1", "--logical", "4", "--physical", "2", "--steps", "1", "--threads", "1",
                           "--data", "random", "--only", "hooks_cache_top1,precision", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_each_case_computes_in_its_stated_format(report):
    assert report["failed"] == {}
    cases = {case["key"]: case for case in report["cases"]}
    assert sorted(cases) == ["hooks_cache_top1", "hooks_cache_top1_r8_qv_bf16", "hooks_cache_top1_r8_qv_fp32"]
    for key in ("hooks_cache_top1", "hooks_cache_top1_r8_qv_fp32"):
        assert cases[key]["precision"]["dtype"] == "float32" and cases[key]["precision"]["autocast"] is None
        assert cases[key]["frozen_copy_s"] == 0.0
    bf16, fp32 = cases["hooks_cache_top1_r8_qv_bf16"], cases["hooks_cache_top1_r8_qv_fp32"]
    assert bf16["precision"]["dtype"] == "bfloat16" and bf16["precision"]["autocast"] == "bfloat16"
    assert bf16["trainable"] == fp32["trainable"] > cases["hooks_cache_top1"]["trainable"]  # r=8 on q and v
    assert bf16["tokens"] == fp32["tokens"] and bf16["cache_build_s"] > 0 and fp32["cache_build_s"] > 0
    assert bf16["loss_first"] != fp32["loss_first"]  # bf16 really ran
    assert bf16["loss_first"] == pytest.approx(fp32["loss_first"], rel=0.02)  # and only rounded


def test_ratios_and_machine_are_reported(report):
    assert report["speedup_bf16_dp_step"] > 0 and report["speedup_bf16_cache_build"] > 0
    assert report["bf16_matmul_speedup"] == report["machine"]["bf16_matmul_speedup"] > 0
    assert report["machine"]["auto_picks"] in ("bfloat16", "float32")  # measured, whatever is stated
    assert report["machine"]["bf16_speedup_stated"] == "5"
    assert report["machine"]["cores"] >= 1 and len(report["machine"]["load_average"]) == 3
    assert report["ratio_definitions"]["speedup_bf16_dp_step"].startswith("hooks_cache_top1_r8_qv_fp32 / ")
