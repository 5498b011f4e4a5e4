"""DP-SGD across processes (torchrun's way, `dpnb.training.distributed`), checked against one process.

Two processes on the CPU with the gloo backend, started with torch.multiprocessing and torchrun's
environment variables, run the same code as `torchrun --nproc_per_node=2 -m dpnb.cli run`:

(a) With noise multiplier 0 and q = 1 (every record in every logical batch, so the logical batch
    is fixed: 6 records, 3 per rank, physical batches of at most 2), the gradient AdamW receives at
    each of 2 steps and the weights after them equal one process's on the same batch: full
    fine-tuning (hooks and ghost clipping), LoRA, and LoRA on the top block through the frozen-prefix
    cache. Tolerance: relative L2 error 1e-5 of the whole vector (float32; the sum is split over
    ranks and added in another order, measured below 5e-7); the two ranks' weights are bit-identical.
(b) A whole run through `train()` (LoRA, N = 24, q = 1/6, 8 steps over two epochs, RDP) spends the
    same epsilon as one process: privacy.json's numbers and every step's logged epsilon are equal.
(c) Noise is added once per logical step: with sigma = 1 the update minus the noiseless update has
    per-coordinate variance (sigma C / E)^2 (one draw; two draws would double it): a two-sided bound
    on the sample variance of ~80,000 coordinates at 6 standard errors (false failure < 1e-8); only
    rank 0 draws, both ranks get the same update.
(d) A run interrupted after 3 of 8 steps (asked on rank 1 only: both ranks stop there) and resumed by
    two fresh processes ends with exactly the weights and log of the uninterrupted run
    (deterministic: true).
(e) Ranks that disagree (other records on rank 1, or another sigma) fail together with one message
    naming what differs, before any model loads; rank 0 failing while the others wait (writing the
    model) stops every rank at once, each with one message.
Plus: the distributed sampler yields empty local batches (ranks stay in step), the pipeline's
rank 0 / other-ranks protocol, and the refusals (non-DP, another process count on resume).

Two spawns of two processes in all, shared by the tests marked slow: about 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from opacus.optimizers.optimizer import DPOptimizer
from safetensors.torch import load_file
from testkit import EOS, PAD, VOCAB, as_dataset, small_records, toy_reviews, write_csv
from transformers import AutoModelForCausalLM, LlamaConfig

from dpnb import pipeline, registry
from dpnb.config import FinetuneConfig, build
from dpnb.errors import DpnbError
from dpnb.io import read_json, read_jsonl
from dpnb.models import load_tokenizer, quiet_transformers
from dpnb.privacy import accounting, guarantee
from dpnb.rundir import RunDir
from dpnb.training import distributed, dpsgd, loop
from dpnb.training.checkpoints import TrainingInterrupted
from dpnb.training.frozen_prefix import frozen_prefix
from dpnb.training.loss import Records
from dpnb.training.plan import plan_training
from dpnb.training.trainable import build_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

WORLD = 2
REL_TOL = 1e-5
SIGMA = 1.0  # the noise check's noise multiplier
TRAIN_RECORDS, STOP_AT = 24, 3


# =========================================================================== models, records, configs


def small_lm() -> AutoModelForCausalLM:
    """A 2-block, 64-wide Llama (tied embeddings, GQA) over 97 tokens: every step well under a second."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    return AutoModelForCausalLM.from_config(config)



def config(**overrides: Any) -> FinetuneConfig:
    values = dict(mode="full", dp=True, target_epsilon=8.0, accountant="rdp", logical_batch_size=6,
                  physical_batch_size=2, max_grad_norm=1.0, lr=1e-3, device="cpu", checkpoint_every=100, seed=0,
                  deterministic=True, lora_r=4, lora_targets=("q_proj", "v_proj"), samples_before_after=0)
    values.update(overrides)
    return FinetuneConfig(**values)


