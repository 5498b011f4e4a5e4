"""Stopping and resuming fine-tuning: the checkpoint, the RNG states it restores, and clean stops.

A checkpoint (trainable weights, optimizer and scheduler state, the accountant's history, every RNG
state, the data position) is written atomically every `checkpoint_every` logical steps and when
SIGINT or SIGTERM arrives (the loop finishes the current logical step first; a second signal stops
at once). Rerunning resumes from it with the same noise multiplier and the restored accountant, so
epsilon is never under-counted, and a resumed run reproduces the uninterrupted one bit for bit.
A checkpoint resumes only the training it was written by: same model, records and config (up to
the fields in `RESUME_NEUTRAL_FIELDS`, which do not change what is trained). It carries a checksum
of its contents (`dpnb.io.save_torch_atomic`): a truncated or corrupted checkpoint is refused with
the fix, never resumed.

Under torchrun (`dpnb.training.distributed`) the weights, optimizer and accountant are the same on every
rank, but the random states are not (each rank samples its own share of the records): rank 0
gathers every rank's states and writes them all (`rank_rngs`, in rank order), and each rank of the
resumed run, which must have as many processes, restores its own.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dpnb.errors import DpnbError
from dpnb.io import DamagedFile, load_torch_verified, save_torch_atomic
from dpnb.privacy import accounting
from dpnb.rundir import config_fingerprint  # the checkpoint's path is RunDir.checkpoint
from dpnb.training import distributed

if TYPE_CHECKING:
    from torch import nn

    from dpnb.config import FinetuneConfig
    from dpnb.training.dpsgd import Session
    from dpnb.training.loss import Records

CHECKPOINT_FORMAT = 2  # 2: with a checksum of its contents (dpnb.io.save_torch_atomic)
# Config fields that do not change what is trained: a checkpoint written under other values resumes.
RESUME_NEUTRAL_FIELDS = ("checkpoint_every", "samples_before_after", "device", "prefix_cache")


class TrainingInterrupted(DpnbError):
    """Training stopped at a logical-step boundary after saving a checkpoint; rerunning resumes it."""


@dataclass
class Position:
    """Where the loop is: logical steps done in all, the epoch, and steps done within it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def training_identity(model_name: str, cfg: FinetuneConfig, records: Records, train_sha256: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model, the training config and the records."""
    trained = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_NEUTRAL_FIELDS}
    return {"model": model_name, "config": config_fingerprint(trained), "records": records.fingerprint(),
            "dataset_size": len(records), "train_sha256": train_sha256}


# =========================================================================== state


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise DpnbError("the checkpoint's trainable weights do not match this model; delete the checkpoints "
                        "directory or rerun with force=True")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def rng_states(session: Session) -> dict[str, Any]:
    """Every random state a resumed run needs: global torch, numpy, Python, the sampler's and the noise's."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
              "sampler": session.sampler_rng.get_state(),
              "noise": session.noise_rng.get_state() if session.noise_rng is not None else None}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_global_rngs(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def this_rank_rng_states(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The random states this process restores: its rank's (a DpnbError when the process count differs)."""
    return distributed.rank_states(checkpoint.get("rank_rngs") or [checkpoint["rng"]])


def save_checkpoint(path: Path, session: Session, position: Position, identity: dict[str, Any],
                    log_length: int, wall_s: float) -> None:
    """Write the resumable state atomically (a temporary file renamed over the old checkpoint).

    Under torchrun every rank calls it: rank 0 writes every rank's random states, and all return
    once the file is in place (so that no rank stops before it is).
    """
    every_rank_rngs = distributed.gather_to_main(rng_states(session))
    with distributed.shared_section("writing the checkpoint"):  # a failure on rank 0 stops every rank at once
        if not distributed.is_main_process():
            return
        state = {
            "format": CHECKPOINT_FORMAT, "identity": identity, "position": dataclasses.asdict(position),
            "log_length": log_length, "wall_s": wall_s, "trainable": trainable_state(session.trainable),
            "optimizer": session.adamw.state_dict(), "scheduler": session.scheduler.state_dict(),
            "accountant": accounting.accountant_history(session.engine.accountant) if session.engine else None,
            "rng": every_rank_rngs[0], "world_size": distributed.world_size(),
            "rank_rngs": every_rank_rngs if distributed.is_distributed() else None,
        }
        save_torch_atomic(path, state, private=True)  # private: RNG states and optimizer state of private data


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, verified against the checksum saved with it; a damaged one is refused.

    A damaged state cannot be resumed (the weights, the optimizer or the random states would be
    wrong) and is not silently dropped either: the run says what to do.
    """
    try:
        # weights_only=False: the state holds numpy and Python RNG states; the file is our own, never downloaded
        return load_torch_verified(path, weights_only=False)
    except DamagedFile as why:
        raise DamagedFile(f"{why}: it cannot be resumed. Delete it to train again from step 0 (dpnb run --force), "
                          f"or put back an intact copy") from None


# =========================================================================== stopping cleanly


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop at the next logical-step boundary.

    The first signal sets the flag; a second one restores the previous handlers and interrupts at
    once (losing the work since the last checkpoint). Handlers can only be set from the main thread;
    elsewhere the request comes only from `should_stop`.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"{self.reason} received: stopping after the current logical step (send it again to stop now)",
              flush=True)
