"""The run directory: where every stage reads its inputs and writes its outputs.

One experiment is one directory, `runs/<name>/` by default; `RunDir` names every path in it:

    config.yaml               the resolved configuration of the run (written by `dpnb run`)
    dpnb-run.lock             held by the `dpnb run` in progress, if any (`dpnb.runlock`)
    sweep-config.yaml         the same, for a run started by `dpnb sweep`; dpnb-run.log its output
    notebooks/NN_stage.ipynb  each stage's executed notebook (kept on failure too)
    stages/<stage>.json       completion marker: the stage's config, library versions, wall time
    data/                     01 prepare:  train/ and test/ (datasets `save_to_disk`), manifest.json
    data_stats.json           01 prepare
    model/                    02 finetune: the trained model or adapter, with its tokenizer
    train_log.jsonl           02 finetune: one line per logical (noise-adding) step
    before_after.json         02 finetune: a few samples of the base and the fine-tuned model
    privacy.json              02 finetune: the privacy guarantee of the run
    checkpoints/latest.pt     02 finetune: the latest resumable state (private: RNG states, optimizer)
    checkpoints/identity.json 02 finetune: hashes of the records the model was trained on (private)
    synthetic/, zero_shot/    03 generate: labelled synthetic data sets with a dataset card; shards/
                              holds the samples written so far, so an interrupted run resumes
    pe/                       03 generate: the Private Evolution set, its card, privacy.json and the
                              noisy vote histograms of every iteration (shareable)
    pe_private/               03 generate: PE's vote histograms before noise (private: computed from
                              the records)
    pe_pool/                  03 generate: the extra samples of PE's start model it votes on (as
                              shareable as that model's samples)
    dp_classifier/            04 evaluate: the direct DP classifier's weights and privacy.json (shareable)
    metrics.json              04 evaluate: aggregates only (evaluate/ holds finished sources while it runs)
    memorisation_flagged.json 04 evaluate: the memorisation screen's flagged samples, each with the training
                              row and offsets it copies (private: positions of training records)
    audit.json, audit/        06 audit: the summary, and the DP and non-DP twins it trained (each
                              twin directory is laid out like a run: model/, privacy.json, ...)
    figures/                  every stage's figures

Runs of one sweep also share `<runs_dir>/shared/` (`shared_store`): results that several runs would
compute alike, each under a key naming everything it depends on (the frozen-prefix cache of the
same records and weights; the zero-shot set of the same base model, prompts and settings). It holds
states computed from the private records: it is as private as the runs.

A stage is complete when its marker exists; the marker is written last, atomically, so a crash
never leaves a stage that looks complete. Each marker names the run directory's format
(`RUN_FORMAT`): a directory written by a dpnb with another layout is refused, not misread
(`require_compatible`). A completed stage is current when it finished with the
same config and the same upstream results (`is_current`); a current stage is skipped when rerun, a
completed stage that is not current is refused with a clear error, and redone only when forced
(`should_run`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from dpnb import registry
from dpnb.errors import DpnbError
from dpnb.io import read_json, to_json, write_json_atomic

SHARED_STORE_ENV = "DPNB_SHARED_DIR"  # set by `dpnb sweep` for its runs: <runs_dir>/shared
CHECKPOINT_FILE = "latest.pt"  # the one resumable training state in checkpoints/
TWINS_DIR = "audit"  # the audit's twins, each a run-like directory
# The layout of a run directory; a marker without one was written before it was recorded (format 1).
# Change it whenever a file contract in the module docstring changes incompatibly.
RUN_FORMAT = 1


# --------------------------------------------------------------------------- stage completion


def _plain(config: Any) -> Any:
    """A config (dataclass or mapping) as the plain JSON values a marker stores."""
    return json.loads(to_json(config))


def _same_number_same_json(value: Any) -> Any:
    """Whole floats as ints, so 8 and 8.0 (a config built in Python, then read back from JSON) hash alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _same_number_same_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same_number_same_json(v) for v in value]
    return value


