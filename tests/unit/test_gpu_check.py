"""benchmarks/gpu_check.py --smoke: the GPU check's own code, run on the CPU at tiny shapes.

It runs in a subprocess (the check is a flat script) with two of the paper's five models, GPT-2 (full
fine-tuning, hooks, the fast sampler against HF generate) and Llama-2-7B's QLoRA path (4-bit base, LoRA
r=8 on q, k, v, o), and must report: every clipping case within its stated tolerance (the update AdamW
receives against the clipped sum of per-record gradients over E), the fast sampler's greedy tokens equal
to HF generate's, and a table row for every model of configs/paper.yaml. About a minute on an idle
2-core CPU, most of it the clipping cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAPER_MODELS = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b"]


@pytest.fixture(scope="module")
def smoke() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--json",
                           "--models", "gpt2,llama-2-7b"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_clipping_matches_the_per_record_loop_within_tolerance(smoke):
    cases = {row["case"]: row for row in smoke["clipping"]}
    assert len(cases) == 7
    for name, row in cases.items():
        assert "error" not in row, (name, row)
        assert row["ok"] and row["rel_error"] <= row["tol"], (name, row)
        assert row["divisor"] == 6 and 0 < row["clipped"] < row["records"]  # E = int(N q); some clipped
    assert cases["gpt2 full hooks bf16-mixed"]["autocast"] == "torch.bfloat16"
    assert cases["gpt2 full hooks bf16-mixed"]["rel_error"] > 1e-6  # bf16 really ran
    # TF32 kept out of the clipped sum: against Opacus's own per-sample gradients, flags off while it summed
    own = cases["gpt2 full hooks fp32 (TF32, fp32 sum)"]
    assert own["tol"] == 1e-5 and own["tf32_in_clipping"] is False
    assert all(row["ok"] for row in smoke["greedy"]) and len(smoke["greedy"]) == 2
    assert smoke["clipping_ok"] is True


def test_table_has_a_row_per_paper_model(smoke):
    rows = {row["model"]: row for row in smoke["table"]}
    assert list(rows) == PAPER_MODELS
    for name in ("gpt2", "llama-2-7b"):
        row = rows[name]
        assert row["total_h"] == pytest.approx(row["finetune_h"] + row["sample_h"] + row["evaluate_h"])
        assert row["finetune_h"] > 0 and row["sample_h"] > 0 and row["evaluate_h"] > 0
    assert rows["gpt2"]["classifiers"] == 3 and rows["llama-2-7b"]["classifiers"] == 2
    assert rows["gpt2-xl"]["total_h"] is None and rows["gpt2-xl"]["skipped"]
    assert smoke["models"]["llama-2-7b"]["mode"] == "qlora"
    assert smoke["models"]["gpt2"]["fast_over_hf"] > 0
    assert smoke["targets"]["sweep_complete"] is False and smoke["targets"]["sweep_under_4_h"] is None
