"""`train`: one DP fine-tuning run from records to model/, train_log.jsonl and privacy.json, resumable.

The finetune stage (`dpnb.stages.finetune`) trains the run's generator with it, and the audit
(`dpnb.stages.audit`) its two twins, exactly alike. In order:

1. the plan (`dpnb.training.plan`): q, the steps, delta, sigma and the divisor E, checked against N
   before any model is loaded;
2. the outputs already there: a finished training of the same identity (model, config, records) is
   returned as it is, a checkpoint of it resumed (`dpnb.training.checkpoints`), anything else cleared;
3. the model (`dpnb.training.trainable`), the loss before any update (step 0 of the log) or the
   checkpoint's state, the precision, the fast path (`dpnb.training.frozen_prefix`) and the Opacus
   session (`dpnb.training.dpsgd`);
4. the logical steps, each logged (`dpnb.training.train_log`) with the epsilon spent so far, a
   checkpoint every `checkpoint_every` steps and on a stop request (SIGINT, SIGTERM, `should_stop`);
5. privacy.json from the steps the accountant counted, and the model, written last.

Under torchrun every rank calls `train` with the same arguments (`dpnb.training.distributed`): each
trains on its share of every logical batch, only rank 0 writes, and every rank returns once the
outputs are written.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dpnb import faults
from dpnb.errors import DpnbError
from dpnb.io import append_jsonl, read_json, write_json_atomic
from dpnb.models import (
    MODEL_CARD,
    load_tokenizer,
    quiet_transformers,
    require_records_fit,
    resolve_device,
    save_trained,
)
from dpnb.precision import Precision
from dpnb.privacy.accounting import EpsilonTracker, accountant_history
from dpnb.rundir import RunDir
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
    Session,
    accounted_steps,
    compute_precision,
    epoch_steps,
    make_session,
    require_dp_when_distributed,
)
from dpnb.training.frozen_prefix import frozen_prefix
from dpnb.training.loss import Records, initial_loss
from dpnb.training.plan import TrainingPlan, describe_plan, plan_training, privacy_record
from dpnb.training.train_log import report_step, truncate_log
from dpnb.training.trainable import build_model, model_card, trainable_parameters

if TYPE_CHECKING:
    import datasets
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dpnb.config import FinetuneConfig


@dataclass
class Training:
    """One call of `train`: where it writes, what it trains on, with which plan, and how it reports."""

    out: RunDir
    cfg: FinetuneConfig
    plan: TrainingPlan
    records: Records
    identity: dict[str, Any]  # what a checkpoint or a finished result must match to be used
    device: str
    pad_id: int
    say: Callable[..., Any]  # print on rank 0 when verbose, else nothing

    @property
    def main(self) -> bool:
        return distributed.is_main_process()


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
    where the sweep's other runs on the same records find it (`dpnb.training.frozen_prefix`).
    `plan_size` (the audit's twins) is the N that q, the steps, delta, sigma and the divisor are planned
    for, at least len(train) (`dpnb.training.plan.plan_training`); by default len(train).
    """
    out = out_dir if isinstance(out_dir, RunDir) else RunDir(out_dir)
    records = Records.from_dataset(train)
    require_dp_when_distributed(cfg)
    plan = plan_training(cfg, len(records), plan_size)  # every N-dependent check before any model is loaded
    identity = same_identity_on_every_rank(model_name, cfg, records, train_sha256, plan)
    finished = finished_record(out, identity)
    if finished is not None and resume:
        return finished
    checkpoint = checkpoint_to_resume(out, identity, resume)
    rng = this_rank_rng_states(checkpoint) if checkpoint is not None else None
    distributed.barrier()  # every rank has read the files above before rank 0 clears them
    with distributed.shared_section("clearing the earlier training outputs"):
        if checkpoint is None and distributed.is_main_process():
            out.clear_training()

    device = distributed.rank_device(resolve_device(cfg.device))
    tokenizer = tokenizer or load_tokenizer(model_name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    say = print if verbose and distributed.is_main_process() else (lambda *a, **k: None)
    run = Training(out, cfg, plan, records, identity, device, pad_id, say)
    model, notes = load_model(run, model_name, base_model)
    position, wall_before = start_or_resume(run, model, checkpoint)
    session, precision = open_session(run, model, checkpoint, rng, shared_dir)
    say(describe_plan(plan, trainable_parameters(model), cfg))
    wall = take_steps(run, session, position, wall_before, rng["sampler"] if rng else None, should_stop)
    return finish(run, session, position.step, wall, model_name, tokenizer, notes, precision)


def same_identity_on_every_rank(model_name: str, cfg: FinetuneConfig, records: Records, train_sha256: str,
                                plan: TrainingPlan) -> dict[str, Any]:
    """The training's identity (model, config, records, and the plan's N when it is not len(records)).

    Under torchrun every rank must hold the same records and plan: a stale copy on one node would
    train on others, so they are compared across ranks first.
    """
    identity = training_identity(model_name, cfg, records, train_sha256)
    if plan.plan_size != len(records):
        identity["plan_size"] = plan.plan_size  # another plan is another training
    distributed.require_same_on_every_rank(
        {"prepared records": identity["records"], "q": plan.sample_rate, "steps": plan.steps,
         "sigma": plan.noise_multiplier, "delta": plan.delta, "E": plan.divisor},
        "the prepared records and the plan", hidden=("prepared records",),
        fix="every rank must read the same prepared run directory and config (prepare on one copy, share it)")
    return identity


def finished_record(out: RunDir, identity: dict[str, Any]) -> dict[str, Any] | None:
    """privacy.json of a finished training of the same identity, when its model is there too."""
    finished = out.privacy.exists() and (out.model / MODEL_CARD).exists() and out.training_identity.exists()
    if not finished or out.checkpoint.exists():
        return None
    return read_json(out.privacy) if read_json(out.training_identity) == identity else None


def checkpoint_to_resume(out: RunDir, identity: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """The checkpoint in `out` when resuming, refused when another training setup wrote it."""
    checkpoint = load_checkpoint(out.checkpoint) if resume and out.checkpoint.exists() else None
    if checkpoint is not None and checkpoint.get("identity") != identity:
        raise DpnbError(f"{out.checkpoint} was written by another training setup (model, config or data "
                        f"differ); rerun with force=True to start afresh, or restore the original settings")
    return checkpoint


def load_model(run: Training, model_name: str, base_model: PreTrainedModel | None) -> tuple[nn.Module, list[str]]:
    """The model to train (`cfg.mode`'s weights trainable) on the run's device, and notes for the log."""
    torch.manual_seed(run.cfg.seed)  # adapter initialisation
    with quiet_transformers():
        model, notes = build_model(model_name, run.cfg, run.device, base_model)
    require_records_fit(model, max(map(len, run.records.input_ids)))
    if distributed.is_distributed():
        run.say(f"training across {distributed.world_size()} processes: each samples its share of the records at "
                f"q = {run.plan.sample_rate:.6g}, rank 0 adds the noise once per step and writes every output")
    for note in notes:
        run.say(note)
    return model, notes


def start_or_resume(run: Training, model: nn.Module, checkpoint: dict[str, Any] | None) -> tuple[Position, float]:
    """Log step 0 (the loss before any update), or restore the checkpoint's weights and cut the log back to it.

    Returns where training stands and the wall time already spent.
    """
    position, wall_before = Position(), 0.0
    with distributed.shared_section("logging the loss before training or resuming"):
        if checkpoint is None and run.main:
            loss0 = initial_loss(model, run.records, run.cfg, run.pad_id, run.device)
            append_jsonl(run.out.train_log, {"step": 0, "epoch": 0.0, "epsilon": 0.0 if run.cfg.dp else None,
                                             "loss": loss0, "lr": run.cfg.lr, "wall_s": 0.0})
        elif checkpoint is not None:
            load_trainable_state(model, checkpoint["trainable"])
            position, wall_before = Position(**checkpoint["position"]), float(checkpoint["wall_s"])
            if run.main:
                truncate_log(run.out.train_log, int(checkpoint["log_length"]))
            run.say(f"resuming from the checkpoint at step {position.step} of {run.plan.steps}")
    return position, wall_before


def open_session(run: Training, model: nn.Module, checkpoint: dict[str, Any] | None, rng: dict[str, Any] | None,
                 shared_dir: Path | None) -> tuple[Session, Precision]:
    """The precision, the fast path when it applies, and the Opacus session, restored from the checkpoint."""
    precision = compute_precision(run.cfg, run.device)
    run.say(precision.reason)
    # a shared cache is built and saved by rank 0, then mapped by the others
    with distributed.main_first("building the shared frozen-prefix cache") if shared_dir is not None \
            else contextlib.nullcontext():
        prefix, prefix_note = frozen_prefix(model, run.records, run.cfg, run.pad_id, run.device, shared_dir,
                                            precision)
    run.say(prefix_note)
    session = make_session(model, run.cfg, run.plan, run.device, checkpoint["accountant"] if checkpoint else None,
                           prefix, precision)
    if checkpoint is not None:
        session.adamw.load_state_dict(checkpoint["optimizer"])
        session.scheduler.load_state_dict(checkpoint["scheduler"])
        if session.noise_rng is not None:
            session.noise_rng.set_state(rng["noise"])
        restore_global_rngs(rng)
    return session, precision


def take_steps(run: Training, session: Session, position: Position, wall_before: float,
               sampler_state: torch.Tensor | None, should_stop: Callable[[int], bool] | None) -> float:
    """The logical steps from `position` to the plan's last, each logged; returns the wall time spent in all.

    Checkpoints every `checkpoint_every` steps, and on a stop request (SIGINT, SIGTERM or `should_stop`)
    checkpoints and raises `TrainingInterrupted`; under torchrun every rank stops at the same step.
    """
    cfg, plan, out = run.cfg, run.plan, run.out
    tracker = (EpsilonTracker(plan.noise_multiplier, plan.sample_rate, plan.delta, cfg.accountant, plan.steps)
               if cfg.dp else None)
    started = time.time()
    with StopRequest() as stop, quiet_transformers():
        while position.step < plan.steps:
            steps = min(plan.steps_per_epoch - position.step_in_epoch, plan.steps - position.step)
            mid_epoch = position.step_in_epoch > 0
            for result in epoch_steps(session, run.records, cfg, run.pad_id, run.device, steps, mid_epoch,
                                      sampler_state):
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
                    if run.main:
                        append_jsonl(out.train_log, record)
                report_step(run.say, record, plan.steps)
                asked = should_stop is not None and should_stop(position.step)
                stopping = distributed.any_rank(bool(stop.reason) or asked)  # every rank stops at the same step
                if stopping or position.step % cfg.checkpoint_every == 0:
                    save_checkpoint(out.checkpoint, session, position, run.identity, position.step + 1, wall)
                    if run.main:
                        run.say(f"checkpoint at step {position.step}: {out.checkpoint.stat().st_size / 2**20:.1f} "
                                f"MiB (replaces the previous one)")
                faults.reached(f"finetune step {position.step}")  # the fault tests kill or hold here
                if stopping and position.step < plan.steps:
                    raise TrainingInterrupted(
                        f"training stopped at step {position.step} of {plan.steps} ({stop.reason or 'as asked'}); "
                        f"the checkpoint in {out.checkpoint.parent} resumes it: rerun the stage")
    return wall_before + time.time() - started


def finish(run: Training, session: Session, steps: int, wall: float, model_name: str,
           tokenizer: PreTrainedTokenizerBase, notes: list[str], precision: Precision) -> dict[str, Any]:
    """privacy.json from the steps the accountant counted (checked against the loop's `steps`), then the
    model, its card and the training's identity; the checkpoint is removed. Returns the privacy record."""
    cfg, out = run.cfg, run.out
    steps_taken = steps
    if cfg.dp:
        steps_taken = accounted_steps(session, run.plan)
        if steps_taken != steps:
            raise RuntimeError(f"the accountant counted {steps_taken} noise-adding steps, the loop {steps}")
        # every rank's accountant saw the same (sigma, q) at every step: the epsilon of one is the run's
        distributed.require_same_on_every_rank(accountant_history(session.engine.accountant),
                                               "the accountants' histories")
    record = privacy_record(cfg, run.plan, steps_taken, trainable_parameters(session.trainable))
    with distributed.shared_section("writing the model and privacy.json"):  # every rank returns once they are written
        if run.main:
            card = {**model_card(model_name, cfg, notes), "precision": precision.record()}
            save_trained(session.trainable, tokenizer, out.model, card)
            write_json_atomic(out.training_identity, run.identity)
            write_json_atomic(out.privacy, record)
            out.checkpoint.unlink(missing_ok=True)  # model/ holds the weights now; the state is not needed
    run.say(f"done: {steps} steps in {wall:.0f} s" + (f", epsilon = {record['epsilon']:.3f}" if cfg.dp else ""))
    return record
