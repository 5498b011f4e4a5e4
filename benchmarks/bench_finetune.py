"""Seconds per logical step and peak RSS of fine-tuning (dpnb.training.dpsgd): no DP, DP hooks, DP ghost, the
prefix cache, float32 against bf16.

    .venv/bin/python benchmarks/bench_finetune.py --quick --json      # ~4-5 min on an idle 2-core CPU
    .venv/bin/python benchmarks/bench_finetune.py --quick --only precision   # float32 vs bf16 alone: < 1 min
    .venv/bin/python benchmarks/bench_finetune.py                     # the demo's logical batch (64 = 8 x 8)
    .venv/bin/python benchmarks/bench_finetune.py --model tiny-llama --tops 1 1 --logical 4 --physical 2

The settings are the demo's (notebooks/02_finetune, runs/demo): SmolLM2-135M in float32
(`finetune.precision: fp32`), LoRA r=2 (alpha 4) on v_proj of the top K blocks (`lora_top_layers`;
the float32/bf16 pair: r=8, alpha 16, on q_proj and v_proj), physical batches of 8, records of at
most 96 tokens built as the prepare stage builds them (the chat prompt of the record's label, its
~36 tokens not in the loss, then the review and EOS) from real IMDb reviews ($DPNB_DATA_DIR/train.csv.gz,
default ../shared/data/imdb, shuffled with a fixed seed; `--data random` uses random token ids
instead), C = 0.5, lr 0.01, torch threads = the CPUs this process may use.

Each case runs in its own process (so its peak RSS is its own) through the objects `train()` runs:
`build_model`, `compute_precision`, `frozen_prefix` (the cache, built for every record of the case and
timed after an untimed build over one physical batch: the one-off cost per record), `make_session`, and
`epoch_steps`, which under DP cuts each logical batch into physical ones
with Opacus's BatchMemoryManager and `dp_logical_steps` (clip, accumulate, one noise addition and
AdamW step per logical batch), and without DP runs `plain_logical_steps`. One difference from
training: the logical batches are FIXED, not Poisson-sampled: each timed step takes the next L
records (L = the logical batch), so that every case does exactly the same work. The noise
multiplier is set to 1 instead of calibrated (one sigma costs what another does). Timed: whole
logical steps (every physical batch's forward and backward, the clipping, the noise and the
update), after --warmup untimed steps of one physical batch each (they pay the first-call costs).
The cache is built for every record of the case (warm-up and timed ones), as train() builds it for
the whole training set. Wall and CPU seconds (all threads) are both reported; on a
shared machine the CPU figure is the steadier one, and all numbers are indicative.

Cases (K1, K2 = --tops, default 10 and 4):
    nodp            top K1, no cache    no DP (plain gradient of the mean loss)
    hooks           top K1, no cache    DP with Opacus hooks over the whole model: today's DP path
    ghost           top K1, no cache    DP with ghost clipping (the cache does not apply to it)
    nodp+cache      top K1, cache       no DP over the top blocks
    hooks+cache     top K1, cache       DP hooks over the top blocks (the default now)
    hooks           top K2, no cache
    nodp+cache      top K2, cache
    hooks+cache     top K2, cache

    hooks+cache     top K2, cache, LoRA r=8 on q_proj,v_proj, float32 (`finetune.precision: fp32`)
    hooks+cache     top K2, cache, LoRA r=8 on q_proj,v_proj, bf16 (`bf16-mixed`: the Precision that
                    `precision: auto` picks where a bf16 matmul is measured >= 2x float32: the cache built
                    by a bf16 copy of the frozen blocks, the frozen head's loss from a bf16 head, the top
                    blocks under bf16 autocast over float32 weights; per-record gradients, norms,
                    clipping, noise and AdamW in float32). Its child process is told the parent's
                    measured ratio through $DPNB_BF16_SPEEDUP, so it does not measure again. Skipped
                    where bf16 is slower than float32 (emulated: minutes per step) unless named in --only.

Ratios (of wall seconds per logical step):
    speedup_cache       = hooks top K1 / hooks+cache top K1   (today's DP path at the demo's settings)
    speedup_cache_top4  = hooks top K2 / hooks+cache top K2   (the issue's >= 2.5x target with 4 blocks)
    dp_overhead         = hooks+cache top K1 / nodp+cache top K1
    dp_overhead_top4    = hooks+cache top K2 / nodp+cache top K2
    speedup_bf16_dp_step     = float32 / bf16 of the pair above (the issue's >= 2x target)
    speedup_bf16_cache_build = float32 / bf16 seconds to build the pair's cache (same records), as the stage
                               pays them; speedup_bf16_cache_build_net: net of the one-off bf16 copy of the
                               frozen blocks (timed apart: frozen_copy_s), the ratio per record at scale
beside bf16_matmul_speedup, the plain matmul ratio `dpnb.precision` measures (benchmarks/machine.py).
--json prints one JSON object last (with these keys, every case, the settings and the machine).
--only takes case keys, or `precision` for the float32/bf16 pair alone.
--quick: logical batches of 16 records (2 physical batches of 8) instead of 64, 1 warm-up step
(8 records) and 2 timed logical steps per case. Asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from machine import describe, machine_facts  # benchmarks/machine.py, this script's directory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMDB = Path(os.environ.get("DPNB_DATA_DIR", ROOT.parent / "shared" / "data" / "imdb")) / "train.csv.gz"
QUIET = ".*(Full backward hook|is_gradient_checkpointing|Secure RNG|gemm_4bit|Optimal order|sample_rate).*"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # nodp, hooks, ghost
    cache: bool
    top: int
    precision: str = "fp32"  # finetune.precision: fp32, or bf16-mixed (what auto picks where bf16 is fast)
    lora_r: int = 2
    lora_targets: tuple[str, ...] = ("v_proj",)

    @property
    def variant(self) -> str:
        """'' for the float32 r=2 v_proj cases, else e.g. ' r8 qv bf16'."""
        if (self.precision, self.lora_r, tuple(self.lora_targets)) == ("fp32", 2, ("v_proj",)):
            return ""
        targets = "".join(t[0] for t in self.lora_targets)
        return f" r{self.lora_r} {targets} {'bf16' if self.precision == 'bf16-mixed' else 'fp32'}"

    @property
    def label(self) -> str:
        return f"{self.name}{'+cache' if self.cache else ''} top{self.top}{self.variant}"

    @property
    def key(self) -> str:
        return f"{self.name}{'_cache' if self.cache else ''}_top{self.top}{self.variant.replace(' ', '_')}"


def precision_pair(top: int) -> list[Case]:
    """One DP step on the demo's path in float32 and in bf16, as the finetune stage runs each."""
    return [Case("hooks", True, top, precision, 8, ("q_proj", "v_proj")) for precision in ("fp32", "bf16-mixed")]


