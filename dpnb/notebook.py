"""What every stage notebook does first: short errors, the stage's config, and its run directory.

A stage notebook's parameters cell holds `run_dir`, `config` (a dict of the stage's config
fields) and `force`; its next cell is

    run, cfg = open_stage("finetune", run_dir, config)

which makes `DpnbError`s show as one line (as on the command line) and builds the stage's config
object, refusing unknown keys.
"""

from __future__ import annotations

import os
from typing import Any

from IPython import get_ipython

from dpnb.config import build
from dpnb.errors import DpnbError
from dpnb.registry import stage
from dpnb.rundir import RunDir


def open_stage(name: str, run_dir: str | os.PathLike, config: dict[str, Any] | None) -> tuple[RunDir, Any]:
    """The run directory and the validated config of stage `name`, for a stage notebook."""
    setup_notebook()
    cfg = build(stage(name).config_class, config or {})
    return RunDir(run_dir), cfg


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
