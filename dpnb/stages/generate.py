"""03 generate: label-prompted synthetic text from the fine-tuned model, and a zero-shot baseline.

The fine-tuned model samples `n_per_label` texts per label (`dpnb.sampling.sample_labelled`) into
`run.synthetic`; its dataset card states the guarantee of privacy.json (`dpnb.dataset_card`). By the
post-processing property of differential privacy the set carries the model's (epsilon, delta).

The zero-shot set samples the base model, never fine-tuned, with the same prompts, into
`run.zero_shot`. It does not depend on the private data at all (epsilon = 0 with respect to it) and
shows what DP fine-tuning adds over prompting alone.

Figures: `generated_lengths.png` (words per kept sample, by set and label), written before the stage
is marked complete.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from dpnb.config import GenerateConfig
from dpnb.dataset_card import Provenance
from dpnb.io import read_json, save_figure
from dpnb.models import load_base_model, load_tokenizer, load_trained, release_memory, resolve_device
from dpnb.precision import choose
from dpnb.prompts import PromptFormat
from dpnb.rundir import RunDir, shared_store
from dpnb.sampling import load_synthetic, sample_labelled
from dpnb.textstats import plot_length_histograms

STAGE = "generate"
SETS = ("synthetic", "zero_shot")
LENGTHS_FIGURE = "generated_lengths.png"


def _data_description(manifest: dict[str, Any]) -> str:
    source = manifest.get("source", "unknown source")
    n_train = manifest.get("n_train")
    if n_train:
        return f"the private training set ({source}, {n_train} records)"
    return f"the private data ({source})"


def read_summary(run: RunDir, cfg: GenerateConfig) -> dict[str, Any]:
    """The stage's summary read back from its files (what `run_stage` returns when it skips)."""
    return {
        "synthetic": read_json(run.synthetic / "generation.json"),
        "zero_shot": read_json(run.zero_shot / "generation.json") if cfg.zero_shot else None,
    }


def set_dirs(run: RunDir, summary: dict[str, Any]) -> dict[str, Path]:
    """The directories of the sets this run sampled, by set name."""
    return {name: getattr(run, name) for name in SETS if summary.get(name) is not None}


def _zero_shot_base(run: RunDir, manifest: dict[str, Any]) -> tuple[str, int]:
    """The base that fine-tuning started from, and the seed of its random weights (test models only).

    A QLoRA base is loaded unquantised: the baseline is the public model itself.
    """
    card_path = run.model / "dpnb_model.json"
    card = read_json(card_path) if card_path.exists() else {}
    return card.get("base", manifest["model"]), card.get("base_seed", 0)


