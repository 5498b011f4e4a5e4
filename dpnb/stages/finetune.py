"""02 finetune: differentially private fine-tuning of the run's generator, and what its notebook shows.

`run_stage` trains the generator named by the prepared data on its training records (`train`),
writing model/, train_log.jsonl, privacy.json and figures/loss_vs_epsilon.png. The DP-SGD step
itself (Poisson sampling, clipping, noise, the logical steps) is `dpnb.training.dpsgd`; the guarantee and
privacy.json are `dpnb.privacy`; stopping and resuming are `dpnb.training.checkpoints`; models are
`dpnb.models`.

What the logged losses are: train_log.jsonl holds the mean loss of each logical batch, computed
during its forward passes (with the weights before that step's update). Step 0 is the loss before
any update, on a fixed sample of min(N, logical_batch_size) records drawn with the seed, in eval mode.
These losses are statistics of the private data and are NOT covered by the DP guarantee; only the
weights (and what is sampled from them) are.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from dpnb import faults
from dpnb.data.prompts import PromptFormat
from dpnb.errors import DpnbError
from dpnb.generation.decoding import sample_continuations
from dpnb.generation.next_token import SamplingSettings
from dpnb.io import append_jsonl, read_json, read_jsonl, save_figure, write_json_atomic, write_text_atomic
from dpnb.models import (
    MODEL_CARD,
    build_model,
    load_base_model,
    load_tokenizer,
    load_trained,
    model_card,
    quiet_transformers,
    require_records_fit,
    resolve_device,
    save_trained,
    trainable_parameters,
)
from dpnb.privacy.accounting import EpsilonTracker, accountant_history
from dpnb.rundir import RunDir, shared_store
from dpnb.stages.prepare import load_prepared
from dpnb.training import distributed
from dpnb.training.checkpoints import (
    Position,
    StopRequest,
    TrainingInterrupted,
    load_checkpoint,
    load_trainable_state,
    restore_global_rngs,
    save_checkpoint,
    this_rank_rng_states,
    training_identity,
)
from dpnb.training.dpsgd import (
    accounted_steps,
    compute_precision,
    epoch_steps,
    make_session,
    require_dp_when_distributed,
)
from dpnb.training.frozen_prefix import frozen_prefix
from dpnb.training.loss import Records, initial_loss
from dpnb.training.plan import TrainingPlan, plan_training, privacy_record

if TYPE_CHECKING:
    import datasets
    from matplotlib.axes import Axes
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dpnb.config import FinetuneConfig

STAGE = "finetune"
LOSS_FIGURE = "loss_vs_epsilon.png"


# =========================================================================== train


def train(model_name: str, train: datasets.Dataset, cfg: FinetuneConfig, out_dir: str | os.PathLike | RunDir, *,
          train_sha256: str = "", tokenizer: PreTrainedTokenizerBase | None = None,
          base_model: PreTrainedModel | None = None, resume: bool = True,
          should_stop: Callable[[int], bool] | None = None, verbose: bool = True,
          shared_dir: Path | None = None, plan_size: int | None = None) -> dict[str, Any]:
    """Fine-tune `model_name` on the records of `train`; write model/, train_log.jsonl, privacy.json.

    `out_dir` is laid out like a run directory (a run, or one of the audit's twins). Resumes from
    its checkpoint when that was written by the same model, config and records (`resume=False`
    starts afresh, deleting earlier outputs). When out_dir already holds the finished result of the
    same training it is returned without training again. `base_model` (optional) is the loaded base
    to train, modified in place; `should_stop(step)` is asked after every logical step and, when it
    answers True, training checkpoints and raises `TrainingInterrupted`, as on SIGINT. Returns the
    privacy record (privacy.json). `shared_dir` (the runs of a sweep) keeps the frozen-prefix cache
    where the sweep's other runs on the same records find it (`dpnb.training.frozen_prefix.shared_prefix_cache`).
    `plan_size` (the audit's twins) is the N that q, the steps, delta, sigma and the divisor are planned
    for, at least len(train) (`dpnb.training.plan.plan_training`); by default len(train).

    Under torchrun every rank calls it with the same arguments (`dpnb.training.distributed`): each trains on
    its share of every logical batch, only rank 0 writes (log, checkpoints, model, privacy.json), and
    every rank returns once the outputs are written.
    """
    out = out_dir if isinstance(out_dir, RunDir) else RunDir(out_dir)
    records = Records.from_dataset(train)
    require_dp_when_distributed(cfg)
    plan = plan_training(cfg, len(records), plan_size)  # every N-dependent check before any model is loaded
    main = distributed.is_main_process()
    identity = training_identity(model_name, cfg, records, train_sha256)
    if plan.plan_size != len(records):
        identity["plan_size"] = plan.plan_size  # another plan is another training
    # under torchrun every rank must hold the same records and plan: a stale copy on one node would train on others
    distributed.require_same_on_every_rank(
        {"prepared records": identity["records"], "q": plan.sample_rate, "steps": plan.steps,
         "sigma": plan.noise_multiplier, "delta": plan.delta, "E": plan.divisor},
        "the prepared records and the plan", hidden=("prepared records",),
        fix="every rank must read the same prepared run directory and config (prepare on one copy, share it)")
    finished = _finished_record(out, identity)
    if finished is not None and resume:
        return finished
    checkpoint = load_checkpoint(out.checkpoint) if resume and out.checkpoint.exists() else None
    if checkpoint is not None and checkpoint.get("identity") != identity:
        raise DpnbError(f"{out.checkpoint} was written by another training setup (model, config or data "
                        f"differ); rerun with force=True to start afresh, or restore the original settings")
    rng = this_rank_rng_states(checkpoint) if checkpoint is not None else None
    distributed.barrier()  # every rank has read the files above before rank 0 clears them
    with distributed.shared_section("clearing the earlier training outputs"):
        if checkpoint is None and main:
            out.clear_training()

    device = distributed.rank_device(resolve_device(cfg.device))
    tokenizer = tokenizer or load_tokenizer(model_name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)  # adapter initialisation
    with quiet_transformers():
        model, notes = build_model(model_name, cfg, device, base_model)
    require_records_fit(model, max(map(len, records.input_ids)))
    say = print if verbose and main else (lambda *a, **k: None)
    if distributed.is_distributed():
        say(f"training across {distributed.world_size()} processes: each samples its share of the records at "
            f"q = {plan.sample_rate:.6g}, rank 0 adds the noise once per step and writes every output")
    for note in notes:
        say(note)
    position, wall_before = Position(), 0.0
    with distributed.shared_section("logging the loss before training or resuming"):
        if checkpoint is None and main:
            loss0 = initial_loss(model, records, cfg, pad_id, device)
            append_jsonl(out.train_log, {"step": 0, "epoch": 0.0, "epsilon": 0.0 if cfg.dp else None,
                                         "loss": loss0, "lr": cfg.lr, "wall_s": 0.0})
        elif checkpoint is not None:
            load_trainable_state(model, checkpoint["trainable"])
            position, wall_before = Position(**checkpoint["position"]), float(checkpoint["wall_s"])
            if main:
                _truncate_log(out.train_log, int(checkpoint["log_length"]))
            say(f"resuming from the checkpoint at step {position.step} of {plan.steps}")
    precision = compute_precision(cfg, device)
    say(precision.reason)
    # a shared cache is built and saved by rank 0, then mapped by the others
    with distributed.main_first("building the shared frozen-prefix cache") if shared_dir is not None \
            else contextlib.nullcontext():
        prefix, prefix_note = frozen_prefix(model, records, cfg, pad_id, device, shared_dir, precision)
    say(prefix_note)
    session = make_session(model, cfg, plan, device, checkpoint["accountant"] if checkpoint else None, prefix,
                           precision)
    if checkpoint is not None:
        session.adamw.load_state_dict(checkpoint["optimizer"])
        session.scheduler.load_state_dict(checkpoint["scheduler"])
        if session.noise_rng is not None:
            session.noise_rng.set_state(rng["noise"])
        restore_global_rngs(rng)
    say(describe_plan(plan, trainable_parameters(model), cfg))
    tracker = (EpsilonTracker(plan.noise_multiplier, plan.sample_rate, plan.delta, cfg.accountant, plan.steps)
               if cfg.dp else None)

    sampler_state = rng["sampler"] if rng else None
    started = time.time()
    with StopRequest() as stop, quiet_transformers():
        while position.step < plan.steps:
            steps = min(plan.steps_per_epoch - position.step_in_epoch, plan.steps - position.step)
            mid_epoch = position.step_in_epoch > 0
            for result in epoch_steps(session, records, cfg, pad_id, device, steps, mid_epoch, sampler_state):
                sampler_state = None
                position.step += 1
                position.step_in_epoch += 1
                if position.step_in_epoch == plan.steps_per_epoch:
                    position.epoch, position.step_in_epoch = position.epoch + 1, 0
                wall = wall_before + time.time() - started
                epsilon = tracker.epsilon(accounted_steps(session, plan)) if tracker else None
                record = {"step": position.step, "epoch": round(position.step / plan.steps_per_epoch, 4),
                          "epsilon": epsilon, "loss": result.loss, "lr": result.lr, "wall_s": round(wall, 2)}
                with distributed.shared_section(f"logging step {position.step}"):
                    if main:
                        append_jsonl(out.train_log, record)
                _report_step(say, record, plan.steps)
                asked = should_stop is not None and should_stop(position.step)
                stopping = distributed.any_rank(bool(stop.reason) or asked)  # every rank stops at the same step
                if stopping or position.step % cfg.checkpoint_every == 0:
                    save_checkpoint(out.checkpoint, session, position, identity, position.step + 1, wall)
                    if main:
                        say(f"checkpoint at step {position.step}: {out.checkpoint.stat().st_size / 2**20:.1f} "
                            f"MiB (replaces the previous one)")
                faults.reached(f"finetune step {position.step}")  # the fault tests kill or hold here
                if stopping and position.step < plan.steps:
                    raise TrainingInterrupted(
                        f"training stopped at step {position.step} of {plan.steps} ({stop.reason or 'as asked'}); "
                        f"the checkpoint in {out.checkpoint.parent} resumes it: rerun the stage")
    wall = wall_before + time.time() - started
    steps_taken = position.step
    if cfg.dp:
        steps_taken = accounted_steps(session, plan)
        if steps_taken != position.step:
            raise RuntimeError(f"the accountant counted {steps_taken} noise-adding steps, the loop {position.step}")
        # every rank's accountant saw the same (sigma, q) at every step: the epsilon of one is the run's
        distributed.require_same_on_every_rank(accountant_history(session.engine.accountant),
                                               "the accountants' histories")
    record = privacy_record(cfg, plan, steps_taken, trainable_parameters(model))
    with distributed.shared_section("writing the model and privacy.json"):  # every rank returns once they are written
        if main:
            card = {**model_card(model_name, cfg, notes), "precision": precision.record()}
            save_trained(session.trainable, tokenizer, out.model, card)
            write_json_atomic(out.training_identity, identity)
            write_json_atomic(out.privacy, record)
            out.checkpoint.unlink(missing_ok=True)  # model/ holds the weights now; the state is not needed
    say(f"done: {position.step} steps in {wall:.0f} s" + (f", epsilon = {record['epsilon']:.3f}" if cfg.dp else ""))
    return record


def _finished_record(out: RunDir, identity: dict[str, Any]) -> dict[str, Any] | None:
    """privacy.json of a finished training of the same identity, when its model is there too."""
    finished = out.privacy.exists() and (out.model / MODEL_CARD).exists() and out.training_identity.exists()
    if not finished or out.checkpoint.exists():
        return None
    return read_json(out.privacy) if read_json(out.training_identity) == identity else None


def _truncate_log(path: os.PathLike, length: int) -> None:
    """Keep the first `length` lines: steps after the checkpoint are redone, exactly as before."""
    kept = read_jsonl(path)[:length]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def _report_step(say: Callable[..., Any], record: dict[str, Any], total: int) -> None:
    every = max(1, total // 50)
    if record["step"] % every and record["step"] != total:
        return
    loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
    eps = "" if record["epsilon"] is None else f"  epsilon {record['epsilon']:.3f}"
    say(f"step {record['step']}/{total}  epoch {record['epoch']:.2f}  loss {loss}{eps}  ({record['wall_s']:.0f} s)",
        flush=True)


def describe_plan(plan: TrainingPlan, trainable: int, cfg: FinetuneConfig) -> str:
    """One paragraph with the numbers of the run, for the log and the notebook."""
    lines = [
        f"{plan.steps} logical steps over {plan.dataset_size} records: each record is sampled with probability "
        f"q = {plan.sample_rate:.6g} per step (expected logical batch {plan.expected_batch_size:.1f}, physical "
        f"batches of at most {plan.physical_batch_size}); {trainable:,} trainable parameters ({cfg.mode})."
    ]
    if plan.plan_size != plan.dataset_size:
        lines.append(f"Planned for N = {plan.plan_size} records (q, steps, delta, sigma, and the divisor "
                     f"E = {plan.divisor}), whatever part of them is present.")
    if plan.dp:
        sigma = plan.noise_multiplier
        lines.append(
            f"DP-SGD: clip each record's gradient to C = {cfg.max_grad_norm:g}, add Gaussian noise with "
            f"sigma = {sigma:.4f} (std sigma*C = {sigma * cfg.max_grad_norm:.3g}); target epsilon "
            f"{plan.target_epsilon:g} at delta = {plan.delta:.3g} ({plan.accountant} accountant)."
        )
    else:
        lines.append("No DP: no clipping, no noise (epsilon = infinity).")
    return "\n".join(lines)


# =========================================================================== the stage


def read_train_log(path: str | os.PathLike | RunDir) -> list[dict[str, Any]]:
    """The records of train_log.jsonl (`path` may be the file, the directory holding it, or a RunDir)."""
    if isinstance(path, RunDir):
        return read_jsonl(path.train_log)
    return read_jsonl(RunDir(path).train_log if os.path.isdir(path) else path)


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


# =========================================================================== for the notebook and the report


def plot_loss_vs_epsilon(logs: Mapping[str, Sequence[dict[str, Any]]] | Sequence[dict[str, Any]],
                         ax: Axes | None = None, title: str = "") -> Figure:
    """Training loss against the epsilon spent so far (the paper's figure); one curve per log.

    `logs` is one train log (a list of its records) or several by name (labelled curves, e.g. one
    per run of a report). Steps that drew no record (loss null) are left out. A DP log is drawn
    against epsilon; when no log is private, they are drawn against the step instead (epsilon is
    infinite), and beside DP logs a non-DP one is left out (it has no epsilon to place it on).
    Draws on `ax` when given, else on a new figure; returns the figure.
    """
    named = dict(logs) if isinstance(logs, Mapping) else {"": logs}
    curves = {name: [r for r in log if r.get("loss") is not None] for name, log in named.items()}
    curves = {name: points for name, points in curves.items() if points}
    private = {name: all(r.get("epsilon") is not None for r in points) for name, points in curves.items()}
    against_epsilon = any(private.values()) or not curves
    created = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        if against_epsilon and not private[name]:
            continue
        xs = [r["epsilon"] if against_epsilon else r["step"] for r in points]
        losses = [r["loss"] for r in points]
        # each point is one Poisson batch's mean loss: noisy; the smoothed line shows the trend through it
        dots = ax.plot(xs, losses, marker="o", markersize=2.5, linewidth=0, alpha=0.35,
                       label=f"{name}: each step" if name else "each step's batch")
        if len(points) >= 4:
            ax.plot(xs, smoothed(losses), linewidth=2, color=dots[0].get_color(),
                    label=f"{name}: smoothed" if name else f"smoothed (moving mean of {smoothing_window(len(losses))})")
    ax.set_xlabel("epsilon spent" if against_epsilon else "logical step (no DP: epsilon is infinite)")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title(title or ("Training loss against epsilon" if against_epsilon else "Training loss (no DP)"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if created:
        ax.figure.tight_layout()
    return ax.figure


def smoothing_window(n: int) -> int:
    """Steps averaged by `smoothed`: about a tenth of the run, odd, at least 3."""
    return max(3, (n // 10) | 1)


def smoothed(values: Sequence[float]) -> list[float]:
    """A centred moving mean over `smoothing_window(len(values))` steps (shorter at the ends).

    A per-step loss is the mean over one Poisson-sampled batch: its spread hides a slow fall. The
    window shrinks symmetrically at the ends, so the first and last points are their own values'
    neighbourhood, not a lag.
    """
    half = smoothing_window(len(values)) // 2
    out = []
    for i in range(len(values)):
        reach = min(half, i, len(values) - 1 - i)
        window = values[i - reach : i + reach + 1]
        out.append(sum(window) / len(window))
    return out


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
