"""notebooks/02_finetune.ipynb runs on a tiny run directory (real prepare stage, tiny-llama, LoRA, DP)."""

from __future__ import annotations

import json

from testkit import execute_notebook, nbval_check

from dpnb.privacy import independent_accounting
from dpnb.privacy import guarantee
from dpnb.config import PrepareConfig
from dpnb.rundir import RunDir
from dpnb.stages import prepare


def test_finetune_notebook(tmp_path, toy_data_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = RunDir(tmp_path / "run")
    prepare.run_stage(run, PrepareConfig(source=str(toy_data_dir), model="tiny-llama", n_train=40, n_test=20,
                                      max_length=32))
    config = {"mode": "lora", "lora_r": 2, "target_epsilon": 8, "accountant": "rdp", "max_steps": 3,
              "logical_batch_size": 8, "physical_batch_size": 8, "device": "cpu", "samples_before_after": 1}
    executed = execute_notebook("02_finetune.ipynb", tmp_path / "executed", run_dir=str(run.path), config=config)

    record = json.loads(run.privacy.read_text())
    assert record["steps"] == 3 and record["mode"] == "lora" and record["dataset_size"] == 40
    guarantee.verify_privacy(record)
    # what 01 says: the data's hash is in the private checkpoints/identity.json, never in privacy.json
    manifest = json.loads(run.manifest.read_text())
    assert manifest["train_sha256"] not in run.privacy.read_text() and "sha256" not in run.privacy.read_text()
    assert json.loads(run.training_identity.read_text())["train_sha256"] == manifest["train_sha256"]
    assert independent_accounting.cross_check(record)["agrees"]
    cells = json.loads(executed.read_text())["cells"]
    checked = next(cell for cell in cells if "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT"))
    printed = "".join("".join(output.get("text", "")) for output in checked["outputs"])
    assert f"(epsilon, delta) = ({record['epsilon']:.2f}, {record['delta']:.3g})" in printed, printed
    assert f"sigma = {record['noise_multiplier']:.4f}" in printed and "3 noise-adding steps" in printed
    outputs = "".join("".join(o.get("text", "")) for cell in cells for o in cell.get("outputs", []))
    assert "[negative] before:" in outputs and "[positive] after:" in outputs
    assert (run.figures / "loss_vs_epsilon.png").exists()
    assert run.is_complete("finetune")
    nbval_check(executed)