def run_stage(run: RunDir, cfg: GenerateConfig, force: bool = False) -> dict[str, Any]:
    """Sample the synthetic set from the fine-tuned model (and the zero-shot set from its base model).

    Needs prepare and finetune complete. Skips when already done with this config, refuses a
    different config unless `force`, resumes an interrupted run from its shards, writes the figure,
    and writes the completion marker last. Shards whose plan still matches (same model weights,
    prompts and settings) are reused even when forced: sampling them again would give the same
    samples. Returns {"synthetic": generation.json, "zero_shot": generation.json or None}.
    """
    run.require_stage("prepare")
    run.require_stage("finetune")
    # should_run also refuses samples drawn before prepare or finetune was rerun (registry upstream)
    if not run.should_run(STAGE, cfg, force):
        return read_summary(run, cfg)
    started = time.time()

    manifest = read_json(run.manifest)
    privacy = read_json(run.privacy)
    prompt_format = PromptFormat.from_dict(manifest["prompt"])
    label_names = list(manifest["label_names"])
    data = _data_description(manifest)
    device = resolve_device(cfg.device)
    precision = choose(cfg.dtype, device)  # "auto": bf16 where measured at least 2x float32 (dpnb.precision)
    print(precision.reason)
    dtype = precision.dtype_name

    model, tokenizer = load_trained(run.model, device=device, dtype=dtype)
    provenance = Provenance("dp" if privacy.get("dp") else "non_dp", manifest["model"], data, privacy)
    summary: dict[str, Any] = {
        "synthetic": sample_labelled(model, tokenizer, prompt_format, label_names, cfg, run.synthetic,
                                     provenance=provenance, overwrite=True, precision=precision.record())
    }
    del model
    release_memory()

    if cfg.zero_shot:
        base_name, base_seed = _zero_shot_base(run, manifest)
        base = load_base_model(base_name, mode="full", dtype=dtype, device=device, seed=base_seed)
        summary["zero_shot"] = sample_labelled(
            base, load_tokenizer(base_name), prompt_format, label_names, cfg, run.zero_shot,
            provenance=Provenance("zero_shot", base_name, data), overwrite=True, precision=precision.record(),
            shared_dir=shared_store(),  # a sweep's runs share one zero-shot set when they sample it alike
        )
        del base
        release_memory()
    else:
        summary["zero_shot"] = None
        if run.zero_shot.exists():
            print(f"removing {run.zero_shot}: an earlier zero-shot set no longer matches this config")
            shutil.rmtree(run.zero_shot)
    save_figure(lengths_figure(set_dirs(run, summary)), run.figure(LENGTHS_FIGURE))
    run.mark_complete(STAGE, cfg, started)
    return summary


# --------------------------------------------------------------------------- views for the notebook


def counts_table(summaries: dict[str, dict[str, Any] | None]) -> pd.DataFrame:
    """One row per (set, label): samples requested, generated, kept, and dropped by reason."""
    rows = []
    for set_name, summary in summaries.items():
        if summary is None:
            continue
        for label in summary["labels"]:
            rows.append({"set": set_name, "label": label, "requested": summary["requested"][label],
                         "generated": summary["generated"][label], "kept": summary["kept"][label],
                         **{f"dropped {reason}": n for reason, n in summary["dropped_by_label"][label].items()}})
    return pd.DataFrame(rows)


def sampling_report(summaries: dict[str, dict[str, Any] | None]) -> str:
    """One line per set: kept samples, samples cut at max_new_tokens, and the sampling speed."""
    lines = []
    for name, s in summaries.items():
        if s is None:
            continue
        lines.append(f"{name}: kept {s['kept_total']} of {sum(s['generated'].values())}, "
                     f"{s['hit_max_new_tokens']} kept samples hit max_new_tokens; "
                     f"{s['new_tokens']} new tokens in {s['sampling_wall_s']:.1f} s of sampling = "
                     f"{s['tokens_per_second']} tokens/s on {s['device']} ({s['dtype']})")
    return "\n".join(lines)


def examples(set_dir: str | os.PathLike, per_label: int = 3, max_chars: int = 300) -> dict[str, list[str]]:
    """The first `per_label` kept texts of each label (cut to `max_chars` for display)."""
    shown: dict[str, list[str]] = {}
    for row in load_synthetic(set_dir):
        texts = shown.setdefault(row["label_name"], [])
        if len(texts) < per_label:
            text = row["text"]
            texts.append(text if len(text) <= max_chars else text[:max_chars].rstrip() + " ...")
    return shown


def lengths_figure(set_dirs: dict[str, str | os.PathLike]) -> Figure:
    """Words per kept sample: one panel per set, one histogram per label."""
    panels: dict[str, dict[str, list[int]]] = {}
    for set_name, set_dir in set_dirs.items():
        dataset = load_synthetic(set_dir)
        per_label = panels.setdefault(set_name, {})
        for text, label in zip(dataset["text"], dataset["label_name"], strict=True):
            per_label.setdefault(label, []).append(len(text.split()))
    return plot_length_histograms(panels, unit="words per kept sample", counted="samples", bins=20,
                                  panel_size=(5.0, 3.2))
