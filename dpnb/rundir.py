"""The run directory: where every stage reads its inputs and writes its outputs.

One experiment is one directory, `runs/<name>/` by default:

    config.yaml               the resolved configuration of the run (written by `dpnb run`)
    notebooks/NN_stage.ipynb  each stage's executed notebook (kept on failure too)
    stages/<stage>.json       completion marker: the stage's config, library versions, wall time
    data/                     01 prepare:  train/ and test/ (datasets `save_to_disk`), manifest.json
    data_stats.json           01 prepare
    model/                    02 finetune: the trained model or adapter, with its tokenizer
    train_log.jsonl           02 finetune: one line per logical (noise-adding) step
    privacy.json              02 finetune: the privacy guarantee of the run
    checkpoints/              02 finetune: the latest resumable state
    synthetic/, zero_shot/    03 generate: labelled synthetic data sets with a dataset card; shards/
                              holds the samples written so far, so an interrupted run resumes
    metrics.json              04 evaluate (evaluate/ holds finished sources while it runs)
    audit.json, audit/        06 audit: the summary, and the DP and non-DP twins it trained
    figures/                  every stage's figures

A stage is complete when its marker exists; the marker is written last, atomically, so a crash
never leaves a stage that looks complete. A completed stage is skipped when rerun with the same
config, refused with a clear error when rerun with a different one, and redone only when forced.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from dpnb.errors import DpnbError
from dpnb.io import (  # noqa: F401 - RENOVATION SHIM: re-exported until every caller imports dpnb.io
    append_jsonl,
    atomic_directory,
    read_json,
    read_jsonl,
    to_json,
    write_json_atomic,
    write_text_atomic,
)

STAGES = ("prepare", "finetune", "generate", "evaluate", "audit")

# What each stage reads. A stage's fingerprint covers its own config and the fingerprints of the
# completed stages it reads, so rerunning an upstream stage makes downstream results stale.
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "prepare": (),
    "finetune": ("prepare",),
    "generate": ("prepare", "finetune"),
    "evaluate": ("prepare", "generate"),
    "audit": ("prepare", "finetune"),
}


# --------------------------------------------------------------------------- stage completion


def _plain(config: Any) -> Any:
    """A config (dataclass or mapping) as the plain JSON values a marker stores."""
    return json.loads(to_json(config))


def config_fingerprint(config: Any) -> str:
    """A short, stable hash of a stage config, to tell whether saved outputs match a request."""
    return hashlib.sha256(to_json(config).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the results depend on."""
    from importlib import metadata

    versions = {}
    for name in ("dpnb", "torch", "transformers", "opacus", "peft", "datasets", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class RunDir:
    """Paths of one run and the completion state of its stages."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # paths, one per file contract (see the module docstring)
    data = property(lambda self: self.path / "data")
    data_stats = property(lambda self: self.path / "data_stats.json")
    model = property(lambda self: self.path / "model")
    train_log = property(lambda self: self.path / "train_log.jsonl")
    privacy = property(lambda self: self.path / "privacy.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    synthetic = property(lambda self: self.path / "synthetic")
    zero_shot = property(lambda self: self.path / "zero_shot")
    metrics = property(lambda self: self.path / "metrics.json")
    audit = property(lambda self: self.path / "audit.json")
    figures = property(lambda self: self.path / "figures")
    notebooks = property(lambda self: self.path / "notebooks")
    stages = property(lambda self: self.path / "stages")

    def figure(self, name: str) -> Path:
        self.figures.mkdir(parents=True, exist_ok=True)
        return self.figures / name

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def is_complete(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def completed_config(self, stage: str) -> dict[str, Any] | None:
        return read_json(self.marker(stage))["config"] if self.is_complete(stage) else None

    def fingerprint(self, stage: str, config: Any) -> str:
        """Hash of the stage's config and of the completed stages it reads.

        An upstream stage is identified by its fingerprint and the time it finished: a forced rerun
        with the same config may still produce other outputs (another machine's arithmetic), so
        whatever read the old outputs is stale too.
        """
        upstream = {}
        for dep in DEPENDS_ON.get(stage, ()):
            if self.is_complete(dep):
                marker = read_json(self.marker(dep))
                upstream[dep] = [marker.get("fingerprint"), marker.get("finished_at")]
        return config_fingerprint({"config": config, "inputs": upstream})

    def should_run(self, stage: str, config: Any, force: bool = False) -> bool:
        """Decide whether `stage` must run, refusing to overwrite different results silently.

        True when the stage has not completed, or when `force` is set (its marker is then removed
        first, so a forced run that fails does not leave the old marker over new partial outputs).
        False when it completed with the same config. A completed stage with a different config is
        an error: its outputs would be replaced without anyone asking.
        """
        if force:
            self.marker(stage).unlink(missing_ok=True)
            return True
        if not self.is_complete(stage):
            return True
        saved = read_json(self.marker(stage))
        if saved.get("fingerprint") == self.fingerprint(stage, config):
            return False
        what = "a different config" if saved.get("config") != _plain(config) else "inputs that have since changed"
        raise DpnbError(
            f"stage '{stage}' in {self.path} already finished with {what}; "
            f"rerun with force=True (dpnb run --force) to replace its results, or use a new run name"
        )

    def mark_complete(self, stage: str, config: Any, started_at: float, **extra: Any) -> Path:
        """Write the stage's completion marker: the last thing a stage does."""
        return write_json_atomic(
            self.marker(stage),
            {
                "stage": stage,
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