SESSION_CASES = {
    "full": {},
    "full-ghost": {"grad_sample_mode": "ghost"},
    "lora": {"mode": "lora"},
    "lora-top-cached": {"mode": "lora", "lora_top_layers": 1},
}


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def session_steps(case: str, sigma: float, steps: int) -> dict[str, Any]:
    """`steps` logical steps at q = 1 (all 6 records each time) of a fresh session: the gradient AdamW got
    at each, the weights after them, the logged losses, the accountant's history and the noise draws."""
    records = small_records(6)
    cfg = config(**SESSION_CASES[case])
    torch.manual_seed(0)
    with quiet_transformers():
        model, _ = build_model("small-llama", cfg, "cpu", base_model=small_lm())
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B drawn nonzero (as after some training), so that A has gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    plan = dataclasses.replace(plan_training(dataclasses.replace(cfg, dp=False), len(records)), dp=True,
                               noise_multiplier=sigma, delta=accounting.default_delta(len(records)))
    assert plan.sample_rate == 1.0
    prefix = frozen_prefix(model, records, cfg, PAD, "cpu")[0]
    assert (prefix is not None) == (case == "lora-top-cached")
    session = dpsgd.make_session(model, cfg, plan, "cpu", prefix=prefix)
    params = trainable(model)
    grads: list[dict[str, torch.Tensor]] = []
    adamw_step = session.adamw.step
    noise_draws: list[int] = []
    add_noise = DPOptimizer.add_noise

    def capture(*args: Any, **kwargs: Any) -> Any:
        grads.append({name: p.grad.detach().clone() for name, p in params.items()})
        return adamw_step(*args, **kwargs)

    def counted(self: DPOptimizer) -> None:  # DistributedDPOptimizer calls it on rank 0 only
        noise_draws.append(1)
        add_noise(self)

    session.adamw.step = capture
    DPOptimizer.add_noise = counted
    try:
        with quiet_transformers():
            results = list(dpsgd.epoch_steps(session, records, cfg, PAD, "cpu", steps, False, None))
    finally:
        DPOptimizer.add_noise = add_noise
    return {"grads": grads, "weights": {k: p.detach().clone() for k, p in params.items()},
            "results": [(r.loss, r.batch_size) for r in results], "noise_draws": len(noise_draws),
            "history": accounting.accountant_history(session.engine.accountant),
            "divisor": session.optimizer.expected_batch_size}


def train_config() -> FinetuneConfig:
    """LoRA, 24 records at q = 1/6 (6 steps an epoch, each rank drawing nothing ~11% of the time), 8 steps."""
    return config(mode="lora", logical_batch_size=4, max_steps=8, lr=1e-2)


def train_run(out: Path, stop_at: int | None = None) -> str:
    """One run through train(); with `stop_at`, rank 1 alone asks to stop there (as a signal reaching one
    rank first would), and every rank must stop at that step."""
    try:
        loop.train("small-llama", as_dataset(small_records(TRAIN_RECORDS)), train_config(), out,
                       tokenizer=load_tokenizer("tiny-llama"), base_model=small_lm(), verbose=False,
                       should_stop=(lambda step: step == stop_at and distributed.rank() == 1) if stop_at else None)
    except TrainingInterrupted:
        return "interrupted"
    return "finished"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =========================================================================== what each rank runs


def every_step_sampler() -> dict[str, Any]:
    """EveryStepSampler at a tiny q: every logical batch comes out, empty ones too, from this rank's share."""
    sampler = distributed.EveryStepSampler(total_size=10, sample_rate=0.05, steps=40,
                                           generator=torch.Generator().manual_seed(distributed.rank()))
    batches = list(sampler)
    drawn = sorted({i for batch in batches for i in batch})
    return {"count": len(batches), "empty": sum(not batch for batch in batches), "drawn": drawn}


def session_task(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"sampler": every_step_sampler()}
    for case in SESSION_CASES:
        result[case] = session_steps(case, 0.0, 2)
    result["noise"] = session_steps("full", SIGMA, 1)
    return result


def train_task(out: Path) -> dict[str, Any]:
    return {"whole": train_run(out / "whole"), "part": train_run(out / "part", stop_at=STOP_AT)}


def resume_task(out: Path) -> dict[str, Any]:
    with pytest.raises(DpnbError, match="dp: false"):
        dpsgd.require_dp_when_distributed(config(dp=False))
    return {"part": train_run(out / "part")}


