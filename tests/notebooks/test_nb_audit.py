"""notebooks/06_audit.ipynb runs on a tiny run directory (real prepare and finetune stages, tiny-llama)."""

from __future__ import annotations

import json

import pytest
from testkit import TINY_AUDIT, TINY_FINETUNE, execute_notebook, nbval_check

from dpnb.auditing import attacks
from dpnb.config import FinetuneConfig, PrepareConfig
from dpnb.rundir import RunDir
from dpnb.stages import finetune, prepare


def checked_outputs(executed) -> list[str]:
    cells = json.loads(executed.read_text())["cells"]
    return ["".join("".join(output.get("text", "")) for output in cell["outputs"]) for cell in cells
            if "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT")]


@pytest.mark.slow
def test_audit_notebook(toy_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = RunDir(tmp_path / "run")
    prepare.run_stage(run, PrepareConfig(source=str(toy_data_dir), model="tiny-llama", n_train=16, n_test=40,
                                      max_length=16))
    main = {**TINY_FINETUNE, "max_steps": 1, "logical_batch_size": 16, "physical_batch_size": 16}
    finetune.run_stage(run, FinetuneConfig(**main))
    # the twins train on 16 records + canaries, 2 steps; a few samples exercise the synthetic-data attack
    overrides = {"max_steps": 2, "logical_batch_size": 32, "physical_batch_size": 32}
    config = {**TINY_AUDIT, "finetune_overrides": overrides, "synthetic_per_label": 2, "synthetic_max_new_tokens": 8}
    executed = execute_notebook("06_audit.ipynb", tmp_path / "executed", run_dir=str(run.path), config=config)

    counts, privacy, ceilings, verdicts, caveats, ceiling_answer, group_answer = checked_outputs(executed)
    summary = json.loads(run.audit.read_text())
    n_inserted = summary["canaries"]["n_inserted"]
    assert f"canaries: 20 ({n_inserted} inserted, each 4 time(s)); 40 reference canaries never inserted" in counts
    assert f"training records: 16 real + canaries = {16 + 4 * n_inserted}" in counts
    assert "nodp: no DP" in privacy and "dp: DP-SGD" in privacy
    assert "claim tested by the audit (for a group of 4 copies)" in privacy
    assert "nodp: no DP (no clipping, no noise): no claim, epsilon = infinity; its bound is at delta 0" in privacy
    assert "2.647" in ceilings and "5.428" in ceilings  # 64 and 1000 canaries at delta 0
    # canaries repeated 4 times: the DP twin's group claim (delta about 0.2 here) leaves the audit nothing to test
    dp, nodp = summary["twins"]["dp"]["judgement"], summary["twins"]["nodp"]["judgement"]
    assert dp["status"] == "vacuous" and not dp["safeguard_can_fire"] and dp["group_size"] == 4
    assert nodp["status"] == "no_claim" and nodp["audit_delta"] == 0.0
    assert "dp: claim epsilon" in verdicts and "verdict [vacuous]: vacuous:" in verdicts
    assert "nodp: claim none (epsilon = infinity)" in verdicts and "verdict [no_claim]" in verdicts
    # the caveats give the counts of this run's files, not typed ones
    twin = summary["twins"]["dp"]["privacy"]
    assert (f"The twins trained on 16 real records + {4 * n_inserted} canary records = {16 + 4 * n_inserted} "
            f"(planned for N = {16 + 4 * 20}, every canary inserted), {twin['steps']} step(s)") in caveats
    own = json.loads(run.privacy.read_text())
    assert f"The run's own model trained on {own['dataset_size']} records, {own['steps']} step(s)" in caveats
    assert "audit.finetune_overrides changed logical_batch_size, max_steps, physical_batch_size" in caveats
    # the exercises' answers, computed by the audit's code
    assert f"certifying epsilon 8 takes {attacks.canaries_to_certify(8.0):,} canaries" in ceiling_answer
    assert "   256 canaries: ceiling 4.059" in ceiling_answer
    record = summary["twins"]["dp"]["claim"]
    epsilon_4, delta_4 = attacks.group_privacy(record["record_epsilon"], record["record_delta"], 4)
    assert f"a canary inserted 4 times: epsilon {epsilon_4:.3f}, delta {delta_4:.3g}" in group_answer
    assert run.is_complete("audit")
    for twin in ("dp", "nodp"):
        assert (run.path / "audit" / twin / "audit.json").exists()
        assert summary["twins"][twin]["synthetic"]["n_texts"] == 4
    assert (run.figures / "audit_roc.png").exists() and (run.figures / "audit_exposure.png").exists()
    nbval_check(executed)  # re-executes: the completed stage is read back, the checked cells must match
