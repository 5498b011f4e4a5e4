"""Configs: unknown keys refused, YAML spellings accepted, bad values caught before any work."""

from __future__ import annotations

import copy

import pytest
from testkit import REPO

from dpnb.config import FinetuneConfig, PrepareConfig, build
from dpnb.errors import DpnbError
from dpnb.runconfig import load_run_config, read_config_values, run_config_from_dict, set_dotted
from dpnb.sweep import expand_sweep


def test_unknown_key_is_named_with_the_valid_ones():
    expected = r"unknown key\(s\) target_epsilom in FinetuneConfig; valid keys are:.*target_epsilon"
    with pytest.raises(DpnbError, match=expected):
        build(FinetuneConfig, {"target_epsilom": 3})


def test_yaml_scientific_notation_string_is_read_as_a_number():
    # YAML 1.1 reads "1e-2" (no dot) as a string; it is unambiguous, so it is accepted.
    cfg = build(FinetuneConfig, {"max_grad_norm": "1e-2", "epochs": 1})
    assert cfg.max_grad_norm == 0.01 and isinstance(cfg.epochs, float)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"target_epsilon": 0}, "target_epsilon must be a positive number"),
        ({"target_epsilon": -1.0}, "target_epsilon must be a positive number"),
        ({"delta": 1.5}, "delta must be in"),
        ({"physical_batch_size": 64, "logical_batch_size": 32}, "physical_batch_size .64. is larger than"),
        ({"mode": "nodp"}, "finetune.mode = 'nodp' is not one of"),
        ({"accountant": "gdp"}, "finetune.accountant"),
        ({"lr": "fast"}, "lr = 'fast' must be a number"),
        ({"dp": "yes"}, "dp = 'yes' must be true or false"),
    ],
)
def test_bad_finetune_values_fail_before_training(values, message):
    with pytest.raises(DpnbError, match=message):
        build(FinetuneConfig, values)


def test_lists_become_tuples_and_types_are_checked():
    cfg = build(PrepareConfig, {"label_names": ["neg", "pos"]})
    assert cfg.label_names == ("neg", "pos")
    with pytest.raises(DpnbError, match=r"label_names\[1\] = 2 must be a string"):
        build(PrepareConfig, {"label_names": ["neg", 2]})


def test_run_config_fills_model_and_seed_into_stages():
    run = run_config_from_dict({"name": "x", "model": "tiny-llama", "seed": 7, "finetune": {"seed": 3}})
    assert run.prepare.model == "tiny-llama"
    assert run.prepare.seed == 7 and run.generate.seed == 7 and run.finetune.seed == 3


def test_run_config_refuses_unknown_sections_and_stages():
    with pytest.raises(DpnbError, match="unknown key.*finetuning"):
        run_config_from_dict({"finetuning": {}})
    with pytest.raises(DpnbError, match="stages"):
        run_config_from_dict({"stages": ["prepare", "train"]})


def test_load_run_config_with_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nfinetune:\n  target_epsilon: 8\n")
    run = load_run_config(path, {"finetune.target_epsilon": 3, "name": "b"})
    assert run.finetune.target_epsilon == 3.0 and run.name == "b"
    with pytest.raises(DpnbError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(DpnbError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    path = REPO / "configs" / name
    if "sweep" not in read_config_values(path):
        load_run_config(path)
    else:
        runs, base = expand_sweep(str(path))
        for overrides in runs:
            load_run_config_from(base, overrides)


def load_run_config_from(base, overrides):
    values = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(values, key, value)
    return run_config_from_dict(values)


def test_a_config_takes_its_base_and_changes_only_what_it_names(tmp_path):
    (tmp_path / "base.yaml").write_text("name: demo\nseed: 3\nfinetune: {target_epsilon: 8, lr: 0.01}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nstages: [prepare, finetune, audit]\n"
                                         "finetune: {target_epsilon: 2}\naudit: {n_canaries: 64}\n")
    run = load_run_config(tmp_path / "child.yaml")
    assert run.name == "demo" and run.seed == 3 and run.stages == ("prepare", "finetune", "audit")
    assert run.finetune.target_epsilon == 2 and run.finetune.lr == 0.01  # sections merge key by key
    assert run.audit.n_canaries == 64
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(DpnbError, match="its own base"):
        load_run_config(tmp_path / "loop.yaml")