def pipeline_task(out: Path) -> dict[str, Any]:
    """`dpnb run` under torchrun, its notebooks executed in-process (as a kernel would, minus the kernel)."""
    calls: list[tuple[str, bool]] = []

    def execute_here(stage: str, run_dir: Path, config_dict: dict[str, Any], force: bool, log_output: bool) -> None:
        calls.append((stage, force))
        spec = registry.stage(stage)
        module = __import__(f"dpnb.stages.{stage}", fromlist=["run_stage"])
        module.run_stage(RunDir(run_dir), build(spec.config_class, config_dict), force=force)

    pipeline.execute_stage = execute_here
    first = pipeline.run_pipeline(str(out / "tiny.yaml"), {})
    first_calls = list(calls)
    calls.clear()
    again = pipeline.run_pipeline(str(out / "tiny.yaml"), {})  # all current: the other ranks are told at once
    return {"first": str(first) if first else None, "first_calls": first_calls,
            "again": str(again) if again else None, "again_calls": list(calls)}


def faults_task(out: Path) -> dict[str, str]:
    """What each rank raised when rank 1 holds other records, when rank 1 plans another sigma, and when rank 0
    fails writing the outputs while rank 1 waits for them (two steps of train_config each)."""
    cfg, rank = dataclasses.replace(train_config(), max_steps=2), distributed.rank()

    def attempt(name: str, records: Records, run_cfg: FinetuneConfig = cfg) -> str:
        try:
            loop.train("small-llama", as_dataset(records), run_cfg, out / "faults" / name,
                           tokenizer=load_tokenizer("tiny-llama"), base_model=small_lm(), verbose=False)
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            return f"{type(exc).__name__}: {exc}"
        return "finished"

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device (simulated)")

    seen = {"records": attempt("records", small_records(TRAIN_RECORDS, seed=1 + rank)),
            "plan": attempt("plan", small_records(TRAIN_RECORDS), dataclasses.replace(cfg, target_epsilon=8.0 + rank))}
    save_trained = loop.save_trained
    if rank == 0:
        loop.save_trained = full_disk
    try:
        seen["write"] = attempt("write", small_records(TRAIN_RECORDS))
    finally:
        loop.save_trained = save_trained
    return seen


TASKS = {"session": session_task, "train": train_task, "resume": resume_task, "pipeline": pipeline_task,
         "faults": faults_task}


def _rank_main(rank: int, tasks: list[str], port: int, out: str) -> None:
    """One process of the group, set up as torchrun would; rank 0 saves every rank's results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), DPNB_DIST_TIMEOUT_MIN="3")
    torch.set_num_threads(1)
    results = {}
    with distributed.process_group():
        assert distributed.is_distributed() and distributed.rank() == rank
        for task in tasks:
            results[task] = TASKS[task](Path(out))
        gathered = distributed.gather_to_main(results)
    if rank == 0:
        torch.save(gathered, Path(out) / "results.pt")


def spawn(tasks: list[str], out: Path) -> list[dict[str, Any]]:
    """Run `tasks` in WORLD fresh processes; every rank's results, in rank order."""
    (out / "results.pt").unlink(missing_ok=True)
    mp.spawn(_rank_main, args=(tasks, free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """First spawn: the session checks and the two runs (one interrupted); second: the resume and the pipeline."""
    out = tmp_path_factory.mktemp("distributed")
    source = out / "source"
    write_csv(source / "train.csv", toy_reviews(24, seed=1))
    write_csv(source / "test.csv", toy_reviews(8, seed=2))
    (out / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "runs_dir": str(out / "runs"), "model": "tiny-llama", "seed": 0,
        "stages": ["prepare", "finetune"],
        "prepare": {"source": str(source), "max_length": 24},
        "finetune": {"mode": "lora", "lora_r": 2, "lora_targets": ["v_proj"], "target_epsilon": 8, "epochs": 1,
                     "max_steps": 2, "logical_batch_size": 8, "physical_batch_size": 4, "accountant": "rdp",
                     "device": "cpu", "samples_before_after": 0, "deterministic": True}}))
    first = spawn(["session", "train"], out)
    assert [r["train"] for r in first] == [{"whole": "finished", "part": "interrupted"}] * WORLD
    second = spawn(["resume", "pipeline", "faults"], out)
    return {"out": out, "ranks": [{**a, **b} for a, b in zip(first, second, strict=True)]}


