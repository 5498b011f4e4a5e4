"""02 finetune: differentially private fine-tuning of the run's generator, and what its notebook shows.

`run_stage` trains the generator named by the prepared data on its training records
(`dpnb.training.loop.train`), writing model/, train_log.jsonl, privacy.json and
figures/loss_vs_epsilon.png. The DP-SGD step itself (Poisson sampling, clipping, noise, the logical
steps) is `dpnb.training.dpsgd`; the plan and the guarantee are `dpnb.training.plan` and
`dpnb.privacy`; stopping and resuming are `dpnb.training.checkpoints`; models are `dpnb.models`.

What the logged losses are (`dpnb.training.train_log`): the mean loss of each logical batch,
computed during its forward passes (with the weights before that step's update); step 0 is the loss
before any update. These losses are statistics of the private data and are NOT covered by the DP
guarantee; only the weights (and what is sampled from them) are.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure

from dpnb.data.prepared import load_prepared
from dpnb.data.prompts import PromptFormat
from dpnb.generation.decoding import sample_continuations
from dpnb.generation.next_token import SamplingSettings
from dpnb.io import read_json, save_figure, write_json_atomic
from dpnb.models import load_base_model, load_trained, resolve_device
from dpnb.rundir import RunDir, shared_store
from dpnb.training import distributed
from dpnb.training.loop import train
from dpnb.training.train_log import plot_loss_vs_epsilon, read_train_log

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dpnb.config import FinetuneConfig

STAGE = "finetune"
LOSS_FIGURE = "loss_vs_epsilon.png"


# =========================================================================== the stage


def stage_summary(run: RunDir) -> dict[str, Any]:
    """privacy.json plus the first and last logged losses: what run_stage returns, read from the files."""
    record = read_json(run.privacy)
    losses = [r["loss"] for r in read_train_log(run) if r.get("loss") is not None]
    return {**record, "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None}


def run_stage(run: RunDir, cfg: FinetuneConfig, force: bool = False) -> dict[str, Any]:
    """Fine-tune the run's generator on its prepared records (stage 02); skip when already done.

    Under torchrun every rank calls it (`dpnb.pipeline`): all of them train, rank 0 alone then draws
    the figure, samples before/after and marks the stage complete; the others return after training.
    """
    run.require_stage("prepare")
    if not run.should_run(STAGE, cfg, force):
        return stage_summary(run)
    started = time.time()
    train_set, _, manifest = load_prepared(run)
    record = train(manifest["model"], train_set, cfg, run, train_sha256=manifest.get("train_sha256", ""),
                   resume=not force, shared_dir=shared_store())
    if not distributed.is_main_process():
        return record
    figure = Figure(figsize=(6, 3.6))  # not pyplot's: the notebook shows the saved file, not a stray copy
    plot_loss_vs_epsilon(read_train_log(run), ax=figure.subplots(), title=f"{manifest['model']}, {cfg.mode}")
    figure.tight_layout()
    save_figure(figure, run.figure(LOSS_FIGURE))
    if cfg.samples_before_after:
        write_json_atomic(run.before_after, sample_before_after(run, cfg))
    run.mark_complete(STAGE, cfg, started)
    return stage_summary(run)


# =========================================================================== for the notebook


def explain_privacy(record: dict[str, Any]) -> str:
    """What clipping, noise and accounting did in this run, in words, with its numbers (privacy.json)."""
    n, rate, steps = record["dataset_size"], record["sample_rate"], record["steps"]
    lines = [
        f"Training set: N = {n} records; mode {record['mode']}, {record['trainable_parameters']:,} trainable "
        f"parameters.",
        f"Sampling: at each step every record joins the batch independently with probability q = {rate:.6g} "
        f"(= 1/{round(1 / rate)}), so a logical batch holds N*q = {n * rate:.1f} records on average; the actual "
        f"number varies from step to step (Poisson sampling).",
        f"Steps: {steps} noise-adding steps ({steps * rate:.2f} epochs: each record was expected in "
        f"{steps * rate:.2f} batches).",
    ]
    if not record["dp"]:
        lines.append("No DP: gradients were neither clipped nor noised. Nothing bounds what the weights reveal "
                     "about one record (epsilon is infinite); this run is the baseline that shows what the noise "
                     "costs.")
        return "\n".join(lines)
    sigma, clip = record["noise_multiplier"], record["max_grad_norm"]
    by_accountant = ", ".join(f"{name.upper()}: {value:.2f}" for name, value in (record.get("epsilons") or {}).items())
    lines += [
        f"Clipping: each record's gradient is scaled down to norm at most C = {clip:g}, so adding or removing "
        f"one record moves the summed gradient by at most C.",
        f"Noise: Gaussian noise of standard deviation sigma*C = {sigma:.4f} * {clip:g} = {sigma * clip:.4g} is "
        f"added to every coordinate of that sum (sigma = {sigma:.4f}, chosen before training for exactly "
        f"these {steps} steps at this q), and the result is divided by the expected batch size.",
        f"Guarantee: (epsilon, delta) = ({record['epsilon']:.2f}, {record['delta']:.3g}) by the "
        f"{record['accountant'].upper()} accountant ({by_accountant}); target epsilon "
        f"{record['target_epsilon']:g}. delta is below 1/N = {1 / n:.3g}.",
        f"Meaning: any outcome of this training is at most e^epsilon = {math.exp(record['epsilon']):.3g} times as "
        f"likely with any one review in the data as without it (and the other way round), up to probability delta.",
    ]
    return "\n".join(lines)


def sample_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: dict[str, list[int]],
                 n_per_label: int, max_new_tokens: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """`n_per_label` seeded top-p samples for each label's prompt ids: a quick look, not the generate stage.

    Sampling rather than greedy decoding: greedy would give one text per label however many are asked.
    """
    device = next(model.parameters()).device
    rows = []
    for label, ids in prompts.items():
        if n_per_label <= 0:
            continue
        generator = torch.Generator(device=device).manual_seed(seed)
        settings = SamplingSettings(max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_token_id,), top_p=0.95,
                                    batch_size=n_per_label)
        samples = sample_continuations(model, ids, n_per_label, settings, generator=generator)
        for new_ids, _ in samples:
            rows.append({"label": label, "text": tokenizer.decode(new_ids, skip_special_tokens=True).strip()})
    return rows


def before_after_samples(run: RunDir, cfg: FinetuneConfig) -> list[dict[str, str]]:
    """The samples `run_stage` kept in before_after.json (sampled now for a run made without them)."""
    if run.before_after.exists():
        return read_json(run.before_after)
    return sample_before_after(run, cfg)


def sample_before_after(run: RunDir, cfg: FinetuneConfig) -> list[dict[str, str]]:
    """`cfg.samples_before_after` samples per label from the base model and from the fine-tuned one.

    Both are prompted with the label prompts stage 01 built and sampled with the same seed; each row
    holds `label`, `before` and `after`. (Both models are shareable: the base is public, the
    fine-tuned one carries the DP guarantee, so the samples do too.)
    """
    manifest = read_json(run.manifest)
    device = resolve_device(cfg.device)
    tuned, tokenizer = load_trained(run.model, device=device)
    base = load_base_model(manifest["model"], mode=cfg.mode, dtype=cfg.dtype, device=device, seed=cfg.seed)
    prompt_format = PromptFormat.from_dict(manifest["prompt"])
    prompts = {label: prompt_format.prompt_ids(label, tokenizer) for label in manifest["label_names"]}
    before = sample_texts(base, tokenizer, prompts, cfg.samples_before_after, seed=cfg.seed)
    after = sample_texts(tuned, tokenizer, prompts, cfg.samples_before_after, seed=cfg.seed)
    return [{"label": old["label"], "before": old["text"], "after": new["text"]}
            for old, new in zip(before, after, strict=True)]