def config_fingerprint(config: Any) -> str:
    """A short, stable hash of a stage config, to tell whether saved outputs match a request."""
    canonical = _same_number_same_json(json.loads(to_json(config)))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the results depend on."""
    versions = {}
    for name in ("dpnb", "torch", "transformers", "opacus", "peft", "datasets", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def shared_store() -> Path | None:
    """The directory that the runs of one sweep share results in (`$DPNB_SHARED_DIR`), else None.

    `dpnb sweep` sets it for its runs; a single `dpnb run` keeps everything in its own directory.
    """
    value = os.environ.get(SHARED_STORE_ENV)
    return Path(value) if value else None


class RunDir:
    """Paths of one run and the completion state of its stages."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # paths, one per file contract (see the module docstring)
    config_file = property(lambda self: self.path / "config.yaml")
    sweep_config = property(lambda self: self.path / "sweep-config.yaml")
    run_log = property(lambda self: self.path / "dpnb-run.log")
    data = property(lambda self: self.path / "data")
    manifest = property(lambda self: self.path / "data" / "manifest.json")
    data_stats = property(lambda self: self.path / "data_stats.json")
    model = property(lambda self: self.path / "model")
    train_log = property(lambda self: self.path / "train_log.jsonl")
    privacy = property(lambda self: self.path / "privacy.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    checkpoint = property(lambda self: self.path / "checkpoints" / CHECKPOINT_FILE)
    # what the finished training was made from (model, config, record hashes): private, like the records
    before_after = property(lambda self: self.path / "before_after.json")  # 02: a few samples, shareable
    training_identity = property(lambda self: self.path / "checkpoints" / "identity.json")
    synthetic = property(lambda self: self.path / "synthetic")
    zero_shot = property(lambda self: self.path / "zero_shot")
    pe = property(lambda self: self.path / "pe")  # Private Evolution's set (shareable, with its privacy.json)
    pe_private = property(lambda self: self.path / "pe_private")  # its histograms before noise: private
    pe_pool = property(lambda self: self.path / "pe_pool")  # PE's extra samples of the start model
    dp_classifier = property(lambda self: self.path / "dp_classifier")  # weights and privacy.json: shareable
    metrics = property(lambda self: self.path / "metrics.json")
    # which samples copy which training rows, at which offsets: private, like the records
    memorisation_flagged = property(lambda self: self.path / "memorisation_flagged.json")
    audit = property(lambda self: self.path / "audit.json")
    audit_dir = property(lambda self: self.path / TWINS_DIR)
    figures = property(lambda self: self.path / "figures")
    notebooks = property(lambda self: self.path / "notebooks")
    stages = property(lambda self: self.path / "stages")

    def figure(self, name: str) -> Path:
        self.figures.mkdir(parents=True, exist_ok=True)
        return self.figures / name

    def partial(self, stage: str) -> Path:
        """Where `stage` keeps the pieces it has finished while it runs (e.g. evaluate/), for resuming."""
        return self.path / registry.stage(stage).name

    def twin(self, name: str) -> RunDir:
        """The audit's twin `name` ("dp", "nodp"): a directory laid out like a run (model/, privacy.json...)."""
        return RunDir(self.audit_dir / name)

    def executed_notebook(self, stage: str) -> Path:
        """Where `dpnb run` keeps the executed notebook of `stage`."""
        return self.notebooks / registry.stage(stage).notebook

    def clear_training(self) -> None:
        """Remove earlier fine-tuning outputs before a fresh start, so none can be taken for the new run's."""
        self.privacy.unlink(missing_ok=True)
        self.train_log.unlink(missing_ok=True)
        self.checkpoint.unlink(missing_ok=True)
        self.training_identity.unlink(missing_ok=True)
        if self.model.exists():
            shutil.rmtree(self.model)

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def require_compatible(self) -> None:
        """Refuse a run directory whose stages were written by a dpnb with another layout (`RUN_FORMAT`)."""
        for marker in sorted(self.stages.glob("*.json")) if self.stages.is_dir() else []:
            found = read_json(marker).get("format", 1)
            if found != RUN_FORMAT:
                raise DpnbError(
                    f"{self.path} was written by a dpnb with run-directory format {found} ({marker.name}); this dpnb "
                    f"reads format {RUN_FORMAT}. Use a new run name (or another runs_dir), or run the dpnb version "
                    f"that wrote it (its markers name it under 'versions')")

    def is_complete(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def completed_config(self, stage: str) -> dict[str, Any] | None:
        return read_json(self.marker(stage))["config"] if self.is_complete(stage) else None

    def fingerprint(self, stage: str, config: Any) -> str:
        """Hash of the stage's config and of the completed upstream stages it reads (`registry`).

        An upstream stage is identified by its fingerprint and the time it finished: a forced rerun
        with the same config may still produce other outputs (another machine's arithmetic), so
        whatever read the old outputs is stale too.
        """
        upstream = {}
        for dep in registry.stage(stage).upstream:
            if self.is_complete(dep):
                marker = read_json(self.marker(dep))
                upstream[dep] = [marker.get("fingerprint"), marker.get("finished_at")]
        return config_fingerprint({"config": config, "inputs": upstream})

    def is_current(self, stage: str, config: Any) -> bool:
        """Whether `stage` completed with this config and the upstream results it sees now.

        False when it has not completed. A completed stage with a different config, or whose
        upstream stages have since been rerun, is an error: its outputs would be replaced without
        anyone asking (`should_run(..., force=True)` replaces them).
        """
        if not self.is_complete(stage):
            return False
        self.require_compatible()
        saved = read_json(self.marker(stage))
        if saved.get("fingerprint") == self.fingerprint(stage, config):
            return True
        what = "a different config" if saved.get("config") != _plain(config) else "inputs that have since changed"
        raise DpnbError(
            f"stage '{stage}' in {self.path} already finished with {what}; "
            f"rerun with force=True (dpnb run --force) to replace its results, or use a new run name"
        )

    def should_run(self, stage: str, config: Any, force: bool = False) -> bool:
        """Decide whether `stage` must run, refusing to overwrite different results silently.

        True when the stage is not current (`is_current`), or when `force` is set (its marker is then
        removed first, so a forced run that fails does not leave the old marker over new partial
        outputs). False when it completed with the same config and inputs.
        """
        if force:
            self.marker(stage).unlink(missing_ok=True)
            return True
        return not self.is_current(stage, config)

    def mark_complete(self, stage: str, config: Any, started_at: float, **extra: Any) -> Path:
        """Write the stage's completion marker: the last thing a stage does."""
        return write_json_atomic(
            self.marker(stage),
            {
                "stage": stage,
                "format": RUN_FORMAT,
                "fingerprint": self.fingerprint(stage, config),
                "config": _plain(config),
                "finished_at": datetime.datetime.now().astimezone().isoformat(timespec="microseconds"),
                "wall_time_s": round(time.time() - started_at, 2),
                "versions": library_versions(),
                **extra,
            },
        )

    def require_stage(self, stage: str) -> None:
        """Fail clearly when a stage this one depends on has not completed."""
        if not self.is_complete(stage):
            raise DpnbError(
                f"stage '{stage}' has not completed in {self.path}: run it first "
                f"(dpnb run CONFIG, or its notebook with run_dir={str(self.path)!r})"
            )