def cases(tops: tuple[int, int]) -> list[Case]:
    k1, k2 = tops
    return [Case("nodp", False, k1), Case("hooks", False, k1), Case("ghost", False, k1), Case("nodp", True, k1),
            Case("hooks", True, k1), Case("hooks", False, k2), Case("nodp", True, k2), Case("hooks", True, k2),
            *precision_pair(k2)]


# =========================================================================== records


def build_records(model: str, n: int, tokens: int, data: str, seed: int = 0) -> dict:
    """n records of at most `tokens` ids as the prepare stage makes them: chat prompt + review + EOS."""
    import numpy as np

    from dpnb.data.prompts import PromptFormat
    from dpnb.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    fmt, names = PromptFormat(style="chat"), ("negative", "positive")
    rng = np.random.default_rng(seed)
    if data == "imdb":
        import pandas as pd

        from dpnb.data.sources import clean_texts

        table = pd.read_csv(IMDB)
        rows = table.iloc[rng.permutation(len(table))[:n]]
        labels = [names[int(v)] for v in rows["label"]]
        ids, _ = fmt.encode_batch(labels, list(clean_texts(rows["text"], strip_html=True)), tokenizer, tokens)
    else:
        labels = [names[i % 2] for i in range(n)]
        ids = []
        for label in labels:
            prompt = fmt.prompt_ids(label, tokenizer)
            review = rng.integers(100, len(tokenizer) - 100, tokens - len(prompt) - 1).tolist()
            ids.append(prompt + review + [tokenizer.eos_token_id])
    prompts = [len(fmt.prompt_ids(label, tokenizer)) for label in labels]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"input_ids": ids, "prompt_lengths": prompts, "pad_id": pad_id}


