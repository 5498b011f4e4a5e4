"""What a stage notebook's `config` means (dpnb.notebook.open_stage): the keys it names, over the run's own settings."""

from __future__ import annotations

import dataclasses
import time

from dpnb.config import FinetuneConfig, PrepareConfig
from dpnb.io import write_text_atomic
from dpnb.notebook import open_stage
from dpnb.runconfig import RunConfig, to_dict, to_yaml
from dpnb.rundir import RunDir

# a tiny run's fine-tuning, far from the paper's defaults (full fine-tuning, batches of 1,028, 5 epochs)
TINY = FinetuneConfig(mode="lora", lora_r=2, target_epsilon=8, accountant="rdp", epochs=1, max_steps=3,
                      logical_batch_size=8, physical_batch_size=8, max_grad_norm=1.0, lr=1e-3, device="cpu",
                      samples_before_after=1)


def completed_run(root) -> RunDir:
    run = RunDir(root / "run")
    run.mark_complete("prepare", PrepareConfig(model="tiny-llama", n_train=40, n_test=20), time.time())
    run.mark_complete("finetune", TINY, time.time())
    return run


def test_a_notebook_config_changes_only_the_keys_it_names(tmp_path, capsys):
    run = completed_run(tmp_path)
    _, cfg = open_stage("finetune", run.path, {"target_epsilon": 3})
    assert cfg == dataclasses.replace(TINY, target_epsilon=3.0)
    assert (cfg.mode, cfg.logical_batch_size, cfg.epochs) == ("lora", 8, 1.0)  # not the paper's full, 1028, 5
    assert "finetune: the settings it completed with (finetune.json), with target_epsilon from config" in \
        capsys.readouterr().out


def test_before_the_stage_completes_the_runs_config_yaml_is_the_base(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.mark_complete("prepare", PrepareConfig(model="tiny-llama", n_train=40, n_test=20), time.time())
    write_text_atomic(run.config_file, to_yaml(RunConfig(finetune=TINY)))
    _, cfg = open_stage("finetune", run.path, {"target_epsilon": 3, "lr": 1e-2})
    assert cfg == dataclasses.replace(TINY, target_epsilon=3.0, lr=1e-2)
    assert "the run's config.yaml, with lr, target_epsilon from config" in capsys.readouterr().out
    # a run with neither: the stage's defaults, and the notebook says so
    (tmp_path / "bare").mkdir()
    _, cfg = open_stage("finetune", tmp_path / "bare", {"target_epsilon": 3})
    assert cfg == FinetuneConfig(target_epsilon=3.0)
    assert "the defaults (no completed stage or config.yaml in the run)" in capsys.readouterr().out


def test_dpnb_run_passes_every_key_and_gets_exactly_its_config(tmp_path, capsys):
    run = completed_run(tmp_path)
    wanted = dataclasses.replace(FinetuneConfig(), target_epsilon=2.0, device="cpu")  # the defaults, except two
    _, cfg = open_stage("finetune", run.path, to_dict(wanted))
    assert cfg == wanted and capsys.readouterr().out == ""
    _, cfg = open_stage("finetune", run.path, None)  # reading: the completed config
    assert cfg == TINY
