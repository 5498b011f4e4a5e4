"""The run directory: atomic writes, strict JSON, completion markers and staleness."""

from __future__ import annotations

import json
import math
import time

import pytest

from dpnb.config import FinetuneConfig, PrepareConfig
from dpnb.errors import DpnbError
from dpnb.io import append_jsonl, atomic_directory, read_jsonl, write_json_atomic
from dpnb.rundir import RunDir


def test_json_is_strict_and_infinity_becomes_null(tmp_path):
    path = write_json_atomic(tmp_path / "p.json", {"epsilon": math.inf, "dp": False, "x": [1.0, math.nan]})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"epsilon": None, "dp": False, "x": [1.0, None]}
    assert not list(tmp_path.glob(".*.tmp"))


def test_jsonl_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 0})
    append_jsonl(path, {"step": 1})
    with open(path, "a") as handle:
        handle.write('{"step": 2, "los')
    assert [r["step"] for r in read_jsonl(path)] == [0, 1]


def test_atomic_directory_keeps_the_old_version_when_writing_fails(tmp_path):
    target = tmp_path / "data"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "a.txt").write_text("new, half written")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_stage_markers_skip_refuse_and_force(tmp_path):
    run = RunDir(tmp_path)
    cfg = PrepareConfig(n_train=10)
    assert run.should_run("prepare", cfg)
    run.mark_complete("prepare", cfg, time.time())
    assert not run.should_run("prepare", cfg)
    with pytest.raises(DpnbError, match="already finished with a different config.*force"):
        run.should_run("prepare", PrepareConfig(n_train=11))
    assert run.should_run("prepare", PrepareConfig(n_train=11), force=True)
    assert not run.is_complete("prepare")  # a forced run that fails leaves no stale marker


def test_rerunning_an_upstream_stage_makes_downstream_stale(tmp_path):
    run = RunDir(tmp_path)
    run.mark_complete("prepare", PrepareConfig(seed=0), time.time())
    run.mark_complete("finetune", FinetuneConfig(), time.time())
    assert not run.should_run("finetune", FinetuneConfig())
    run.mark_complete("prepare", PrepareConfig(seed=1), time.time())
    with pytest.raises(DpnbError, match="inputs that have since changed"):
        run.should_run("finetune", FinetuneConfig())


def test_require_stage_names_the_missing_stage(tmp_path):
    with pytest.raises(DpnbError, match="stage 'prepare' has not completed"):
        RunDir(tmp_path).require_stage("prepare")
