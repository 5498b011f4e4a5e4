"""notebooks/01_prepare.ipynb runs headlessly with small parameters and its checked outputs reproduce."""

from __future__ import annotations

import nbformat
from testkit import execute_notebook, nbval_check

from dpnb.io import read_json


def test_prepare_notebook_executes_and_reproduces(tmp_path, toy_data_dir):
    run_dir = tmp_path / "run"
    config = {"source": str(toy_data_dir), "model": "tiny-llama", "n_train": 60, "n_test": 40,
              "max_length": 64, "prompt_format": "chat"}
    executed = execute_notebook("01_prepare.ipynb", tmp_path / "out", run_dir=str(run_dir), config=config)

    stats = read_json(run_dir / "data_stats.json")
    assert stats["splits"]["train"]["per_label"] == {"negative": 30, "positive": 30}
    outputs = "\n".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for cell in nbformat.read(executed, as_version=4).cells if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "--- prompt: " in outputs and "Write a positive movie review." in outputs
    assert read_json(run_dir / "data" / "manifest.json")["train_sha256"] in outputs
    nbval_check(executed)
