"""notebooks/05_report.ipynb runs on a small sweep's files (testkit.report_sweep) and its checked cells reproduce."""

from __future__ import annotations

import json
import math

import papermill
from testkit import NOTEBOOKS, REPO, REPORT_N_TEST, REPORT_ZERO_SHOT, nbval_check, report_sweep


def test_report_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report_sweep(tmp_path / "runs")
    out = tmp_path / "runs" / "report"
    executed = tmp_path / "05_report.ipynb"  # (testkit.execute_notebook's own out_dir would clash with the parameter)
    papermill.execute_notebook(str(NOTEBOOKS / executed.name), str(executed), kernel_name="python3", cwd=str(REPO),
                               parameters={"runs_dir": str(tmp_path / "runs"), "out_dir": str(out)},
                               progress_bar=False)

    cells = json.loads(executed.read_text())["cells"]
    outputs = [o for cell in cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    printed = "".join("".join(o.get("text", "")) for o in outputs)
    shown = "".join("".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "4 runs, 13 rows" in printed
    assert "rows per source: real 1, dp_classifier 4, synthetic 4, pe 3, zero_shot 1" in printed
    # the findings, computed from the table: the DP fine-tuned set at epsilon 8 against zero-shot
    se = math.sqrt(0.70 * 0.30 / REPORT_N_TEST + REPORT_ZERO_SHOT * (1 - REPORT_ZERO_SHOT) / REPORT_N_TEST)
    assert f"epsilon 8 (eps8): **+0.150** ({0.15 / se:+.1f} s.e.)" in shown
    assert "**Private Evolution (tiny-llama)**" in shown and "no change beyond test noise" in shown
    assert "Every run in the table spent its own privacy budget" in shown
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4
    for name in ("accuracy_vs_epsilon.png", "mauve_vs_epsilon.png", "loss_vs_step.png", "loss_vs_epsilon.png"):
        assert (out / name).stat().st_size > 1000
    nbval_check(executed)
