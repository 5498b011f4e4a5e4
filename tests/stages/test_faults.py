"""Faults: SIGKILL in the middle of every stage, two runs on one directory, damaged files, a full disk.

The chain test kills one tiny five-stage run in every stage in turn, each time at a chosen point
of the stage's work (`dpnb.faults`: an environment variable read by a hook, no timings), then runs
the same command again, and finally compares the finished run, file by file, with the same config
run without interruption: bit-identical (the config is `deterministic: true`), the same epsilon.
The first kill holds the run mid-prepare, so a second `dpnb run` on the same directory meets the
first one's lock; the whole first run (the `dpnb run` process and its notebook kernel) is then
killed, and the next run takes over the lock it left. The later kills strike the notebook kernel
alone, as the out-of-memory killer would.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO, tiny_config, write_config

from dpnb import cli
from dpnb.faults import FAULT_ENV, READY_ENV
from dpnb.io import DamagedFile
from dpnb.runconfig import load_run_config
from dpnb.rundir import RunDir
from dpnb.training.checkpoints import load_checkpoint

STAGES = ["prepare", "finetune", "generate", "evaluate", "audit"]


def chain_config(toy_data_dir: Path, runs_dir: Path) -> dict:
    """Five stages at their smallest: 4 DP steps of the top block (a checkpoint every 2), 4 shards, an embedding
    classifier, 8 canaries."""
    config = tiny_config(toy_data_dir, runs_dir, stages=STAGES)
    config["finetune"].update(top_layers=1, samples_before_after=0, deterministic=True, accountant="rdp", device="cpu")
    config["generate"].update(zero_shot=False, device="cpu")
    config["evaluate"].update(classifier_kind="embedding", mauve=False, sources=["real", "synthetic"], device="cpu")
    config["audit"] = {"n_canaries": 8, "canary_repeats": 2, "canary_prefix_tokens": 3, "canary_suffix_tokens": 3,
                       "n_reference": 16, "n_mia": 8, "synthetic_per_label": 0, "batch_size": 32, "device": "cpu"}
    return config


def run_uninterrupted(config: str) -> Path:
    """The config's stages run one after the other in this process, as their notebooks run them."""
    run = load_run_config(config)
    for name in run.stages:
        importlib.import_module(f"dpnb.stages.{name}").run_stage(RunDir(run.run_dir), run.stage(name))
    return run.run_dir


