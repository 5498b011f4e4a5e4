"""End to end: `dpnb run` over all four stage notebooks on tiny settings, then skip, refuse, force,
a sweep of two runs and the report over them. Offline, CPU, tiny random models."""

from __future__ import annotations

import math

import pytest
from testkit import tiny_config, write_config

from dpnb import pipeline
from dpnb.errors import DpnbError
from dpnb.io import read_json, read_jsonl
from dpnb.privacy import guarantee, independent_accounting
from dpnb.registry import STAGES
from dpnb.rundir import RunDir
from dpnb.sweep import run_sweep


@pytest.mark.slow
def test_whole_pipeline_skip_refuse_force(tmp_path, toy_data_dir, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(toy_data_dir, tmp_path / "runs"))
    run = RunDir(pipeline.run_pipeline(config, {}))

    for stage in ("prepare", "finetune", "generate", "evaluate"):
        assert run.is_complete(stage)
        assert (run.notebooks / STAGES[stage].notebook).exists()  # executed notebooks are kept
    record = read_json(run.privacy)
    assert record["dp"] is True and 0 < record["epsilon"] <= 8
    guarantee.verify_privacy(record)  # Opacus recomputes the saved epsilon
    assert independent_accounting.cross_check(record)["agrees"]  # and so does Google's dp-accounting
    log = read_jsonl(run.train_log)
    assert log[0]["step"] == 0 and log[0]["epsilon"] == 0
    assert log[-1]["step"] == record["steps"] and math.isclose(log[-1]["epsilon"], record["epsilon"], rel_tol=1e-6)
    metrics = read_json(run.metrics)
    for source in ("real", "synthetic", "zero_shot"):
        assert 0 <= metrics[source]["accuracy"] <= 1 and metrics[source]["n_test"] == 60
    card = (run.synthetic / "README.md").read_text()
    assert f"{record['epsilon']:.2f}" in card

    # Rerun: every stage is complete with the same config, so nothing runs.
    capsys.readouterr()
    pipeline.run_pipeline(config, {})
    out = capsys.readouterr().out
    assert out.count("skipped") == 4

    # A different privacy setting for the same run directory is refused, not silently overwritten.
    with pytest.raises(DpnbError, match="different config"):
        pipeline.run_pipeline(config, {"finetune.target_epsilon": 4})
    assert read_json(run.privacy)["epsilon"] == record["epsilon"]

    # Forced, it reruns fine-tuning and everything after it.
    pipeline.run_pipeline(config, {"finetune.target_epsilon": 4}, force=True, stages=["finetune", "generate"])
    assert read_json(run.privacy)["epsilon"] <= 4
    assert "4.0" in str(run.completed_config("finetune")["target_epsilon"])


@pytest.mark.slow
def test_sweep_of_two_runs_and_the_report(tmp_path, toy_data_dir):
    config = tiny_config(toy_data_dir, tmp_path / "runs")
    config["finetune"]["top_layers"] = 1  # the frozen-prefix cache, which the two runs share
    config["sweep"] = {"name": "eps{finetune.target_epsilon}", "grid": {"finetune.target_epsilon": [2, 8]}}
    names = run_sweep(write_config(tmp_path / "sweep.yaml", config), jobs=1)
    assert names == ["eps2", "eps8"]
    runs = [RunDir(tmp_path / "runs" / n) for n in names]
    epsilons = [read_json(run.privacy)["epsilon"] for run in runs]
    assert epsilons[0] <= 2 < epsilons[1] <= 8

    # What the two runs compute alike, the first computes and the second takes from runs/shared/.
    shared = sorted(p.name.split("-")[0] for p in (tmp_path / "runs" / "shared").iterdir())
    assert shared == ["prefix", "real", "shards"]  # the cache, the real-data classifier, the zero-shot shards
    stages = ("finetune", "generate", "evaluate")
    finetune, generate, evaluate = (runs[1].notebooks / STAGES[stage].notebook for stage in stages)
    assert "shared by the sweep's runs, mapped from" in finetune.read_text()
    assert "sampled alike by an earlier run of the sweep" in generate.read_text()
    assert "an earlier run of the sweep trained on the same texts" in evaluate.read_text()
    zero_shot = [(run.zero_shot / "samples.jsonl").read_text() for run in runs]
    assert zero_shot[0] == zero_shot[1]

    out = pipeline.run_report(str(tmp_path / "runs"))
    table = (out / "table.csv").read_text().splitlines()
    assert table[0].startswith("source,run,model")
    assert sum(line.startswith("synthetic,") for line in table) == 2
    assert sum(line.startswith("real,") for line in table) == 1  # same data and classifier: one row
    assert sum(line.startswith("zero_shot,") for line in table) == 1
