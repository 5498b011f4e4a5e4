"""The one list of pipeline stages: each stage's name, config class, notebook and upstream stages.

The command line, the run directory and every stage read this table; nothing else names the
stages. A stage's upstream stages are the ones whose outputs it reads: its fingerprint covers
theirs, so rerunning an upstream stage makes it stale (see `RunDir.is_current`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dpnb.config import AuditConfig, EvaluateConfig, FinetuneConfig, GenerateConfig, PrepareConfig
from dpnb.errors import DpnbError


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline over a run directory."""

    name: str
    config_class: type
    notebook: str  # file name in notebooks/
    upstream: tuple[str, ...]  # stages whose outputs this one reads (its code: dpnb/stages/<name>.py)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("prepare", PrepareConfig, "01_prepare.ipynb", ()),
        Stage("finetune", FinetuneConfig, "02_finetune.ipynb", ("prepare",)),
        Stage("generate", GenerateConfig, "03_generate.ipynb", ("prepare", "finetune")),
        Stage("evaluate", EvaluateConfig, "04_evaluate.ipynb", ("prepare", "generate")),
        Stage("audit", AuditConfig, "06_audit.ipynb", ("prepare", "finetune")),
    )
}
REPORT_NOTEBOOK = "05_report.ipynb"  # reads many runs; not a stage of one
TEACHING_NOTEBOOK = "00_dp_sgd_explained.ipynb"  # standalone


def stage(name: str) -> Stage:
    """The stage called `name`, or an error that lists the stages."""
    if name not in STAGES:
        raise DpnbError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return STAGES[name]
