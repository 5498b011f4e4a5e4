"""The committed notebooks, rerun as a reader would in JupyterLab: kernel started in notebooks/,
default parameters, a completed run at the default run_dir. They must show it without recomputing.

`DPNB_HOME` stands in for the repository root here (relative run paths are read from it), so the
tiny run can live in a temporary folder while the notebooks are the committed ones.
"""

from __future__ import annotations

import json

import papermill
import pytest
from testkit import NOTEBOOKS
from papermill.exceptions import PapermillExecutionError

from dpnb.config import EvaluateConfig, FinetuneConfig, GenerateConfig, PrepareConfig
from dpnb.rundir import RunDir
from dpnb.stages import evaluate, finetune, generate, prepare

STAGE_NOTEBOOKS = {"prepare": "01_prepare.ipynb", "finetune": "02_finetune.ipynb", "generate": "03_generate.ipynb",
                   "evaluate": "04_evaluate.ipynb"}


@pytest.fixture(scope="module")
def home(tmp_path_factory, toy_data_dir):
    """A folder holding runs/demo: a tiny completed run of stages 01-04, with a Private Evolution set."""
    root = tmp_path_factory.mktemp("home")
    run = RunDir(root / "runs" / "demo")
    prepare.run_stage(run, PrepareConfig(source=str(toy_data_dir), model="tiny-llama", n_train=40, n_test=30,
                                         max_length=32))
    finetune.run_stage(run, FinetuneConfig(mode="lora", lora_r=2, target_epsilon=8, max_steps=2,
                                           logical_batch_size=8, physical_batch_size=8, device="cpu",
                                           samples_before_after=1))
    generate.run_stage(run, GenerateConfig(n_per_label=3, max_new_tokens=6, batch_size=3, shard_size=3,
                                           device="cpu", min_words=0, pe=True))
    evaluate.run_stage(run, EvaluateConfig(classifier="minilm-l6", epochs=1, batch_size=8, max_length=32,
                                           n_real_train=20, device="cpu"))
    return root


def run_as_reader(name: str, out_dir, monkeypatch, home) -> dict:
    """Execute the committed notebook with no parameters, its kernel started in notebooks/."""
    monkeypatch.setenv("DPNB_HOME", str(home))
    executed = out_dir / name
    papermill.execute_notebook(str(NOTEBOOKS / name), str(executed), kernel_name="python3",
                               cwd=str(NOTEBOOKS), progress_bar=False)
    return json.loads(executed.read_text())


def snapshot(run: RunDir) -> dict[str, tuple[int, bytes]]:
    """Every file of the run with its modification time and content."""
    return {str(p.relative_to(run.path)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run.path.rglob("*")) if p.is_file() and "notebooks" not in p.parts}


@pytest.mark.slow
def test_committed_notebooks_read_the_run_without_recomputing(home, tmp_path, monkeypatch):
    run = RunDir(home / "runs" / "demo")
    before = snapshot(run)
    record = json.loads(run.privacy.read_text())
    for stage, name in STAGE_NOTEBOOKS.items():
        notebook = run_as_reader(name, tmp_path, monkeypatch, home)
        outputs = [o for cell in notebook["cells"] for o in cell.get("outputs", [])]
        assert not [o for o in outputs if o["output_type"] == "error"], name
        printed = "".join("".join(o.get("text", "")) for o in outputs)
        assert "running over TCP" not in printed
        if stage == "finetune":  # the run's own numbers, read from its files
            assert f"sigma = {record['noise_multiplier']:.4f}" in printed
        if stage == "generate":  # PE's votes: the noise of pe/privacy.json, and its figure shown
            pe_record = json.loads((run.pe / "privacy.json").read_text())
            assert f"sigma = {pe_record['noise_multiplier']:.4f}" in printed
            assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # sample lengths, PE's votes
        if stage == "evaluate":  # the one table holds the PE set's row
            assert "Private Evolution" in "".join("".join(o.get("text", "")) for o in outputs)
    assert snapshot(run) == before  # nothing recomputed, nothing rewritten


def test_notebooks_whose_run_is_missing_stop_with_the_command_that_makes_it(tmp_path, monkeypatch):
    empty = tmp_path / "empty-home"
    empty.mkdir()
    for name, command in (("05_report.ipynb", "dpnb sweep configs/cpu-long.yaml"),
                          ("06_audit.ipynb", "make demo"),
                          ("02_finetune.ipynb", "make demo")):
        with pytest.raises(PapermillExecutionError) as failure:
            run_as_reader(name, tmp_path, monkeypatch, empty)
        assert failure.value.ename == "DpnbError" and command in failure.value.evalue, failure.value.evalue
        assert str(empty) in failure.value.evalue  # says where it looked


def test_a_stage_that_has_not_run_is_not_started_by_reading(home, tmp_path, monkeypatch):
    with pytest.raises(PapermillExecutionError) as failure:  # the tiny run has no audit
        run_as_reader("06_audit.ipynb", tmp_path, monkeypatch, home)
    assert "has not run" in failure.value.evalue and "demo-audit.yaml" in failure.value.evalue
    assert not RunDir(home / "runs" / "demo").is_complete("audit")
