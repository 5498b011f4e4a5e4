"""notebooks/03_generate.ipynb runs on a tiny run directory (real prepare and finetune, tiny-llama)."""

from __future__ import annotations

import json
import re

from testkit import execute_notebook, nbval_check

from dpnb.config import FinetuneConfig, PrepareConfig
from dpnb.generation.sampling import load_synthetic
from dpnb.privacy.guarantee import round_up
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
              "min_words": 0, "pe": True, "pe_pool_factor": 2}
    executed = execute_notebook("03_generate.ipynb", tmp_path / "executed", run_dir=str(run.path), config=config)

    cells = json.loads(executed.read_text())["cells"]
    checked = next(cell for cell in cells if "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT"))
    printed = "".join("".join(output.get("text", "")) for output in checked["outputs"])
    for name in ("synthetic", "zero_shot"):
        for label in ("negative", "positive"):
            assert re.search(rf"{name}\s+{label}\s+3\s+3", printed), printed
    pe = json.loads((run.pe / "generation.json").read_text())
    for label in ("negative", "positive"):  # PE: n_per_label requested, a pool twice as large voted on
        assert re.search(rf"pe\s+{label}\s+3\s+{pe['generated'][label]}\n", printed), printed
    summary = json.loads((run.synthetic / "generation.json").read_text())
    assert summary["requested"] == {"negative": 3, "positive": 3}
    assert (run.figures / "generated_lengths.png").exists()

    # the Private Evolution section: its privacy record and noisy votes, read from pe/, and its samples
    def outputs_of(start: str) -> list[dict]:
        cell = next(c for c in cells if c["cell_type"] == "code" and start in "".join(c["source"]))
        return cell["outputs"]

    def text_of(start: str) -> str:
        return "".join("".join(o.get("text", "")) for o in outputs_of(start))

    record = json.loads((run.pe / "privacy.json").read_text())
    report = text_of("generate.pe_report(")
    assert f"sigma = {record['noise_multiplier']:.4f}" in report and f"({round_up(record['epsilon'])}, " in report
    assert f"pool: {pe['evolution']['pool_per_label']}" in report
    votes = json.loads((run.pe / "votes.json").read_text())
    assert len(votes["iterations"][0]["noisy_votes"]) == sum(pe["generated"].values())
    assert any("image/png" in o.get("data", {}) for o in outputs_of("generate.PE_VOTES_FIGURE"))
    samples = text_of("generate.examples(")
    first_pe = load_synthetic(run.pe)[0]
    assert "===== pe =====" in samples and f"[{first_pe['label_name']}] {first_pe['text'][:40]}" in samples
    nbval_check(executed)
