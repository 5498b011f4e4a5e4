"""What every stage notebook does first: short errors, the stage's config, and its run directory.

A stage notebook's parameters cell holds `run_dir`, `config` and `force`; its next cell is

    run, cfg = open_stage("finetune", run_dir, config)

which makes `DpnbError`s show as one line (as on the command line), finds the run directory and
builds the stage's config object, refusing unknown keys.

Where a relative `run_dir` points. JupyterLab starts a notebook's kernel in the notebook's own
folder (`notebooks/`), papermill in the folder `dpnb run` was started from; a path relative to
the kernel's working directory would therefore mean two things. It is read relative to the
project home instead: `$DPNB_HOME` when set (`dpnb run` sets it to its own working directory
for the stages it executes), else the dpnb checkout the package was installed from (the folder
holding `notebooks/` and `configs/`), else the working directory.

What `config` means. `None`, the committed notebooks' default, reads the run as it is: the
settings the stage completed with, so rerunning a committed notebook shows the run's results
without recomputing anything. A dict changes the keys it names and nothing else: the other settings
are the run's own (`run_settings`), those the stage completed with in this run (stages/<stage>.json),
or, when it has not completed, the stage's section of the run's config.yaml, and only for a run
with neither the dataclass defaults. So `config = {"target_epsilon": 3}` in 02 retrains the run's
model at epsilon 3 with its own mode, batch and epochs, not with the paper's (full fine-tuning,
batches of 1,028, 5 epochs: hours on a CPU). `dpnb run` passes every key, so for it the dict is the
whole config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml
from IPython import get_ipython

from dpnb.config import build
from dpnb.errors import DpnbError
from dpnb.registry import stage
from dpnb.rundir import RunDir

HOME_ENV = "DPNB_HOME"
CHECKOUT = Path(__file__).resolve().parent.parent  # the source tree of an editable install


def project_home() -> Path:
    """The folder relative run paths are read from: $DPNB_HOME, the dpnb checkout, or the working directory."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    if (CHECKOUT / "notebooks").is_dir() and (CHECKOUT / "configs").is_dir():
        return CHECKOUT
    return Path.cwd()


def resolve_run_path(path: str | os.PathLike) -> Path:
    """`path` as an absolute path: relative paths are taken from `project_home()`."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_home() / path


def open_stage(name: str, run_dir: str | os.PathLike, config: dict[str, Any] | None) -> tuple[RunDir, Any]:
    """The run directory and the validated config of stage `name`, for a stage notebook.

    `config=None` takes the config the stage completed with in this run (reading, not recomputing); a
    dict overrides the keys it names in the run's own settings (`run_settings`). A stage that reads
    other stages' outputs and finds no run directory says where it looked.
    """
    setup_notebook()
    spec = stage(name)
    run = RunDir(resolve_run_path(run_dir))
    if spec.upstream and not run.path.is_dir():
        raise DpnbError(
            f"no run directory at {run.path} (run_dir={str(run_dir)!r}, relative paths are read from "
            f"{project_home()}); make the run first: {MAKES_DEMO} on 2 CPU cores, or set run_dir to a completed run"
        )
    if config is None:
        config = run.completed_config(name)
        if config is None:
            raise DpnbError(
                f"stage '{name}' has not run in {run.path}, and config = None only reads a completed stage; "
                f"{MAKES.get(name, MAKES_DEMO)}, or set config to a dict of its settings ({{}} for the "
                f"defaults) to run it here")
    else:
        config = run_settings(run, name, config)
    return run, build(spec.config_class, config)


def run_settings(run: RunDir, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Stage `name`'s settings in this run with `changes` applied: only the keys `changes` names differ.

    The run's settings are those the stage completed with (stages/<name>.json), else the stage's
    section of the run's config.yaml (written by `dpnb run` before its first stage), else none (the
    dataclass defaults). A notebook that names only some keys says where the others came from.
    """
    completed = run.completed_config(name)
    if completed is not None:
        base, origin = completed, f"the settings it completed with ({run.marker(name).name})"
    elif run.config_file.exists():
        base = (yaml.safe_load(run.config_file.read_text()) or {}).get(name) or {}
        origin = f"the run's {run.config_file.name}"
    else:
        base, origin = {}, "the defaults (no completed stage or config.yaml in the run)"
    keys = {f.name for f in dataclasses.fields(stage(name).config_class)}
    if keys - set(changes):  # `dpnb run` names every key: nothing to say
        named = ", ".join(sorted(changes)) or "nothing"
        print(f"{name}: {origin}, with {named} from config", flush=True)
    return {**base, **changes}


# What makes the runs the committed notebooks read, and about how long it takes on 2 CPU cores.
MAKES_DEMO = "`make demo` (or `dpnb run configs/demo.yaml`) makes runs/demo in about 10 minutes"  # stages 01-04
MAKES = {
    "audit": "`dpnb run configs/demo-audit.yaml` adds the audit to runs/demo in about 15 minutes (after `make demo`)",
    "report": "`dpnb sweep configs/cpu-long.yaml` makes runs/cpu-long (four runs at epsilon 1, 3, 8 and without DP, "
              "about an hour)",
}


def open_report(runs_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The report notebook's folders, resolved like a stage's run_dir; an error when no run is there."""
    setup_notebook()
    runs, out = resolve_run_path(runs_dir), resolve_run_path(out_dir)
    if not any(runs.glob("**/stages/prepare.json")):
        raise DpnbError(f"no run under {runs} (runs_dir={str(runs_dir)!r}, relative paths are read from "
                        f"{project_home()}): {MAKES['report']}, or point runs_dir at your runs")
    return runs, out


def setup_notebook() -> None:
    """Make a notebook show `DpnbError`s as one line, like the command line does.

    Papermill still sees the cell fail (the error is re-raised for it), so a headless run stops
    at the failing stage with its executed notebook kept for reading.
    """
    shell = get_ipython()
    if shell is None:
        return

    def show_briefly(shell, etype, evalue, tb, tb_offset=None):  # noqa: ANN001 - IPython's signature
        # An error output with a one-line "traceback": readers see the message, and papermill
        # still reads the error's name and message to stop a headless run.
        short = [f"{etype.__name__}: {evalue}"]
        shell._showtraceback(etype, evalue, short)
        return short

    shell.set_custom_exc((DpnbError,), show_briefly)
