"""One model across several processes: torchrun, the process group, and DP-SGD's distributed step.

`torchrun --nproc_per_node=W -m dpnb.cli run config.yaml` starts W processes (ranks 0..W-1, one per
GPU, or W CPU processes); each holds a full copy of the model (the whole model for full fine-tuning,
the frozen base and the adapter for LoRA) and they share one logical step of DP-SGD. The pieces are
Opacus's own: `DifferentiallyPrivateDistributedDataParallel` (DPDDP) around the module Opacus steps,
which `PrivacyEngine.make_private` recognises and answers with `DistributedDPOptimizer` and a
distributed Poisson sampler. This module holds the glue: the process group, rank helpers, and the
collectives the training loop needs.

One distributed logical step, and why it is the single-process mechanism
-------------------------------------------------------------------------
The N records are split once into W fixed, public, disjoint shares S_r (Opacus's partition: a
seeded permutation cut into every W-th record). At each step

1. rank r draws its Poisson subset B_r: every record of S_r independently with probability q, from
   its own random stream. Every record of the data set is thus in B = union_r B_r independently
   with probability q: B is exactly the single-process Poisson sample at rate q.
2. each rank clips its records' gradients to C and sums them: s_r = sum_{i in B_r} clip_C(g_i);
3. rank 0 alone adds one Gaussian draw z ~ N(0, sigma^2 C^2 I) (`DistributedDPOptimizer.add_noise`);
   every rank divides by the per-rank expected batch E / W, the gradients are summed across ranks
   (all_reduce) and divided by W:

       G = sum_r (s_r + [r = 0] z) / (E / W) / W = (sum_{i in B} clip_C(g_i) + z) / E,

   with E = int(N q), the single-process public divisor. Every rank then takes the same AdamW step
   with the same G, so the replicas stay identical.

So the released sequence of updates has the distribution of the single-process mechanism with the
same q, sigma, C and number of steps T: the accountant of each rank sees the same (sigma, q, T),
and epsilon is the single-process epsilon (`dpnb.training.dpsgd` checks that every rank counted the same).
Noise added on every rank instead of one would be W draws, a variance W times too large: not a
privacy loss, but not the calibrated mechanism either; the tests check there is exactly one.

A logical step whose share drew no record on some rank is still a step on that rank: Opacus's
distributed sampler skips an empty local batch, which would leave the ranks one step apart and
waiting on each other; `EveryStepSampler` yields it (its update is then that rank's zero sum).

What is not distributed: the non-DP baseline (dp: false) refuses torchrun (it would need another
reduction of the mean loss; run it in one process), and only rank 0 writes outputs (model,
train_log.jsonl, privacy.json, checkpoints). Checkpoints hold every rank's random states, so a
resumed run must use the same number of processes.

Ranks that disagree, ranks that fail. Right after planning, every rank checks that all of them hold
the same prepared records (a fingerprint) and the same plan (q, steps, sigma, delta, E), and all fail
at once with one message naming what differs (`require_same_on_every_rank`): a stale copy on one
node would otherwise train on other records, or the ranks would wait at a collective. Where rank 0
works alone while the others wait (writing outputs, checkpoints, the log, a shared cache), the work
is a `shared_section`: a failure inside it reaches every rank at its end, and every rank stops with
one message instead of waiting for the timeout.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch.utils.data import DataLoader

from dpnb.errors import DpnbError, require

# How long a rank waits for the others at a collective: rank 0 runs the prepare stage (a notebook,
# minutes on the full data set) while the others wait for it, so the default is long.
TIMEOUT_ENV = "DPNB_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 360


# =========================================================================== where this process stands


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher setting its variables) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The process's index on its machine (torchrun's LOCAL_RANK): which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main_process() -> bool:
    """Rank 0, the only process that writes outputs (and the only one outside a process group)."""
    return rank() == 0


def describe() -> str:
    return f"rank {rank()} of {world_size()}"


def rank_device(device: str) -> str:
    """The device of this rank: "cuda" means its own GPU, cuda:LOCAL_RANK, under a process group."""
    if is_distributed() and torch.device(device).type == "cuda" and torch.device(device).index is None:
        return f"cuda:{local_rank()}"
    return device


def _timeout() -> datetime.timedelta:
    minutes = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        value = float(minutes)
    except ValueError:
        raise DpnbError(f"{TIMEOUT_ENV}={minutes!r} must be a number of minutes, e.g. {DEFAULT_TIMEOUT_MIN}") from None
    require(value > 0, f"{TIMEOUT_ENV} must be a positive number of minutes, got {minutes!r}")
    return datetime.timedelta(minutes=value)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the process group torchrun's variables describe (gloo on CPU, nccl on CUDA); leave it after.

    Each rank uses GPU LOCAL_RANK when there are GPUs. Outside torchrun (WORLD_SIZE unset or 1),
    nothing happens: one process, no group.
    """
    if not launched_by_torchrun() or is_distributed():
        yield
        return
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    require(not missing, f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set; launch "
                         f"with torchrun --nproc_per_node=N -m dpnb.cli ..., which sets them")
    cuda = torch.cuda.is_available()
    if cuda:
        require(local_rank() < torch.cuda.device_count(),
                f"LOCAL_RANK {local_rank()} has no GPU ({torch.cuda.device_count()} visible); start at most "
                f"{torch.cuda.device_count()} processes per machine (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=_timeout())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """nccl reduces tensors on the rank's GPU; gloo on the CPU."""
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


# =========================================================================== collectives the loop needs


def sum_across_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over the ranks (in float64); the values themselves in one process."""
    if not is_distributed():
        return tuple(values)
    summed = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return tuple(float(v) for v in summed.cpu())


def any_rank(flag: bool) -> bool:
    """True when `flag` is True on some rank: every rank decides to stop at the same step."""
    return sum_across_ranks(float(flag))[0] > 0


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value` (picklable), in rank order, on rank 0; None on the others. `[value]` in one process."""
    if not is_distributed():
        return [value]
    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: Any = None) -> Any:
    """Rank 0's `value` (picklable) on every rank; the other ranks' argument is ignored."""
    if not is_distributed():
        return value
    box = [value if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def shared_section(what: str) -> Iterator[None]:
    """A block every rank leaves together: when any rank fails inside it, every rank fails at its end.

    Rank 0 often works alone while the others wait (writing the outputs, a checkpoint, a cache).
    Without this, a rank 0 that raised would leave the others at their next collective until the
    timeout (`DPNB_DIST_TIMEOUT_MIN`, 6 hours by default). At the end of the block every rank tells
    the others whether it failed (one all_gather, which is also the block's barrier): a rank that
    failed raises its own error, every other rank a one-line DpnbError naming that failure. Every
    rank must enter the block, and any collective inside it must be reached by every rank. In one
    process, just the block.
    """
    if not is_distributed():
        yield
        return
    try:
        yield
    except BaseException as exc:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        with contextlib.suppress(Exception):  # the others must hear of it; this rank's own error comes first
            all_gather(f"{describe()} failed while {what}: {message}")
        raise
    failures = [failure for failure in all_gather(None) if failure]
    if failures:
        raise DpnbError(f"{'; '.join(failures)}; {describe()} stops too")


@contextlib.contextmanager
def main_first(what: str = "preparing what the ranks share") -> Iterator[None]:
    """Rank 0 runs the block first, then the others (e.g. rank 0 builds a shared cache, the others map it).

    Each turn is a `shared_section`: a rank that fails in its turn makes every rank fail at its end.
    """
    if is_main_process():
        with shared_section(what):
            yield
        with shared_section(what):  # the others' turn
            pass
    else:
        with shared_section(what):  # rank 0's turn
            pass
        with shared_section(what):
            yield


# =========================================================================== the DP pieces


def wrap_for_dp(module: torch.nn.Module) -> torch.nn.Module:
    """`module` in Opacus's DPDDP, which broadcasts rank 0's weights to every rank (the replicas start
    identical) and tells `make_private` to build the distributed optimizer and sampler."""
    return DifferentiallyPrivateDistributedDataParallel(module)


class EveryStepSampler(DistributedUniformWithReplacementSampler):
    """Opacus's distributed Poisson sampler that yields every logical batch, an empty one too.

    Each rank keeps the records of its share independently with probability q at each step, from its
    own generator. Opacus's version skips a batch that drew nothing on this rank; the other ranks
    would then wait at that step's all_reduce for a rank already at the next one, and the ranks'
    accountants would count different steps. Here every rank takes every step.
    """

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:  # Opacus's fixed, public partition of the records among the ranks
            seed = self.shuffle_seed + self.epoch
            order = torch.randperm(self.total_size, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.total_size)
        share = order[self.rank : self.total_size : self.num_replicas]
        for _ in range(self.num_batches):
            keep = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield share[keep].tolist()

    @property
    def steps(self) -> int:
        """Logical batches per pass (the name `UniformWithReplacementSampler` gives it, which the loop sets)."""
        return self.num_batches

    @steps.setter
    def steps(self, value: int) -> None:
        self.num_batches = value


def every_step_loader(loader: DataLoader, generator: torch.Generator, dataset: Any) -> DataLoader:
    """`loader` (make_private's distributed DPDataLoader) with `EveryStepSampler` at the same q, over `dataset`
    (the records there are: the plan may be made for more, `dpnb.training.plan.plan_training`)."""
    sampler = loader.batch_sampler
    require(isinstance(sampler, DistributedUniformWithReplacementSampler),
            "Opacus did not build a distributed Poisson sampler for this model (internal error)")
    every_step = EveryStepSampler(total_size=len(dataset), sample_rate=sampler.sample_rate,
                                  shuffle=sampler.shuffle, shuffle_seed=sampler.shuffle_seed,
                                  steps=sampler.num_batches, generator=generator)
    return DataLoader(dataset, batch_sampler=every_step, collate_fn=loader.collate_fn, generator=generator)


def reduce_gradients(optimizer: Any) -> None:
    """Sum the noised (rank 0) and plain (other ranks) gradients across ranks and divide by W.

    The loop steps AdamW itself after `pre_step` (so that it knows which physical batch ended a
    logical one); `DistributedDPOptimizer.step` would have called this in between.
    """
    if is_distributed():
        optimizer.reduce_gradients()


def require_same_on_every_rank(value: Any, what: str, fix: str = "", hidden: Sequence[str] = ()) -> None:
    """Raise the same one-line DpnbError on every rank at once when `value` differs between ranks.

    A mapping is compared entry by entry and the message names each entry that differs with every
    rank's value; an entry in `hidden` (a fingerprint of private records) only says which ranks differ
    from rank 0. `fix` ends the message.
    """
    values = all_gather(value)
    if all(other == values[0] for other in values[1:]):
        return
    keys = [k for k in value if any(v.get(k) != values[0].get(k) for v in values[1:])] if isinstance(value, dict) \
        else [None]
    parts = []
    for key in keys:
        seen = [v if key is None else v.get(key) for v in values]
        if key in hidden:
            ranks = ", ".join(str(r) for r, v in enumerate(seen) if v != seen[0])
            parts.append(f"{key} (rank {ranks}: not rank 0's)")
        else:
            parts.append((f"{key} " if key is not None else "") + "(" + ", ".join(
                f"rank {r}: {v}" for r, v in enumerate(seen)) + ")")
    raise DpnbError(f"{what} differ between ranks: {'; '.join(parts)}" + (f"; {fix}" if fix else ""))


def rank_states(states: Sequence[Any]) -> Any:
    """This rank's entry of a per-rank list (a checkpoint's random states)."""
    require(len(states) == world_size(),
            f"the checkpoint was written by {len(states)} process(es), this run has {world_size()}; resume with "
            f"the same number (torchrun --nproc_per_node={len(states)}), or rerun with force=True to start afresh")
    return states[rank()]
