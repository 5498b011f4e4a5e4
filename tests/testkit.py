"""Helpers shared by the test modules (not a test module itself; the fixtures are in conftest.py).

- toy data: POSITIVE/NEGATIVE words, `toy_reviews`, `write_csv`;
- token records for the DP-SGD tests: VOCAB, PAD, EOS, `small_records`, `as_dataset`;
- notebooks: REPO, NOTEBOOKS, `execute_notebook`, `nbval_check` (see below);
- stage settings: TINY_FINETUNE and TINY_AUDIT (a tiny audit), TINY_EVALUATE, LONG_REVIEW and
  `build_run` (a tiny prepared run with synthetic sets, for evaluate);
- whole runs: `tiny_config` (a run config on tiny settings) and `write_config`.

Each notebook test runs in two steps:
1. papermill executes `notebooks/NN_name.ipynb` with the test parameters into a temporary copy;
2. nbval re-executes that copy (its injected parameters included) and compares the outputs of the
   cells marked `# NBVAL_CHECK_OUTPUT`: the deterministic ones (counts, noise multiplier, epsilon,
   table shapes). Timings, paths and progress bars are never in checked cells.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

    from dpnb.rundir import RunDir
    from dpnb.training.loss import Records

# --------------------------------------------------------------------------- token records (DP-SGD tests)

VOCAB, PAD, EOS = 97, 2, 2  # PAD = SmolLM2's pad id, so its tokenizer can serve train()


def small_records(n: int, seed: int = 1) -> Records:
    """`n` random records of 7-16 tokens (prompt of 1-3 tokens, then the review and EOS)."""
    import torch

    from dpnb.training.loss import Records

    g = torch.Generator().manual_seed(seed)
    ids, prompts = [], []
    for _ in range(n):
        length = int(torch.randint(6, 16, (1,), generator=g))
        ids.append(torch.randint(3, VOCAB, (length,), generator=g).tolist() + [EOS])
        prompts.append(int(torch.randint(1, 4, (1,), generator=g)))
    return Records(ids, prompts)


def as_dataset(records: Records) -> datasets.Dataset:
    """The records as the prepared data set `dpnb.training.loop.train` reads."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": records.input_ids, "prompt_length": records.prompt_lengths})


# --------------------------------------------------------------------------- toy data

POSITIVE = ["a wonderful film", "great acting and a moving story", "I loved every minute", "brilliant and funny",
            "a beautiful, touching movie", "superb direction, excellent cast"]
NEGATIVE = ["a terrible film", "awful acting and a boring story", "I hated every minute", "dull and stupid",
            "a ugly, pointless movie", "poor direction, dreadful cast"]


def toy_reviews(n: int, seed: int = 0) -> list[dict]:
    """`n` short labelled reviews whose label is plain from their words (an easy, learnable task)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        text = f"{rng.choice(words)}. {rng.choice(words).capitalize()}<br /><br />{rng.choice(words)}."
        rows.append({"id": i, "label": label, "text": text})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- notebooks

REPO = Path(__file__).resolve().parent.parent  # tests/..
NOTEBOOKS = REPO / "notebooks"


def execute_notebook(name: str, out_dir: Path, **parameters: Any) -> Path:
    """Run notebooks/<name> with papermill into out_dir and return the executed copy."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / name
    papermill.execute_notebook(
        str(NOTEBOOKS / name), str(executed), parameters=parameters, kernel_name="python3",
        cwd=str(REPO), progress_bar=False,
    )
    return executed


def nbval_check(executed: Path) -> subprocess.CompletedProcess:
    """Re-execute an executed notebook with nbval (lax mode) and return the finished pytest run."""
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-current-env", str(executed)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"nbval found differences in {executed.name}:\n{result.stdout[-4000:]}"
    return result


# --------------------------------------------------------------------------- stage settings

# A 2-layer random Llama over SmolLM2's vocabulary, fully fine-tuned (its LM head must move to memorise
# random words). The RDP accountant is much faster than PRV at these sizes. Canary suffixes of 3 random
# words, each inserted canary 4 times; 10 steps, each with about half the records.
TINY_FINETUNE = dict(mode="full", lr=1e-2, epochs=5, logical_batch_size=32, physical_batch_size=32, max_grad_norm=1.0,
                     target_epsilon=0.5, accountant="rdp", checkpoint_every=1000, device="cpu", samples_before_after=0)
