"""Bad input, one table: each kind through the real `dpnb run` entry point (`dpnb.cli.main`, in this process).

Every row must end with exit status 2 and exactly one line on stderr, without a traceback, naming
the problem and the fix; and a completed run directory must be left exactly as it was, even when
the bad command is forced onto it (`--force`): the checks run before anything is written
(`dpnb.pipeline.run_stages`). The run directory is prepared and fine-tuned once for the module.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from testkit import tiny_config, toy_reviews, write_config, write_csv

from dpnb import cli, models
from dpnb.runconfig import load_run_config, to_yaml
from dpnb.rundir import RunDir
from dpnb.runlock import RunLock
from dpnb.stages import finetune, prepare


@pytest.fixture(scope="module")
def completed(tmp_path_factory, toy_data_dir):
    """A run (prepare and finetune complete, as `dpnb run` leaves them) and its config."""
    root = tmp_path_factory.mktemp("bad_input")
    config = tiny_config(toy_data_dir, root / "runs", stages=["prepare", "finetune"])
    config["finetune"].update(top_layers=1, accountant="rdp", samples_before_after=0, device="cpu")
    path = write_config(root / "tiny.yaml", config)
    run_config = load_run_config(path)
    run = RunDir(run_config.run_dir)
    with RunLock(run.path):
        prepare.run_stage(run, run_config.prepare)
        finetune.run_stage(run, run_config.finetune)
        (run.path / "config.yaml").write_text(to_yaml(run_config))
    return run, config


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def with_csv(tmp_path: Path, config: dict, rows: list[dict] | None = None, raw: bytes | None = None) -> dict:
    """The config reading its training split from a CSV written for the case (the test split stays good)."""
    source = tmp_path / "source"
    write_csv(source / "test.csv", toy_reviews(100, seed=2))
    if raw is not None:
        (source / "train.csv").write_bytes(raw)
    else:
        write_csv(source / "train.csv", rows)
    config["prepare"]["source"] = str(source)
    return config


def section(key: str, **values):
    """A case that changes settings of one section of the config."""
    return lambda tmp_path, config: config[key].update(values) or config


REVIEWS = toy_reviews(200, seed=1)
CASES = {
    # the data (read before any stage starts, under --force so that nothing else stops the run first)
    "a CSV without the named column": (
        lambda t, c: with_csv(t, c, [{"id": r["id"], "review": r["text"], "label": r["label"]} for r in REVIEWS]),
        ["--force"], "text"),
    "a file that is not UTF-8": (
        lambda t, c: with_csv(t, c, raw=b"text,label\n" + "café crème,1\nterrible,0\n".encode("latin-1") * 50),
        ["--force"], "UTF-8"),
    "labels outside label_names": (
        lambda t, c: with_csv(t, c, [{**r, "label": 2 if r["id"] == 7 else r["label"]} for r in REVIEWS]),
        ["--force"], "label"),
    "one class only": (
        lambda t, c: with_csv(t, c, [{**r, "label": 1} for r in REVIEWS]), ["--force"], "class"),
    "empty texts beyond the allowed share": (
        lambda t, c: with_csv(t, c, [{**r, "text": "" if r["id"] % 10 == 0 else r["text"]} for r in REVIEWS]),
        ["--force"], "empty"),
    "max_length beyond the model's positions": (section("prepare", max_length=10**6), ["--force"], "max_length"),
    "delta >= 1/N": (section("finetune", delta=0.01), ["--force"], "delta"),
    "a logical batch larger than N": (
        section("finetune", logical_batch_size=5000, physical_batch_size=25), ["--force"], "logical_batch_size"),
    # the config
    "epsilon <= 0": (section("finetune", target_epsilon=0), [], "target_epsilon"),
    "an unknown config key": (section("finetune", learning_rate=0.1), [], "learning_rate"),
    "a value of the wrong type": (section("finetune", epochs="many"), [], "epochs"),
    "NaN in a config": (section("finetune", lr=float("nan")), [], "finetune.lr"),
    "infinity in a config": (section("finetune", weight_decay=float("inf")), [], "finite"),
    "--set on a key that does not exist": (lambda t, c: c, ["--set", "finetune.learning_rate=0.1"], "--set"),
    "a stage that does not exist": (lambda t, c: c, ["--stages", "prepare,train"], "unknown stage"),
    "a config file that is not YAML": (None, [], "not valid YAML"),
    # the machine
    "a Hub model that cannot be reached offline": (lambda t, c: c | {"model": "gpt2"}, [], "Hugging Face"),
    "a Hub data set that cannot be reached offline": (section("prepare", source="stanfordnlp/imdb"), ["--force"],
                                                      "DPNB_DATA_DIR"),
    # the run directory
    "a run directory written by an incompatible version": ("incompatible", [], "run-directory format"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_changes(case, completed, tmp_path, capfd, monkeypatch):
    run, config = completed
    make, arguments, named = CASES[case]
    config = copy.deepcopy(config)
    checked = run.path
    monkeypatch.setattr(models, "_HUB_OFFLINE", True)  # as on this machine, wherever the suite runs
    monkeypatch.delenv("DPNB_DATA_DIR", raising=False)
    if make is None:
        path = tmp_path / "broken.yaml"
        path.write_text(yaml.safe_dump(config) + "finetune: {lr: [0.1\n")
    elif make == "incompatible":  # a copy of the run, its markers from a dpnb of another layout
        checked = tmp_path / "runs" / "tiny"
        shutil.copytree(run.path, checked)
        marker = checked / "stages" / "prepare.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": 99}))
        path = write_config(tmp_path / "tiny.yaml", config | {"runs_dir": str(tmp_path / "runs")})
    else:
        path = write_config(tmp_path / "tiny.yaml", make(tmp_path, config))
    before = snapshot(checked)
    capfd.readouterr()

    status = cli.main(["run", str(path), *arguments])

    _, err = capfd.readouterr()
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("dpnb: error: ") and "Traceback" not in err, err
    assert named in err, err
    assert snapshot(checked) == before  # nothing overwritten, nothing added (no notebook ran either)
