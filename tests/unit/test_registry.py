"""The stage list is the single source: configs, notebooks, the command line and staleness read it."""

from __future__ import annotations

import dataclasses
import time

import pytest
import yaml

from dpnb import cli, pipeline, registry
from dpnb.config import AuditConfig, FinetuneConfig, GenerateConfig, PrepareConfig
from dpnb.errors import DpnbError
from dpnb.registry import STAGES
from dpnb.runconfig import RunConfig, run_config_from_dict
from dpnb.rundir import RunDir


def test_every_stage_has_its_notebook_and_a_run_config_section():
    notebooks = pipeline.notebook_dir()
    run_fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name, stage in STAGES.items():
        assert stage.name == name
        assert (notebooks / stage.notebook).exists()
        assert isinstance(RunConfig().stage(name), stage.config_class)
        assert name in run_fields
    assert (notebooks / registry.REPORT_NOTEBOOK).exists()
    assert (notebooks / registry.TEACHING_NOTEBOOK).exists()
    assert len({s.notebook for s in STAGES.values()}) == len(STAGES)


def test_upstream_stages_are_stages_listed_before_them():
    order = list(STAGES)
    for name, stage in STAGES.items():
        for dep in stage.upstream:
            assert dep in STAGES and order.index(dep) < order.index(name)


def test_the_command_line_accepts_exactly_the_registered_stages(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "r", "runs_dir": str(tmp_path), "model": "tiny-llama"}))
    assert cli.main(["run", str(config), "--stages", "prepare,train"]) == 2
    assert f"unknown stage 'train'; stages are {', '.join(STAGES)}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(DpnbError, match="stages"):
        run_config_from_dict({"stages": ["prepare", "train"]})
    run = run_config_from_dict({"stages": list(STAGES)})
    assert run.stages == tuple(STAGES)


def test_unknown_stage_names_are_refused_by_name():
    with pytest.raises(DpnbError, match=r"unknown stage 'train'; stages are prepare, finetune"):
        registry.stage("train")
    with pytest.raises(DpnbError, match="unknown stage"):
        RunDir("x").executed_notebook("train")


def test_run_dir_paths_follow_the_registry(tmp_path):
    run = RunDir(tmp_path)
    assert run.executed_notebook("finetune") == tmp_path / "notebooks" / STAGES["finetune"].notebook
    assert run.partial("evaluate") == tmp_path / "evaluate"
    twin = run.twin("dp")
    assert isinstance(twin, RunDir) and twin.privacy == tmp_path / "audit" / "dp" / "privacy.json"
    assert run.checkpoint.parent == run.checkpoints


def test_clear_training_removes_every_earlier_training_output(tmp_path):
    run = RunDir(tmp_path)
    for path in (run.privacy, run.train_log, run.checkpoint, run.model / "weights"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old")
    run.clear_training()
    assert not run.privacy.exists() and not run.train_log.exists()
    assert not run.checkpoint.exists() and not run.model.exists()


def test_is_current_is_false_true_or_refuses(tmp_path):
    run = RunDir(tmp_path)
    cfg = PrepareConfig(n_train=10)
    assert run.is_current("prepare", cfg) is False  # not complete: run it
    run.mark_complete("prepare", cfg, time.time())
    assert run.is_current("prepare", cfg) is True
    with pytest.raises(DpnbError, match="already finished with a different config"):
        run.is_current("prepare", PrepareConfig(n_train=11))
    assert run.is_complete("prepare")  # asking never removes a marker; only should_run(force=True) does


def test_only_the_stages_downstream_of_a_rerun_go_stale(tmp_path):
    run = RunDir(tmp_path)
    run.mark_complete("prepare", PrepareConfig(), time.time())
    run.mark_complete("finetune", FinetuneConfig(), time.time())
    run.mark_complete("generate", GenerateConfig(), time.time())
    run.mark_complete("audit", AuditConfig(), time.time())
    run.mark_complete("generate", GenerateConfig(), time.time())  # generate reruns
    assert "generate" not in STAGES["audit"].upstream
    assert run.is_current("audit", AuditConfig())  # audit does not read generate's outputs
    assert run.is_current("finetune", FinetuneConfig())
    run.mark_complete("finetune", FinetuneConfig(), time.time())  # finetune reruns
    assert "finetune" in STAGES["audit"].upstream
    with pytest.raises(DpnbError, match="inputs that have since changed"):
        run.is_current("audit", AuditConfig())