def dpnb_run(config: str, fault: str | None = None, ready: Path | None = None) -> subprocess.Popen:
    """`dpnb run CONFIG` in a process of its own (with `$DPNB_FAULT_AT` = `fault`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop(FAULT_ENV, None)
    if fault:
        env.update({FAULT_ENV: fault, READY_ENV: str(ready)})
    return subprocess.Popen([sys.executable, "-m", "dpnb.cli", "run", config], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(ready: Path, proc: subprocess.Popen) -> int:
    """The pid the held process wrote to `ready` (polling the file, not a clock); fails if `proc` ends first."""
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it reached the fault point:\n{proc.stdout.read()[-3000:]}")
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
    return int(ready.read_text())


def run_in_process(config: str, capfd) -> tuple[int, str, str]:
    """`dpnb run CONFIG` through the real entry point in this process: exit status, stdout, stderr."""
    capfd.readouterr()
    status = cli.main(["run", config])
    out, err = capfd.readouterr()
    return status, out, err


TIMING = re.compile(r"wall|timing|seconds|per_second|finished_at")


def untimed(value):
    """A JSON value without the entries that record when or how long (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def contents(path: Path):
    if path.parent.name == "stages":  # a completion marker: its config (the rest is when, and of which inputs)
        return json.loads(path.read_text())["config"]
    if path.suffix == ".json":
        return untimed(json.loads(path.read_text()))
    if path.name == "log.jsonl":  # a shard's last line counts (a damaged shard sampled again gets a second)
        return {entry["shard"]: untimed(entry) for entry in map(json.loads, path.read_text().splitlines())}
    if path.suffix == ".jsonl":
        return [untimed(json.loads(line)) for line in path.read_text().splitlines()]
    return path.read_bytes()


# Files that hold where, when or how the run was started, not what it computed.
NOT_RESULTS = re.compile(r"^(config\.yaml|dpnb-run\.lock|notebooks/.*|.*/state\.json)$")


def results(root: Path) -> list[str]:
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(name for name in names if not NOT_RESULTS.match(name))


def assert_same_results(whole: Path, resumed: Path) -> None:
    """Every result file of the two runs is the same, bit for bit (JSON without its timings)."""
    compared = results(whole)
    assert compared == results(resumed)
    different = [name for name in compared if contents(whole / name) != contents(resumed / name)]
    assert not different, f"differ after the interruptions: {different}"
    assert {"model/model.safetensors", "privacy.json", "synthetic/samples.jsonl", "metrics.json", "audit.json",
            "audit/nodp/model/model.safetensors"} <= set(compared)


def assert_damaged_checkpoints_refused(checkpoint: Path, tmp_path: Path) -> None:
    """A truncated copy and a copy with one bit flipped are refused with the fix."""
    data = checkpoint.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # a tensor byte: the file is mostly weights and optimizer state
    for name, damaged in (("truncated.pt", data[: len(data) // 2]), ("flipped.pt", bytes(flipped))):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(DamagedFile, match=f"{name} is damaged .*cannot be resumed. Delete it to train again"):
            load_checkpoint(tmp_path / name)


def test_sigkill_in_every_stage_then_the_same_command_finishes_as_if_never_interrupted(tmp_path, toy_data_dir,
                                                                                       capfd, monkeypatch):
    config = write_config(tmp_path / "tiny.yaml", chain_config(toy_data_dir, tmp_path / "runs"))
    run = RunDir(tmp_path / "runs" / "tiny")

    # 1. prepare, held while it writes data/: a second run on the directory refuses, naming the first
    ready = tmp_path / "held"
    first = dpnb_run(config, "hold write manifest.json", ready)
    kernel = wait_for(ready, first)
    status, _, err = run_in_process(config, capfd)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"is in use by another dpnb run (pid {first.pid} on host " in err and f"run {config}" in err
    os.kill(first.pid, signal.SIGKILL)  # the whole run dies at once: the dpnb process and its kernel
    os.kill(kernel, signal.SIGKILL)
    first.wait()
    assert not run.is_complete("prepare") and not run.data.exists() and list(run.path.glob(".data.*.tmp"))

    # 2-5. the same command again, each time with the kernel killed mid-way through the next stage
    kills = {
        "finetune": "kill finetune step 3",  # after step 3 of 4; the last checkpoint is step 2's
        "generate": "kill write shard-00001.jsonl",  # the second shard half-written
        "evaluate": "kill write synthetic.json",  # the real-data classifier kept, the synthetic one mid-write
        "audit": "kill finetune step 3#2",  # the DP twin trained, the non-DP twin after step 3
    }
    for stage, fault in kills.items():
        monkeypatch.setenv(FAULT_ENV, fault)
        status, out, err = run_in_process(config, capfd)
        assert status == 2 and f"stage '{stage}' stopped: its notebook kernel died" in err.splitlines()[-1]
        assert run.is_complete(STAGES[STAGES.index(stage) - 1]) and not run.is_complete(stage)
        if stage == "finetune":  # the lock of the killed run was taken over, its half-written data/ removed
            assert "was locked by a dpnb run that ended without releasing it" in out
            assert f"pid {first.pid}" in out and "removed 1 temporary file(s)" in out
            assert load_checkpoint(run.checkpoint)["position"]["step"] == 2 and not run.privacy.exists()
            assert_damaged_checkpoints_refused(run.checkpoint, tmp_path)
        if stage == "generate":  # one shard done; a bit of it is then flipped on disk: it must be sampled again
            shard = run.synthetic / "shards" / "shard-00000.jsonl"
            assert [p.name for p in shard.parent.glob("shard-*")] == [shard.name]
            flip = re.compile(r'"ids": \[(\d)')
            shard.write_text(flip.sub(lambda m: f'"ids": [{(int(m[1]) + 1) % 10}', shard.read_text(), count=1))
        if stage == "evaluate":
            assert (run.path / "evaluate" / "real.json").exists() and not run.metrics.exists()
        if stage == "audit":
            assert load_checkpoint(run.twin("nodp").checkpoint)["position"]["step"] == 2
    monkeypatch.delenv(FAULT_ENV)
    status, out, _ = run_in_process(config, capfd)
    assert status == 0 and all(run.is_complete(stage) for stage in STAGES)
    assert "resuming from the checkpoint at step 2 of 4" in run.executed_notebook("finetune").read_text()
    assert "shard-00000.jsonl is damaged or unfinished" in run.executed_notebook("generate").read_text()
    assert "resuming from the checkpoint at step 2 of" in run.executed_notebook("audit").read_text()
    assert not [p for p in run.path.rglob(".*") if p.name.endswith((".tmp", ".old"))]

    whole = run_uninterrupted(write_config(tmp_path / "whole.yaml", chain_config(toy_data_dir, tmp_path / "whole")))
    assert json.loads((whole / "privacy.json").read_text())["steps"] == 4  # the planned steps, and epsilon:
    assert json.loads(run.privacy.read_text()) == json.loads((whole / "privacy.json").read_text())
    assert_same_results(whole, run.path)