TINY_AUDIT = dict(n_canaries=20, canary_repeats=4, canary_prefix_tokens=3, canary_suffix_tokens=3, n_reference=40,
                  n_mia=8, synthetic_per_label=0, batch_size=32, device="cpu")

# A review unlike the toy ones, long enough to stand out when copied verbatim.
LONG_REVIEW = (
    "Seldom has a lighthouse keeper's diary been turned into such an odd musical: the harbour choir sings "
    "about barometers, the villain collects seashells, and the final storm is staged with umbrellas and a "
    "single trombone that nobody in the audience will ever forget."
)

TINY_EVALUATE = {"epochs": 1, "lr": 3e-4, "batch_size": 16, "max_length": 24, "memorisation_threshold": 30}


def tiny_config(toy_data_dir: Path, runs_dir: Path, **changes: Any) -> dict:
    """A whole run config on tiny settings (tiny-llama, the toy reviews): stages 01-04 in a minute or two."""
    config = {
        "name": "tiny",
        "runs_dir": str(runs_dir),
        "model": "tiny-llama",
        "seed": 0,
        "stages": ["prepare", "finetune", "generate", "evaluate"],
        "prepare": {"source": str(toy_data_dir), "max_length": 32, "n_test": 60},
        "finetune": {"mode": "full", "target_epsilon": 8, "epochs": 1, "logical_batch_size": 50,
                     "physical_batch_size": 25, "max_grad_norm": 1.0, "lr": 1e-3, "checkpoint_every": 2,
                     "samples_before_after": 1},
        "generate": {"n_per_label": 6, "max_new_tokens": 12, "batch_size": 6, "shard_size": 4, "min_words": 1},
        "evaluate": {"classifier": "minilm-l6", "epochs": 1, "batch_size": 16, "max_length": 32,
                     "n_real_train": 60},
    }
    for key, value in changes.items():
        config[key] = value
    return config


def write_config(path: Path, config: dict) -> str:
    """`config` as a YAML file at `path`; returns the path as `dpnb run` takes it."""
    import yaml

    path.write_text(yaml.safe_dump(config))
    return str(path)


def build_run(root: Path, zero_shot: bool = True, generate: bool = True, pe: bool = False) -> RunDir:
    """A prepared run (tiny-llama tokenizer, toy reviews plus LONG_REVIEW) with synthetic sets.

    The synthetic set copies LONG_REVIEW verbatim (the memorisation screen must find it) and the
    zero-shot set holds a single label (its classifier cannot learn; the metrics must say so). With `pe`,
    a Private Evolution set of 8 toy reviews, with the privacy.json of one vote at epsilon 4 (accounted by
    dpnb.generation.evolution: not the votes of these texts, which no one cast).
    """
    from datasets import Dataset

    from dpnb.config import GenerateConfig, PrepareConfig
    from dpnb.rundir import RunDir
    from dpnb.stages import prepare

    source = root / "source"
    write_csv(source / "train.csv", toy_reviews(31, seed=1) + [{"id": 999, "label": 1, "text": LONG_REVIEW}])
    write_csv(source / "test.csv", toy_reviews(20, seed=2))
    run = RunDir(root / "run")
    prepare.run_stage(run, PrepareConfig(source=str(source), model="tiny-llama", max_length=128))
    if not generate:
        return run
    names = ["negative", "positive"]
    synthetic = toy_reviews(15, seed=3) + [{"label": 1, "text": LONG_REVIEW}]
    sets = {run.synthetic: synthetic}
    if zero_shot:
        sets[run.zero_shot] = [{"label": 1, "text": text} for text in ("a film", "a film", "some movie", "ok")]
    if pe:
        sets[run.pe] = toy_reviews(8, seed=4)
    for path, rows in sets.items():
        Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows],
                           "label_name": [names[r["label"]] for r in rows]}).save_to_disk(str(path))
    if pe:
        from dpnb.generation import evolution
        from dpnb.io import write_json_atomic

        plan = evolution.plan_evolution(1, 4, 4.0, 1e-3, dataset_size=32, accountant="rdp")
        write_json_atomic(run.pe / "privacy.json", evolution.privacy_record(plan, [], 32, deterministic=True))
    run.mark_complete("generate", GenerateConfig(zero_shot=zero_shot, pe=pe), time.time())
    return run


