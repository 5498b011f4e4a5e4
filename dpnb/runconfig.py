"""The run config: one experiment's YAML file, read into one typed config per stage.

A run is described by a YAML file with one section per stage (`dpnb.registry.STAGES`):

    name: demo                 # run directory name (under runs_dir)
    runs_dir: runs
    model: smollm2-135m        # the generator; prepare tokenises with it, finetune trains it
    seed: 0                    # default seed of every stage that has one
    stages: [prepare, finetune, generate, evaluate]
    prepare:  {n_train: 800, max_length: 96, ...}      # PrepareConfig fields
    finetune: {target_epsilon: 8, ...}                  # FinetuneConfig fields
    generate: {n_per_label: 150, ...}                   # GenerateConfig fields
    evaluate: {classifier: minilm-l6, ...}              # EvaluateConfig fields
    audit:    {n_canaries: 1000, ...}                   # AuditConfig fields

Unknown keys are errors that name the key and list the valid ones (see `dpnb.config.build`).
The walk of a parameter is short: YAML -> `load_run_config` (validated here, before any work) ->
`to_dict(run.stage(name))`, the plain dict papermill hands the stage notebook -> rebuilt there by
`dpnb.notebook.open_stage` with the same `build`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpnb.config import (
    AuditConfig,
    EvaluateConfig,
    FinetuneConfig,
    GenerateConfig,
    PrepareConfig,
    build,
)
from dpnb.errors import DpnbError, require
from dpnb.registry import STAGES


@dataclass
class RunConfig:
    """A whole experiment: where it lives, which stages run, and each stage's config.

    One field per stage of `dpnb.registry.STAGES`, named after it (tests/unit/test_registry.py checks).
    """

    name: str = "demo"
    runs_dir: str = "runs"
    model: str = "smollm2-135m"
    seed: int = 0
    stages: tuple[str, ...] = ("prepare", "finetune", "generate", "evaluate")
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    requires_gpu: bool = False  # fail early with a clear message when no GPU is present

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def stage(self, name: str) -> Any:
        """The config of stage `name`."""
        return getattr(self, name)


def run_config_from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    """Build a RunConfig; the top-level `model` and `seed` fill stage fields the sections leave out."""
    values = dict(values or {})
    top_known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - top_known)
    if unknown:
        raise DpnbError(
            f"unknown key(s) {', '.join(unknown)} in {where}; valid top-level keys are: "
            f"{', '.join(sorted(top_known))}"
        )
    top = {k: v for k, v in values.items() if k not in STAGES}
    run = build(RunConfig, top, where)
    for stage in run.stages:
        require(stage in STAGES, f"{where}.stages[] = {stage!r} is not one of {', '.join(map(repr, STAGES))}")
    require("/" not in run.name and run.name not in ("", ".", ".."), f"{where}.name must be a plain name")
    for stage, spec in STAGES.items():
        cls = spec.config_class
        if not isinstance(values.get(stage) or {}, dict):
            raise DpnbError(f"{where}.{stage} must be a mapping of {cls.__name__} fields")
        section = dict(values.get(stage) or {})
        stage_fields = {f.name for f in dataclasses.fields(cls)}
        if "seed" in stage_fields:
            section.setdefault("seed", run.seed)
        if stage == "prepare":
            section.setdefault("model", run.model)
        setattr(run, stage, build(cls, section, f"{where}.{stage}"))
    return run


def read_config_values(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The plain values of a YAML run config, with its `base:` file (relative to it) merged underneath.

    `base: demo.yaml` takes every setting of demo.yaml and lets this file change some: mappings
    (stage sections) merge key by key, anything else is replaced. Bases may chain, not loop.
    """
    path = Path(path)
    if not path.exists():
        raise DpnbError(f"config file {path} does not exist; see configs/ for examples")
    if path.resolve() in seen:
        raise DpnbError(f"{path} is its own base (through {' -> '.join(str(p) for p in seen)}); break the loop")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DpnbError(f"{path} is not valid YAML{where} ({str(exc).splitlines()[0]}); fix its syntax there") from None
    if not isinstance(values, dict):
        raise DpnbError(f"{path} must hold a mapping of settings at the top level")
    base = values.pop("base", None)
    if base is None:
        return values
    return _merged(read_config_values(path.parent / str(base), (*seen, path.resolve())), values)


def _merged(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(under)
    for key, value in over.items():
        merged[key] = _merged(under[key], value) if isinstance(value, dict) and isinstance(under.get(key), dict) \
            else value
    return merged


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run config from YAML. `overrides` are dotted keys, e.g. {"finetune.target_epsilon": 3}."""
    values = read_config_values(path)
    for dotted, value in (overrides or {}).items():
        require_setting(dotted)
        set_dotted(values, dotted, value)
    return run_config_from_dict(values, where=str(path))


def require_setting(dotted: str) -> None:
    """Refuse a `--set` key that names no setting (a typo must never be taken for a new key)."""
    top, _, rest = dotted.partition(".")
    top_keys = sorted(f.name for f in dataclasses.fields(RunConfig))
    require(top in top_keys, f"--set {dotted}: there is no setting {top!r}; the top-level settings are "
                             f"{', '.join(top_keys)} (a stage's as stage.key, e.g. finetune.target_epsilon)")
    if top not in STAGES:
        require(not rest, f"--set {dotted}: {top} is a single value, not a section; use --set {top}=VALUE")
        return
    keys = sorted(f.name for f in dataclasses.fields(STAGES[top].config_class))
    require(rest.split(".")[0] in keys, f"--set {dotted}: the {top} section has no setting {rest.split('.')[0]!r}; "
                                        f"its settings are {', '.join(keys)}")


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `values["a"]["b"] = value` for `dotted = "a.b"`, creating sections as needed."""
    *parents, last = dotted.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise DpnbError(f"cannot set {dotted}: {key} is not a section")
    node[last] = value


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain YAML/JSON-ready values (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def to_yaml(config: Any) -> str:
    """A config as the YAML text a run directory keeps (`config.yaml`, `sweep-config.yaml`)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