# =========================================================================== the tests


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    g = torch.cat([got[k].double().reshape(-1) for k in want])
    w = torch.cat([want[k].double().reshape(-1) for k in want])
    return float((g - w).norm() / w.norm())


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
@pytest.mark.parametrize("case", list(SESSION_CASES))
def test_two_processes_without_noise_give_the_single_process_update(case, runs):
    ranks = [r["session"][case] for r in runs["ranks"]]
    single = session_steps(case, 0.0, 2)
    for rank in ranks:
        assert len(rank["grads"]) == len(single["grads"]) == 2
        for got, want in zip(rank["grads"], single["grads"], strict=True):
            assert got.keys() == want.keys()
            assert relative_error(got, want) <= REL_TOL
        assert relative_error(rank["weights"], single["weights"]) <= REL_TOL
        # the logged loss is the mean over both ranks' records: all 6 at q = 1
        assert [n for _, n in rank["results"]] == [6, 6]
        assert [loss for loss, _ in rank["results"]] == pytest.approx([loss for loss, _ in single["results"]],
                                                                       rel=1e-6)
        assert rank["history"] == single["history"] == [(0.0, 1.0, 2)]
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in ranks[0]["weights"])
    # each rank divides by half the public divisor E = int(N q) = 6; the sum over ranks then by E
    assert [r["divisor"] for r in ranks] == [3.0, 3.0] and single["divisor"] == 6


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
def test_noise_is_added_once_per_logical_step(runs):
    ranks = [r["session"]["noise"] for r in runs["ranks"]]
    assert [r["noise_draws"] for r in ranks] == [1, 0]  # one step: one draw, on rank 0
    noisy = ranks[0]["grads"][0]
    assert all(torch.equal(noisy[k], ranks[1]["grads"][0][k]) for k in noisy)  # every rank gets the same update
    clean = session_steps("full", 0.0, 1)["grads"][0]
    noise = torch.cat([(noisy[k] - clean[k]).double().reshape(-1) for k in clean])
    std = SIGMA * 1.0 / 6  # sigma C / E
    ratio = float(noise.var()) / std**2
    bound = 6 * math.sqrt(2 / noise.numel())  # the sample variance's relative standard error, times 6
    assert noise.numel() > 50_000 and abs(ratio - 1) < bound, (ratio, bound)  # two draws would give ratio 2
    assert abs(float(noise.mean())) < 6 * std / math.sqrt(noise.numel())


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
def test_the_distributed_sampler_keeps_every_rank_at_every_step(runs):
    samplers = [r["session"]["sampler"] for r in runs["ranks"]]
    assert all(s["count"] == 40 for s in samplers)  # 40 logical batches each, whatever was drawn
    assert all(s["empty"] > 0 for s in samplers)  # at q = 0.05 of 5 records most batches are empty
    drawn = [set(s["drawn"]) for s in samplers]
    assert not drawn[0] & drawn[1] and drawn[0] | drawn[1] <= set(range(10))  # disjoint shares


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
def test_epsilon_is_the_single_process_epsilon(runs, tmp_path):
    whole = RunDir(runs["out"] / "whole")
    distributed_record = read_json(whole.privacy)
    single = RunDir(tmp_path / "single")
    single_record = loop.train("small-llama", as_dataset(small_records(TRAIN_RECORDS)), train_config(), single,
                                   tokenizer=load_tokenizer("tiny-llama"), base_model=small_lm(), verbose=False)
    ignored = {"versions"}
    assert {k: v for k, v in distributed_record.items() if k not in ignored} == \
        {k: v for k, v in single_record.items() if k not in ignored}
    assert distributed_record["steps"] == 8 and distributed_record["sample_rate"] == 1 / 6
    guarantee.verify_privacy(distributed_record)
    log, single_log = read_jsonl(whole.train_log), read_jsonl(single.train_log)
    assert [r["step"] for r in log] == list(range(9))  # one line per step: only rank 0 writes
    assert [r["epsilon"] for r in log] == [r["epsilon"] for r in single_log]


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
def test_a_resumed_distributed_run_continues_exactly(runs):
    assert [r["resume"] for r in runs["ranks"]] == [{"part": "finished"}] * WORLD
    whole, part = RunDir(runs["out"] / "whole"), RunDir(runs["out"] / "part")
    w_whole = load_file(whole.model / "adapter_model.safetensors")
    w_part = load_file(part.model / "adapter_model.safetensors")
    assert w_whole.keys() == w_part.keys()
    assert all(torch.equal(w_whole[k], w_part[k]) for k in w_whole)
    drop_wall = [{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(whole.train_log)]
    assert drop_wall == [{k: v for k, v in r.items() if k != "wall_s"} for r in read_jsonl(part.train_log)]
    assert read_json(whole.privacy) == read_json(part.privacy)
    assert not part.checkpoint.exists()


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
def test_the_pipeline_trains_on_every_rank_and_runs_the_rest_on_rank_0(runs):
    rank0, rank1 = (r["pipeline"] for r in runs["ranks"])
    run_dir = runs["out"] / "runs" / "tiny"
    # rank 0 executed the notebooks: prepare, then finetune only to show it (force False: already trained)
    assert rank0["first_calls"] == [("prepare", False), ("finetune", False)]
    assert rank1["first_calls"] == [] and Path(rank1["first"]) == run_dir.resolve()
    run = RunDir(run_dir)
    assert run.is_complete("finetune")
    record = read_json(run.privacy)
    assert record["steps"] == 2 and len(read_jsonl(run.train_log)) == 3
    # rerun: every stage current; the other ranks are released at once with nothing to do
    assert rank0["again_calls"] == [] and rank1["again"] is None and Path(rank0["again"]) == run_dir


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
def test_ranks_that_disagree_fail_together_naming_what_differs(runs):
    """Checked right after planning, before any model loads: every rank raises the same one-line message."""
    records, plan = ([r["faults"][case] for r in runs["ranks"]] for case in ("records", "plan"))
    assert records[0] == records[1] and plan[0] == plan[1]  # one message, on every rank at once
    assert records[0].startswith("DpnbError: the prepared records and the plan differ between ranks: prepared "
                                 "records (rank 1: not rank 0's); every rank must read the same prepared run")
    assert "sigma" not in records[0] and "\n" not in records[0]
    differing = plan[0].split(" differ between ranks: ", 1)[1].split("; every rank")[0]
    assert differing.startswith("sigma (rank 0: ") and "prepared records" not in differing  # only sigma differs
    assert not (runs["out"] / "faults" / "records" / "train_log.jsonl").exists()  # nothing ran


@pytest.mark.slow  # shares the two spawns of the `runs` fixture (about 1.5 minutes)
def test_rank_0_failing_while_the_others_wait_stops_every_rank_at_once(runs):
    """Rank 0 fails writing the model (a full disk) while rank 1 waits for the outputs: rank 1 stops at once
    with one message naming rank 0's failure (it would otherwise wait for the timeout), rank 0 with its own."""
    rank0, rank1 = (r["faults"]["write"] for r in runs["ranks"])
    assert rank0 == "OSError: No space left on device (simulated)"
    assert rank1 == ("DpnbError: rank 0 of 2 failed while writing the model and privacy.json: OSError: No space "
                     "left on device (simulated); rank 1 of 2 stops too")


def test_a_checkpoint_of_another_process_count_is_refused():
    states = {"rng": {"sampler": None}, "rank_rngs": [{"r": 0}, {"r": 1}]}
    from dpnb.training.checkpoints import this_rank_rng_states

    with pytest.raises(DpnbError, match="nproc_per_node=2"):
        this_rank_rng_states(states)  # this process is one rank of one
    assert this_rank_rng_states({"rng": {"r": 0}}) == {"r": 0}


def test_one_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched_by_torchrun() and not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.sum_across_ranks(1.5, 2.0) == (1.5, 2.0) and distributed.rank_device("cuda") == "cuda"
    with distributed.process_group():
        assert not distributed.is_distributed()