# --------------------------------------------------------------------------- a sweep's files, for the report

REPORT_SWEEP = {  # run: (its epsilon, None without DP; accuracy of synthetic, pe, dp_classifier); numbers of the test
    "eps1": (1.0, (0.58, 0.60, 0.70)),
    "eps3": (3.0, (0.66, 0.61, 0.74)),
    "eps8": (8.0, (0.70, 0.63, 0.76)),
    "nodp": (None, (0.74, None, 0.75)),
}
REPORT_REAL, REPORT_ZERO_SHOT, REPORT_N_TEST = 0.80, 0.55, 400


def report_sweep(root: Path, model: str = "tiny-llama") -> list[RunDir]:
    """Runs under `root` holding the files a finished sweep writes, with the accuracies of REPORT_SWEEP.

    Each run has every evaluate source: real, the direct DP classifier (at the run's epsilon, 8 without
    DP), the DP fine-tuned set, a Private Evolution set (none in the non-DP run) and zero-shot. What
    the report computes from them (rows, standard errors, differences, figures) is the code's.
    """
    from dpnb.config import EvaluateConfig, FinetuneConfig, PrepareConfig
    from dpnb.io import append_jsonl, write_json_atomic
    from dpnb.rundir import RunDir

    runs = []
    for index, (name, (epsilon, (synthetic, pe, direct))) in enumerate(REPORT_SWEEP.items()):
        run = RunDir(root / name)
        finetune = FinetuneConfig(mode="lora", dp=epsilon is not None)
        for stage, cfg in (("prepare", PrepareConfig()), ("finetune", finetune),
                           ("evaluate", EvaluateConfig(classifier_kind="embedding"))):
            run.mark_complete(stage, cfg, time.time() - 10)
        write_json_atomic(run.manifest, {"model": model, "train_sha256": "the same data"})
        dp = epsilon is not None
        write_json_atomic(run.privacy, {"dp": dp, "epsilon": epsilon if dp else None, "delta": 1e-4 if dp else None,
                                        "noise_multiplier": 2.0 / epsilon if dp else None, "steps": 12})
        for step in range(6):
            append_jsonl(run.train_log, {"step": step, "epsilon": epsilon * step / 5 if dp else None,
                                         "loss": 4.0 - 0.1 * step * (1 + index)})
        metric = {"n_train": 100, "n_test": REPORT_N_TEST, "f1": 0.5, "mauve": 0.1 * (index + 1),
                  "label_fidelity": {"overall": 0.5 + 0.1 * index}}
        metrics = {"real": {**metric, "accuracy": REPORT_REAL, "mauve": 0.95},
                   "dp_classifier": {"n_train": 100, "n_test": REPORT_N_TEST, "f1": 0.5, "accuracy": direct,
                                     "epsilon": epsilon or 8.0, "delta": 1e-4,
                                     "privacy": {"dp": True, "epsilon": epsilon or 8.0, "delta": 1e-4,
                                                 "noise_multiplier": 1.0, "steps": 30}},
                   "synthetic": {**metric, "accuracy": synthetic, "epsilon": epsilon},
                   "zero_shot": {**metric, "accuracy": REPORT_ZERO_SHOT, "mauve": 0.02, "epsilon": 0.0}}
        if pe is not None:
            metrics["pe"] = {**metric, "accuracy": pe, "mauve": 0.3, "epsilon": epsilon}
            write_json_atomic(run.pe / "privacy.json", {"dp": True, "epsilon": epsilon, "delta": 1e-4,
                                                        "noise_multiplier": 5.0 / epsilon, "steps": 4})
        write_json_atomic(run.metrics, metrics)
        runs.append(run)
    return runs
