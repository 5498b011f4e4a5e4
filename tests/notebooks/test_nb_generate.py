"""notebooks/03_generate.ipynb runs on a tiny run directory (real prepare and finetune, tiny-llama)."""

from __future__ import annotations

import json
import re

from testkit import execute_notebook, nbval_check

from dpnb.config import FinetuneConfig, PrepareConfig
from dpnb.rundir import RunDir
from dpnb.stages import finetune, prepare


def test_generate_notebook(tmp_path, toy_data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = RunDir(tmp_path / "run")
    prepare.run_stage(run, PrepareConfig(source=str(toy_data_dir), model="tiny-llama", n_train=40, n_test=20,
                                      max_length=32))
    finetune.run_stage(run, FinetuneConfig(mode="full", target_epsilon=8, epochs=1, max_steps=1,
                                           logical_batch_size=8, physical_batch_size=8, device="cpu",
                                           samples_before_after=0))
    config = {"n_per_label": 3, "max_new_tokens": 6, "batch_size": 3, "shard_size": 3, "device": "cpu",
              "min_words": 0}
    executed = execute_notebook("03_generate.ipynb", tmp_path / "executed", run_dir=str(run.path), config=config)

    checked = next(cell for cell in json.loads(executed.read_text())["cells"]
                   if "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT"))
    printed = "".join("".join(output.get("text", "")) for output in checked["outputs"])
    for name in ("synthetic", "zero_shot"):
        for label in ("negative", "positive"):
            assert re.search(rf"{name}\s+{label}\s+3\s+3", printed), printed
    summary = json.loads((run.synthetic / "generation.json").read_text())
    assert summary["requested"] == {"negative": 3, "positive": 3}
    assert (run.figures / "generated_lengths.png").exists()
    nbval_check(executed)
