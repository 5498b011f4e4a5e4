"""03 generate: label-prompted synthetic text from the fine-tuned model, and a zero-shot baseline.

The fine-tuned model samples `n_per_label` texts per label (`dpnb.generation.sampling.sample_labelled`) into
`run.synthetic`; its dataset card states the guarantee of privacy.json (`dpnb.generation.dataset_card`). By the
post-processing property of differential privacy the set carries the model's (epsilon, delta).

The zero-shot set samples the base model, never fine-tuned, with the same prompts, into
`run.zero_shot`. It does not depend on the private data at all (epsilon = 0 with respect to it) and
shows what DP fine-tuning adds over prompting alone.

With `pe: true`, a third set: Private Evolution (`dpnb.generation.evolution`) in `run.pe`, selected from the
start model's samples by noisy votes of the private records; its noisy vote histograms are in `pe/votes.json`
(shareable), those before noise in `pe_private/` (private).

Figures: `generated_lengths.png` (words per kept sample, by set and label) and, for a DP PE set, `pe_votes.png`
(its noisy vote histograms), written before the stage is marked complete.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from dpnb.config import GenerateConfig
from dpnb.data.prepared import load_prepared
from dpnb.data.prompts import PromptFormat
from dpnb.data.textstats import plot_length_histograms
from dpnb.evaluation.dp_classifier import DPClassifier, DPClassifierSettings, train_dp_classifier
from dpnb.evaluation.embeddings import Embedder
from dpnb.generation.dataset_card import Provenance
from dpnb.generation.engines import open_engine
from dpnb.generation.evolution import EvolutionPlan, Population, evolve_once, opening, plan_evolution, select
from dpnb.generation.evolution import privacy_record as evolution_privacy
from dpnb.generation.next_token import SamplingSettings
from dpnb.generation.sampling import (
    DROP_REASONS,
    degeneracy_reason,
    load_synthetic,
    sample_labelled,
    shard_seed,
    stop_token_ids,
    write_set,
)
from dpnb.io import read_json, save_figure, write_json_atomic
from dpnb.models import load_base_model, load_tokenizer, load_trained, release_memory, resolve_device
from dpnb.precision import Precision, choose
from dpnb.privacy.accounting import default_delta
from dpnb.privacy.composition import Mechanism
from dpnb.privacy.guarantee import round_up
from dpnb.rundir import RunDir, shared_store

STAGE = "generate"
SETS = ("synthetic", "zero_shot", "pe")
LENGTHS_FIGURE = "generated_lengths.png"
PE_VOTES = "votes.json"  # in pe/: the noisy vote histograms (shareable); those before noise are in pe_private/
PE_VOTES_FIGURE = "pe_votes.png"


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
        "pe": read_json(run.pe / "generation.json") if cfg.pe else None,
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
    summary["pe"] = sample_pe_set(run, cfg, manifest, privacy, precision) if cfg.pe else None
    if not cfg.pe and run.pe.exists():
        print(f"removing {run.pe}: an earlier Private Evolution set no longer matches this config")
        shutil.rmtree(run.pe)
    save_figure(lengths_figure(set_dirs(run, summary)), run.figure(LENGTHS_FIGURE))
    votes = pe_votes(run) if summary["pe"] is not None else None
    if votes is not None:
        save_figure(pe_votes_figure(votes), run.figure(PE_VOTES_FIGURE))
    elif run.figure(PE_VOTES_FIGURE).exists():
        print(f"removing {run.figure(PE_VOTES_FIGURE)}: this run has no noisy PE votes to draw")
        run.figure(PE_VOTES_FIGURE).unlink()
    run.mark_complete(STAGE, cfg, started)
    return summary


# --------------------------------------------------------------------------- Private Evolution (generation.evolution)


def pe_start_model(run: RunDir, cfg: GenerateConfig, manifest: dict[str, Any], dtype: str,
                   device: str) -> tuple[Any, Any, Path, str]:
    """The model PE samples its pool and variations from, its tokenizer, the set it starts from, and its name."""
    if cfg.pe_start == "finetuned":
        model, tokenizer = load_trained(run.model, device=device, dtype=dtype)
        return model, tokenizer, run.synthetic, f"{manifest['model']} (DP fine-tuned, {run.model})"
    base_name, base_seed = _zero_shot_base(run, manifest)
    model = load_base_model(base_name, mode="full", dtype=dtype, device=device, seed=base_seed)
    return model, load_tokenizer(base_name), run.zero_shot, base_name


def pe_pool(run: RunDir, cfg: GenerateConfig, model: Any, tokenizer: Any, prompt_format: PromptFormat,
            label_names: list[str], start_set: Path, precision: Precision) -> tuple[Population, dict[str, Any]]:
    """The pool PE votes on: the start set and (pe_pool_factor - 1) x n_per_label more samples per label of
    the same model (sampled into pe_pool/, resumable like any set; another seed than the start set's)."""
    start = load_synthetic(start_set)
    texts, labels = list(start["text"]), [int(v) for v in start["label"]]
    extra_summary = None
    if cfg.pe_pool_factor > 1:
        more = dataclasses.replace(cfg, n_per_label=(cfg.pe_pool_factor - 1) * cfg.n_per_label, seed=cfg.seed + 7919,
                                   pe=False)
        extra_summary = sample_labelled(model, tokenizer, prompt_format, label_names, more, run.pe_pool,
                                        provenance=Provenance("unspecified", "PE pool"), overwrite=True,
                                        precision=precision.record(),
                                        # a sweep's runs that start PE from the base model share one pool
                                        shared_dir=shared_store() if cfg.pe_start == "base" else None)
        extra = load_synthetic(run.pe_pool)
        texts, labels = texts + list(extra["text"]), labels + [int(v) for v in extra["label"]]
    return Population(texts, labels), {"start_set": start_set.name, "start": read_json(start_set / "generation.json"),
                                       "extra": extra_summary}


def pe_variations(engine: Any, tokenizer: Any, prompt_format: PromptFormat, label_names: list[str],
                  cfg: GenerateConfig, iteration: int) -> Callable[[list[str], list[int]], list[str | None]]:
    """PE's variation step: the model continues each text's opening after its label's prompt (None: degenerate)."""
    prompts = {i: prompt_format.prompt_ids(name, tokenizer) for i, name in enumerate(label_names)}

    def vary(texts: list[str], labels: list[int]) -> list[str | None]:
        openings = [tokenizer(opening(t, cfg.pe_opening_fraction), add_special_tokens=False)["input_ids"]
                    for t in texts]
        samples = engine.sample([prompts[y] + o for y, o in zip(labels, openings, strict=True)],
                                seed=shard_seed(cfg.seed + 104729, iteration, 0))
        out: list[str | None] = []
        for o, (ids, _) in zip(openings, samples, strict=True):
            text = tokenizer.decode(o + list(ids), skip_special_tokens=True).strip()
            degenerate = degeneracy_reason(text, o + list(ids), cfg.min_words, cfg.max_repeat_fraction)
            out.append(None if degenerate else text)
        return out

    return vary


def pe_delta(privacy: dict[str, Any], n_private: int) -> float:
    """The delta of every mechanism behind the PE set: the fine-tuning's, else the default for n_private."""
    return privacy["delta"] if privacy.get("dp") else default_delta(n_private)


def pe_budget(cfg: GenerateConfig, privacy: dict[str, Any],
              classifier: DPClassifier | None) -> tuple[list[Mechanism], bool]:
    """What the PE set spent before its votes (the fine-tuning it starts from, the labelling classifier), and
    whether it can carry a guarantee at all (not from a model fine-tuned without DP, nor with exact votes)."""
    spent: list[Mechanism] = []
    private = cfg.pe_epsilon is not None
    if cfg.pe_start == "finetuned":
        private = private and bool(privacy.get("dp"))
        if privacy.get("dp"):
            spent += Mechanism.of_record("DP-SGD fine-tuning", privacy)
    if classifier is not None:
        spent += Mechanism.of_record("DP classifier that labels the pool", classifier.privacy)
    return spent, private


def relabel_pool(cfg: GenerateConfig, population: Population, private: np.ndarray, private_labels: list[int],
                 num_labels: int, embedder: Embedder, delta: float, deterministic: bool,
                 ) -> tuple[Population, DPClassifier | None]:
    """With pe_relabel_epsilon: the pool's labels given by a DP classifier of the private records (that share of
    the budget), instead of the labels it was prompted with; else the pool as it is."""
    if cfg.pe_relabel_epsilon is None:
        return population, None
    classifier = train_dp_classifier(private, private_labels, num_labels, DPClassifierSettings(
        target_epsilon=cfg.pe_relabel_epsilon, delta=delta, seed=cfg.seed, deterministic=deterministic))
    labels = classifier.predict_features(embedder.features("pool", population.texts)).tolist()
    print(f"pe: a DP classifier (epsilon {cfg.pe_relabel_epsilon:g}) relabelled "
          f"{sum(a != b for a, b in zip(labels, population.labels, strict=True))} of {len(labels)} pool samples")
    return Population(population.texts, labels), classifier


def run_evolution(cfg: GenerateConfig, population: Population, private: np.ndarray, private_labels: list[int],
                  plan: EvolutionPlan, embedder: Embedder, engine: Any, vary_with: Callable[[int], Any],
                  generator: torch.Generator,
                  ) -> tuple[Population, list[dict[str, Any]], list[list[float]], list[dict[str, Any]]]:
    """The iterations: vote, keep and vary, then the last vote keeps n_per_label of each label. Returns the set,
    the iterations' logs, the histograms before noise (private) and the noisy ones with their texts' labels."""
    logs, clean_histograms, noisy_histograms = [], [], []
    for iteration in range(1, plan.iterations + 1):
        final = iteration == plan.iterations
        sizes = {label: population.labels.count(label) for label in sorted(set(population.labels))}
        keep = ({label: cfg.n_per_label for label in sizes} if final
                else {label: max(1, round(size * cfg.pe_keep_fraction)) for label, size in sizes.items()})
        labels = population.labels
        population, clean, noisy, log = evolve_once(
            population, private, private_labels, plan, keep,
            lambda texts, key=f"population-{iteration}": embedder.features(key, texts),
            None if final else vary_with(iteration), generator, iteration)
        print(f"pe: iteration {iteration} of {plan.iterations}: kept {sum(keep.values())}"
              + ("" if final else f", {log['varied']} variations"), flush=True)
        logs.append(log)
        clean_histograms.append(clean.round(6).tolist())
        kept = np.isin(np.arange(len(labels)), select(noisy, labels, keep))  # what evolve_once kept (post-processing)
        noisy_histograms.append({"iteration": iteration, "labels": labels, "noisy_votes": noisy.round(4).tolist(),
                                 "kept": kept.tolist()})
    return population, logs, clean_histograms, noisy_histograms


def sample_pe_set(run: RunDir, cfg: GenerateConfig, manifest: dict[str, Any], privacy: dict[str, Any],
                  precision: Precision) -> dict[str, Any]:
    """The Private Evolution set (`dpnb.generation.evolution`) in pe/, with its card and privacy.json; its summary."""
    started = time.time()
    device = resolve_device(cfg.device)
    prompt_format = PromptFormat.from_dict(manifest["prompt"])
    label_names = list(manifest["label_names"])
    model, tokenizer, start_set, model_name = pe_start_model(run, cfg, manifest, precision.dtype_name, device)
    population, pool_summary = pe_pool(run, cfg, model, tokenizer, prompt_format, label_names, start_set, precision)
    train, _, _ = load_prepared(run)
    private_labels = [int(v) for v in train["label"]]
    embedder = Embedder(cfg.pe_encoder, max_length=128, batch_size=128, device=device, dtype=precision.dtype)
    private = embedder.features("private", list(train["text"]))
    deterministic = bool(privacy.get("deterministic"))
    delta = pe_delta(privacy, len(private_labels))
    population, classifier = relabel_pool(cfg, population, private, private_labels, len(label_names), embedder,
                                          delta, deterministic)
    spent, is_private = pe_budget(cfg, privacy, classifier)
    plan = plan_evolution(cfg.pe_iterations, cfg.pe_nearest, cfg.pe_epsilon if is_private else None, delta,
                          len(private_labels), spent=spent)
    generator = torch.Generator().manual_seed(cfg.seed if deterministic else secrets.randbits(63))
    settings = SamplingSettings.from_config(cfg, stop_token_ids(tokenizer, model, chat=prompt_format.style == "chat"))
    with open_engine(cfg.engine, model, settings, tokenizer=tokenizer, scratch_dir=run.path) as engine:
        population, logs, clean, noisy = run_evolution(
            cfg, population, private, private_labels, plan, embedder, engine,
            lambda t: pe_variations(engine, tokenizer, prompt_format, label_names, cfg, t), generator)
    del model
    release_memory()
    write_json_atomic(run.pe_private / "histograms.json", {
        "private": "PE's vote histograms BEFORE noise: computed from the private records, never to be shared",
        "histograms": clean})
    record = evolution_privacy(plan, spent, len(private_labels), deterministic)
    summary = pe_summary(cfg, population, label_names, pool_summary, logs, record, started)
    rows = {"text": population.texts, "label": population.labels,
            "label_name": [label_names[y] for y in population.labels]}
    write_set(run.pe, rows, summary, Provenance("pe", model_name, _data_description(manifest), record))
    write_json_atomic(run.pe / "privacy.json", record)
    if plan.noise_multiplier is not None:  # exact votes (no DP) are a statistic of the records: never shared
        write_json_atomic(run.pe / PE_VOTES, pe_votes_record(plan, label_names, noisy, logs, record))
    return summary


def pe_votes_record(plan: EvolutionPlan, label_names: list[str], noisy: list[dict[str, Any]],
                    logs: list[dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    """pe/votes.json: every iteration's noisy vote histogram, one count per text of the population it voted on,
    with the texts' labels, which were kept, and the lowest count kept per label (all from the noisy histograms)."""
    return {"shareable": "PE's vote histograms AFTER Gaussian noise: the output of the mechanism privacy.json "
                         "accounts for (the histograms before noise stay in pe_private/)",
            "label_names": label_names, "noise_multiplier": plan.noise_multiplier, "nearest": plan.nearest,
            "sensitivity": 1.0, "release_note": record.get("release_note"),
            "iterations": [{**votes, "lowest_kept_votes": {label_names[int(label)]: entry["lowest_kept_votes"]
                                                           for label, entry in log["per_label"].items()}}
                           for votes, log in zip(noisy, logs, strict=True)]}


def pe_summary(cfg: GenerateConfig, population: Population, label_names: list[str], pool: dict[str, Any],
               logs: list[dict[str, Any]], record: dict[str, Any], started: float) -> dict[str, Any]:
    """generation.json of the PE set: the start set's sampling facts, the final counts, the pool, the iterations."""
    start = pool["start"]
    kept = {name: population.labels.count(i) for i, name in enumerate(label_names)}
    pooled = {name: start["kept"][name] + ((pool["extra"] or {}).get("kept", {}).get(name, 0))
              for name in label_names}
    return {**{k: start[k] for k in ("model", "labels", "sampling", "postprocessing", "prompts", "stop_tokens",
                                     "device", "dtype", "precision", "model_fingerprint")},
            "set": "pe", "guarantee": {k: record.get(k) for k in ("dp", "epsilon", "delta", "accountant")},
            "requested": dict.fromkeys(label_names, cfg.n_per_label), "generated": pooled, "kept": kept,
            "dropped": dict.fromkeys(DROP_REASONS, 0), "dropped_by_label": {n: {} for n in label_names},
            "hit_max_new_tokens": 0, "kept_total": len(population.texts),
            "evolution": {"start": cfg.pe_start, "pool_per_label": pooled, "iterations": logs,
                          "relabelled_by_dp_classifier": cfg.pe_relabel_epsilon is not None},
            "wall_time_s": round(time.time() - started, 2)}


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
        if "evolution" in s:  # Private Evolution: selected from a pool, not sampled as a set
            evolution = s["evolution"]
            lines.append(f"{name}: kept {s['kept_total']} of a pool of {sum(evolution['pool_per_label'].values())} "
                         f"({evolution['start']} model), {len(evolution['iterations'])} vote(s); epsilon "
                         f"{s['guarantee']['epsilon']}")
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


def pe_votes(run: RunDir) -> dict[str, Any] | None:
    """pe/votes.json (the noisy vote histograms of a DP PE set), or None when the run has none."""
    path = run.pe / PE_VOTES
    return read_json(path) if path.exists() else None


def pe_votes_figure(votes: dict[str, Any]) -> Figure:
    """PE's noisy vote counts: one row per iteration, one panel per label, kept samples apart from the others.

    Drawn from pe/votes.json only: the histograms AFTER noise, the mechanism's shareable output.
    """
    names, iterations = votes["label_names"], votes["iterations"]
    figure = Figure(figsize=(4.6 * len(names), 2.8 * len(iterations)), layout="constrained")
    axes = np.atleast_2d(figure.subplots(len(iterations), len(names), squeeze=False))
    for row, step in zip(axes, iterations, strict=True):
        counts, labels = np.asarray(step["noisy_votes"]), np.asarray(step["labels"])  # kept: booleans
        for label, (ax, name) in enumerate(zip(row, names, strict=True)):
            mine, kept, lowest = counts[labels == label], np.asarray(step["kept"])[labels == label], \
                step["lowest_kept_votes"].get(name)
            edges = np.histogram_bin_edges(mine, bins=min(30, max(5, len(mine) // 4))) if len(mine) else 5
            ax.hist([mine[~kept], mine[kept]], bins=edges, stacked=True, color=["0.7", "tab:blue"],
                    label=[f"not kept ({int((~kept).sum())})", f"kept ({int(kept.sum())})"])
            if lowest is not None:
                ax.axvline(lowest, color="black", linestyle="--", linewidth=1)
            ax.set_title(f"iteration {step['iteration']}, {name}: {len(mine)} samples", fontsize=10)
            ax.set_xlabel(f"noisy votes (noise sd {votes['noise_multiplier']:.3g})")
            ax.legend(fontsize=8)
        row[0].set_ylabel("samples")
    return figure


def pe_report(summary: dict[str, Any] | None, record: dict[str, Any] | None) -> str:
    """The PE set in words: its pool, each iteration's noisy vote mass per label, and its privacy record."""
    if summary is None or record is None:
        return "this run made no Private Evolution set (generate.pe is false)"
    evolution = summary["evolution"]
    lines = [f"pool: {evolution['pool_per_label']} samples per label from the {evolution['start']} model; "
             f"kept {summary['kept']}"]
    names = list(summary["labels"])
    for log in evolution["iterations"]:
        per_label = "; ".join(f"{names[int(label)]}: {e['noisy_votes']:.1f} noisy votes on {e['texts']} samples "
                              f"({e['noisy_votes'] / max(e['texts'], 1):.2f} each on average), lowest kept "
                              f"{e['lowest_kept_votes']}" for label, e in log["per_label"].items())
        lines.append(f"iteration {log['iteration']}: {per_label}")
    if not record.get("dp"):
        return "\n".join([*lines, f"no DP guarantee: {record.get('note', 'exact votes')}"])
    votes = [m for m in record.get("mechanisms", []) if m["name"] == "Private Evolution votes"]
    sigma = votes[0]["noise_multiplier"] if votes else record["noise_multiplier"]
    lines += [f"noise: each count + N(0, sigma^2), sigma = {sigma:.4f} (sensitivity 1: one record moves the "
              f"histogram by at most 1 in L2 norm), {record['iterations']} iteration(s), k = {record['nearest']}",
              f"(epsilon, delta) = ({round_up(record['epsilon'])}, {record['delta']:.3g}) by the "
              f"{record['accountant']} accountant"]
    for m in record.get("mechanisms", []) if record.get("composed_with") else []:
        lines.append(f"  composed: {m['name']}: sigma {m['noise_multiplier']:.4g}, sample rate "
                     f"{m['sample_rate']:.4g}, {m['steps']} step(s)")
    return "\n".join([*lines, f"noise source: {record.get('release_note')}"])