class FixedBatches:
    """A batch sampler yielding fixed logical batches (`steps` of them, set by `epoch_steps`)."""

    def __init__(self, batches: list[list[int]]):
        self.batches, self.steps = batches, len(batches)

    def __iter__(self):
        yield from self.batches[: self.steps]

    def __len__(self) -> int:
        return self.steps


# =========================================================================== one case, in its own process


def run_case(case: Case, spec: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from dpnb.config import FinetuneConfig
    from dpnb.models import quiet_transformers
    from dpnb.privacy import accounting
    from dpnb.training import dpsgd
    from dpnb.training.frozen_prefix import frozen_copy, frozen_prefix
    from dpnb.training.loss import Records
    from dpnb.training.plan import plan_training
    from dpnb.training.trainable import build_model, trainable_parameters

    warnings.filterwarnings("ignore", message=QUIET)
    torch.set_num_threads(spec["threads"])
    data = json.loads(Path(spec["records"]).read_text())
    records = Records(data["input_ids"], data["prompt_lengths"])
    logical, physical, warmup, steps = spec["logical"], spec["physical"], spec["warmup"], spec["warmup"] + spec["steps"]
    sizes = [min(physical, logical)] * warmup + [logical] * spec["steps"]  # a warm-up step: one physical batch
    n = sum(sizes)
    records = Records(records.input_ids[:n], records.prompt_lengths[:n])
    dp = case.name != "nodp"
    cfg = FinetuneConfig(mode="lora", dp=dp, grad_sample_mode="ghost" if case.name == "ghost" else "hooks",
                         lora_r=case.lora_r, lora_alpha=2 * case.lora_r, lora_dropout=0.0,
                         lora_targets=tuple(case.lora_targets), lora_top_layers=case.top, prefix_cache=case.cache,
                         logical_batch_size=logical, physical_batch_size=physical, max_grad_norm=0.5, lr=0.01,
                         dtype="float32", precision=case.precision, device="cpu", max_steps=steps, seed=0,
                         deterministic=True)
    plan = plan_training(dataclasses.replace(cfg, dp=False), n)
    if dp:  # one noise multiplier costs what another does: skip the calibration
        plan = dataclasses.replace(plan, dp=True, noise_multiplier=1.0, delta=accounting.default_delta(n))
    torch.manual_seed(cfg.seed)
    with quiet_transformers():
        model, _ = build_model(spec["model"], cfg, "cpu")
    precision = dpsgd.compute_precision(cfg, "cpu")  # as the finetune stage's open_session takes it
    if case.precision == "bf16-mixed" and (precision.dtype, precision.autocast) != (torch.bfloat16, torch.bfloat16):
        raise RuntimeError(f"bf16 was asked for, the precision is {precision.reason}")
    if case.cache:  # untimed: the first build pays for kernel selection, which a whole training set amortises
        frozen_prefix(model, Records(records.input_ids[:physical], records.prompt_lengths[:physical]), cfg,
                      data["pad_id"], "cpu", precision=precision)
    started = time.perf_counter()
    frozen_copy(model, precision)  # timed apart: the bf16 copy of the frozen blocks, a one-off cost per run
    copy_s = time.perf_counter() - started
    started = time.perf_counter()
    prefix, note = frozen_prefix(model, records, cfg, data["pad_id"], "cpu", precision=precision)
    build_s = time.perf_counter() - started
    if case.cache and prefix is None:
        raise RuntimeError(f"the cache was asked for but is off: {note}")
    session = dpsgd.make_session(model, cfg, plan, "cpu", prefix=prefix, precision=precision)
    # fixed logical batches instead of Poisson ones: the same work in every case
    ends = [sum(sizes[: s + 1]) for s in range(steps)]
    batches = [list(range(end - size, end)) for end, size in zip(ends, sizes, strict=True)]
    session.loader = DataLoader(session.loader.dataset, batch_sampler=FixedBatches(batches),
                                collate_fn=session.loader.collate_fn)
    walls, cpus, losses = [], [], []
    with quiet_transformers():
        wall, cpu = time.perf_counter(), time.process_time()
        for result in dpsgd.epoch_steps(session, records, cfg, data["pad_id"], "cpu", steps, False, None):
            now, cpu_now = time.perf_counter(), time.process_time()
            walls.append(now - wall)
            cpus.append(cpu_now - cpu)
            losses.append(result.loss)
            assert result.batch_size == sizes[len(walls) - 1]
            wall, cpu = time.perf_counter(), time.process_time()
    timed = slice(warmup, None)
    return {
        "case": case.label, "key": case.key, "grad": case.name, "cache": case.cache, "top": case.top,
        "s_per_step": sum(walls[timed]) / len(walls[timed]), "cpu_s_per_step": sum(cpus[timed]) / len(cpus[timed]),
        "step_s": walls, "warmup_s": sum(walls[:warmup]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cache_build_s": build_s if prefix is not None else None,
        "frozen_copy_s": copy_s if prefix is not None and precision.dtype != torch.float32 else 0.0,
        "cache_build_ms_per_record": 1000 * build_s / n if prefix is not None else None,
        "cache_mib": prefix.cache.nbytes / 2**20 if prefix is not None else None,
        "records": n, "tokens": sum(len(r) for r in records.input_ids), "trainable": trainable_parameters(model),
        "loss_first": losses[0], "threads": torch.get_num_threads(), "note": note, "precision": precision.record(),
    }


# =========================================================================== the driver


def ratio(results: dict, num: str, den: str, field: str = "s_per_step") -> float | None:
    a, b = results.get(num), results.get(den)
    return a[field] / b[field] if a and b else None


def select_cases(tops: tuple[int, int], only: str | None, facts: dict) -> list[Case]:
    """The cases to run: all, or those --only names (`precision`: the float32/bf16 pair); bf16 cases are
    skipped where bf16 is slower than float32 (emulated) unless named."""
    all_cases = cases(tops)
    wanted = set(only.split(",")) if only else None
    if wanted and "precision" in wanted:
        wanted |= {c.key for c in precision_pair(tops[1])}
    chosen = [c for c in all_cases if wanted is None or c.key in wanted]
    slow = facts["bf16_matmul_speedup"] < 1.0
    skipped = [c for c in chosen if slow and c.precision != "fp32" and not (wanted and c.key in wanted)]
    for case in skipped:
        print(f"{case.label}: skipped, bf16 is slower than float32 here (name {case.key} in --only to run it)")
    return [c for c in chosen if c not in skipped]


def run_in_child(case: Case, spec: dict, env: dict[str, str]) -> dict | str:
    """One case in its own process: its result, or why it failed."""
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps({"case": dataclasses.asdict(case), **spec})],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(lines[-1])


def bf16_summary(results: dict[str, dict], pair: list[Case], facts: dict) -> dict:
    """speedup_bf16_dp_step and speedup_bf16_cache_build of the float32/bf16 pair, printed beside the matmul's."""
    from dpnb.precision import MATMUL_SIZE

    fp32, bf16 = (results.get(c.key) for c in pair)
    summary = {"bf16_matmul_speedup": facts["bf16_matmul_speedup"], "speedup_bf16_dp_step": None,
               "speedup_bf16_dp_step_cpu": None, "speedup_bf16_cache_build": None,
               "speedup_bf16_cache_build_net": None}
    case = pair[0]
    print(f"float32 vs bf16, DP hooks + cache, top {case.top}, LoRA r={case.lora_r} on {','.join(case.lora_targets)} "
          f"(bf16: as the finetune stage runs where precision auto picks bf16):")
    if not (fp32 and bf16):
        print("  n/a: the pair did not both run")
        return summary
    # also net of the one-off bf16 copy of the frozen blocks, which a training set of thousands of records
    # amortises (the copy is timed apart, so on a few records the difference can be noise)
    net = [r["cache_build_s"] - r["frozen_copy_s"] for r in (fp32, bf16)]
    summary.update(speedup_bf16_dp_step=fp32["s_per_step"] / bf16["s_per_step"],
                   speedup_bf16_dp_step_cpu=fp32["cpu_s_per_step"] / bf16["cpu_s_per_step"],
                   speedup_bf16_cache_build=fp32["cache_build_s"] / bf16["cache_build_s"],
                   speedup_bf16_cache_build_net=net[0] / net[1] if min(net) > 0 else None)
    for name, r in (("float32", fp32), ("bf16", bf16)):
        copy = f", of which {r['frozen_copy_s']:.2f} s copying the frozen blocks to bf16" if r["frozen_copy_s"] else ""
        print(f"  {name:8} {r['s_per_step']:6.2f} s/step ({r['cpu_s_per_step']:.2f} cpu s); cache build "
              f"{r['cache_build_s']:.2f} s for {r['records']} records{copy}; first loss {r['loss_first']:.4f}")
    print(f"  {'speedup_bf16_dp_step':28} {summary['speedup_bf16_dp_step']:5.2f}x "
          f"({summary['speedup_bf16_dp_step_cpu']:5.2f}x cpu)   target >= 2x")
    net_ratio = summary["speedup_bf16_cache_build_net"]
    print(f"  {'speedup_bf16_cache_build':28} {summary['speedup_bf16_cache_build']:5.2f}x "
          f"({'n/a' if net_ratio is None else f'{net_ratio:.2f}x'} net of the bf16 copy)")
    print(f"  {'bf16_matmul_speedup':28} {facts['bf16_matmul_speedup']:5.2f}x (dpnb.precision's {MATMUL_SIZE}^3 "
          f"matmul alone; a whole step realises the ratios above)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="logical batches of 16 (2 x 8), 1 warm-up + 2 timed steps per case (< 5 min idle)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--model", default="smollm2-135m", help="generator preset (tiny-llama for a smoke test)")
    parser.add_argument("--tops", type=int, nargs=2, default=(10, 4), metavar=("K1", "K2"),
                        help="LoRA on the top K1 blocks (the demo) and top K2 blocks (also the float32/bf16 pair)")
    parser.add_argument("--logical", type=int, help="records per logical step (default 64; --quick 16)")
    parser.add_argument("--physical", type=int, default=8, help="records per physical batch")
    parser.add_argument("--tokens", type=int, default=96, help="max tokens per record (prepare's max_length)")
    parser.add_argument("--steps", type=int, help="timed logical steps per case (default 3; --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of one physical batch first")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--data", choices=("imdb", "random"), default="imdb" if IMDB.exists() else "random",
                        help="review tokens: real IMDb reviews, or random ids (every record the full length)")
    parser.add_argument("--only", help="comma-separated case keys to run (e.g. hooks_top10,hooks_cache_top10), "
                        "or precision (the float32/bf16 pair)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # JSON spec of one case: run it here, print JSON
    args = parser.parse_args()

    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_case(Case(**spec.pop("case")), spec)))
        return

    from dpnb.precision import SPEEDUP_ENV

    facts = machine_facts(args.threads)
    print(describe(facts), flush=True)
    logical = args.logical or (16 if args.quick else 64)
    steps = args.steps or (2 if args.quick else 3)
    all_cases = select_cases(tuple(args.tops), args.only, facts)
    n = min(args.physical, logical) * args.warmup + logical * steps
    records = build_records(args.model, n, args.tokens, args.data)
    lengths = [len(r) for r in records["input_ids"]]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(records, handle)
    settings = {
        "model": args.model, "dtype": "float32", "lora": "r=2, alpha 4, v_proj", "tops": list(args.tops),
        "lora_precision_pair": "r=8, alpha 16, q_proj,v_proj, top K2, float32 vs bf16-mixed",
        "logical_batch": logical, "physical_batch": args.physical, "sampling": "fixed logical batches (not Poisson)",
        "warmup_steps": args.warmup, "timed_steps": steps, "records_per_case": n, "data": args.data,
        "max_tokens": args.tokens, "mean_tokens": sum(lengths) / len(lengths),
        "prompt_tokens": sorted(set(records["prompt_lengths"])), "threads": args.threads, "quick": args.quick,
    }
    print(f"{args.model} float32, LoRA r=2 on v_proj of the top K blocks (the float32/bf16 pair: r=8 on q_proj,v_proj);"
          f" logical batch {logical} = {-(-logical // args.physical)} physical batches of <= {args.physical}"
          + (" (--quick: smaller than the demo's 64)" if args.quick and logical != 64 else "")
          + f"; FIXED logical batches (not Poisson); {args.data} records of <= {args.tokens} tokens (mean "
          f"{settings['mean_tokens']:.0f}, chat prompt {'/'.join(map(str, settings['prompt_tokens']))} tokens not "
          f"in the loss); {args.warmup} warm-up step(s) of {min(args.physical, logical)} records + {steps} timed "
          f"logical steps per case; numbers are indicative "
          f"on a shared machine", flush=True)
    print(f"{'case':28} {'s/step':>8} {'cpu s':>8} {'s/record':>9} {'peak RSS':>9} {'cache build':>20} "
          f"{'trainable':>10} {'load':>5}")
    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    started_all = time.perf_counter()
    # a bf16 case's child takes the precision as measured here instead of measuring again
    env = {SPEEDUP_ENV: str(facts["bf16_matmul_speedup"]), **os.environ}
    spec = {"model": args.model, "logical": logical, "physical": args.physical, "steps": steps,
            "warmup": args.warmup, "threads": args.threads, "records": handle.name}
    for case in all_cases:
        r = run_in_child(case, spec, env)
        if isinstance(r, str):
            failures[case.key] = r
            print(f"{case.label:28} failed: {r[:150]}", flush=True)
            continue
        r["load_after"] = os.getloadavg()[0]
        results[case.key] = r
        built = (f"{r['cache_build_s']:6.1f} s {r['cache_build_ms_per_record']:5.0f} ms/rec"
                 if r["cache_build_s"] is not None else "-")
        print(f"{r['case']:28} {r['s_per_step']:8.2f} {r['cpu_s_per_step']:8.2f} {r['s_per_step'] / logical:9.3f} "
              f"{r['peak_rss_gb']:7.2f}GB {built:>20} {r['trainable']:>10,} {r['load_after']:5.1f}", flush=True)
    Path(handle.name).unlink(missing_ok=True)

    k1, k2 = args.tops
    pairs = {
        "speedup_cache": (f"hooks_top{k1}", f"hooks_cache_top{k1}"),
        "speedup_cache_top4": (f"hooks_top{k2}", f"hooks_cache_top{k2}"),
        "dp_overhead": (f"hooks_cache_top{k1}", f"nodp_cache_top{k1}"),
        "dp_overhead_top4": (f"hooks_cache_top{k2}", f"nodp_cache_top{k2}"),
        "speedup_cache_top4_vs_today": (f"hooks_top{k1}", f"hooks_cache_top{k2}"),
        "dp_overhead_uncached": (f"hooks_top{k1}", f"nodp_top{k1}"),
        "ghost_over_hooks": (f"ghost_top{k1}", f"hooks_top{k1}"),
    }
    ratios = {name: ratio(results, *pair) for name, pair in pairs.items()}
    ratios_cpu = {name: ratio(results, *pair, field="cpu_s_per_step") for name, pair in pairs.items()}
    print(f"total {time.perf_counter() - started_all:.0f} s for the cases; ratios of wall (CPU) s per logical step:")
    for name, (num, den) in pairs.items():
        wall, cpu = ratios[name], ratios_cpu[name]
        shown = "n/a" if wall is None else f"{wall:5.2f}x ({cpu:5.2f}x)"
        target = "   target >= 2.5x" if name == "speedup_cache_top4" else ""
        print(f"  {name:28} {shown:18} = {num} / {den}{target}")
    pair = precision_pair(k2)
    bf16 = bf16_summary(results, pair, facts)
    definitions = {k: f"{a} / {b}" for k, (a, b) in pairs.items()}
    definitions["speedup_bf16_dp_step"] = f"{pair[0].key} / {pair[1].key} (s per logical step)"
    definitions["speedup_bf16_cache_build"] = f"{pair[0].key} / {pair[1].key} (s to build the cache)"
    if args.json:
        print(json.dumps({**ratios, **bf16, "ratios_cpu": ratios_cpu, "ratio_definitions": definitions,
                          "settings": settings, "machine": facts, "cases": list(results.values()),
                          "failed": failures}))


if __name__ == "__main__":
    main()
