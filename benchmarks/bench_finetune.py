"""Seconds per physical step and peak memory of DP fine-tuning (dpnb.dpsgd) on this machine.

    .venv/bin/python benchmarks/bench_dpsgd.py                       # the default grid, CPU
    .venv/bin/python benchmarks/bench_dpsgd.py --cases smollm2-135m:lora:hooks:float32 --steps 5
    .venv/bin/python benchmarks/bench_dpsgd.py --batch 8 --tokens 128 --full-batch 2

A case is MODEL:MODE:GRAD:DTYPE with MODEL a generator preset or `gpt2-small` (a GPT-2 of the
paper's smallest size, 124M parameters, random weights over GPT-2's vocabulary: same cost as the real
one, no download), MODE full or lora, GRAD hooks, ghost or nodp (no DP: no per-sample gradients,
clipping or noise), DTYPE float32 or bfloat16.

Each case runs in its own process (so its peak RSS is its own), on random token ids of exactly
--tokens tokens, through the same objects `train()` uses (`build_model`, `make_session`, the
per-record loss). One physical step = forward + backward + the optimizer step (under DP: clip,
noise, AdamW; every physical batch is a whole logical batch here, so every step adds noise: an upper
bound on the per-physical-batch cost inside a larger logical batch). The first step is a warm-up and
not timed. Wall seconds and CPU seconds (all threads) per step are both printed: on a shared
machine the CPU figure is the steadier one.
Full fine-tuning uses --full-batch records (per-sample gradients of every weight: 4 bytes x batch x
parameters). Prints figures; asserts nothing.

bfloat16 cases are not in the default grid: on a CPU without bf16 instructions (AVX2 only, like the
2-core development machine) a bf16 matmul is emulated and ~28x slower than float32; add e.g.
`smollm2-135m:lora:hooks:bfloat16` to --cases on a CPU with AVX512-BF16/AMX or on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CASES = (
    "smollm2-135m:lora:nodp:float32",
    "smollm2-135m:lora:hooks:float32",
    "smollm2-135m:lora:ghost:float32",
    "smollm2-135m:full:nodp:float32",
    "smollm2-135m:full:hooks:float32",
    "smollm2-135m:full:ghost:float32",
    "gpt2-small:full:nodp:float32",
    "gpt2-small:full:hooks:float32",
    "gpt2-small:full:ghost:float32",
    "gpt2-small:lora:hooks:float32",
)


def gpt2_small(dtype: str):
    """GPT-2 124M (the paper's smallest) with random weights: the architecture's cost without a download."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from dpnb.models import torch_dtype

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config()).to(torch_dtype(dtype))


def run_case(case: str, batch: int, tokens: int, steps: int, threads: int | None) -> dict:
    """Time `steps` physical steps of one case (after a warm-up) in this process."""
    import datasets
    import torch

    from dpnb import dpsgd, privacy
    from dpnb.config import FinetuneConfig
    from dpnb.models import build_model, quiet_transformers

    if threads:
        torch.set_num_threads(threads)
    model_name, mode, grad, dtype = case.split(":")
    dp = grad != "nodp"
    targets = ("c_attn",) if model_name.startswith("gpt2") else ("q_proj", "v_proj")
    cfg = FinetuneConfig(mode=mode, dp=dp, grad_sample_mode=grad if dp else "hooks", dtype=dtype, device="cpu",
                         logical_batch_size=batch, physical_batch_size=batch, max_grad_norm=1e-2, lr=1e-4,
                         lora_r=8, lora_targets=targets, max_steps=steps + 1)
    base = gpt2_small(dtype) if model_name == "gpt2-small" else None
    model, notes = build_model(model_name, cfg, "cpu", base_model=base)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    n = batch * (steps + 1)
    ids = torch.randint(0, vocab, (n, tokens), generator=generator).tolist()
    records = dpsgd.Records.from_dataset(datasets.Dataset.from_dict({"input_ids": ids}))
    plan = dpsgd.plan_training(dataclasses.replace(cfg, dp=False), n)
    if dp:  # one noise multiplier is as costly as another: skip the calibration
        plan = dataclasses.replace(plan, dp=True, noise_multiplier=1.0, delta=privacy.default_delta(n))
    session = dpsgd.make_session(model, cfg, plan, "cpu")
    times, cpu_times = [], []
    with quiet_transformers():
        for step in range(steps + 1):
            indices = list(range(step * batch, (step + 1) * batch))
            batch_tensors = dpsgd.collate(records, indices, pad_id=0)
            started, cpu_started = time.perf_counter(), time.process_time()
            if dp:
                _, to_backward = dpsgd.forward_losses(session, batch_tensors)
                to_backward.backward()
                session.optimizer.pre_step()
                session.adamw.step()
                session.optimizer.zero_grad(set_to_none=True)
            else:
                next(dpsgd.plain_logical_steps(session, iter([torch.tensor(indices)]), records, cfg, 0, "cpu"))
            if step:
                times.append(time.perf_counter() - started)
                cpu_times.append(time.process_time() - cpu_started)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "case": case, "batch": batch, "tokens": tokens, "s_per_step": sum(times) / len(times),
        "cpu_s_per_step": sum(cpu_times) / len(cpu_times),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable": sum(p.numel() for p in trainable), "trainable_dtype": str(trainable[0].dtype),
        "threads": torch.get_num_threads(), "notes": notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated MODEL:MODE:GRAD:DTYPE")
    parser.add_argument("--batch", type=int, default=8, help="records per physical batch (LoRA)")
    parser.add_argument("--full-batch", type=int, default=2,
                        help="records per physical batch for full fine-tuning (hooks at 8 x 128 tokens needs "
                             "~15 GB for SmolLM2)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed physical steps per case, after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one case in this process and print JSON
    args = parser.parse_args()

    if args.one:
        batch = args.full_batch if ":full:" in args.one else args.batch
        print(json.dumps(run_case(args.one, batch, args.tokens, args.steps, args.threads)))
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.tokens} tokens per record, "
          f"{args.steps} timed physical steps per case")
    print(f"{'case':36} {'batch':>5} {'s/step':>7} {'cpu s':>7} {'peak RSS':>9} {'trainable':>12} {'dtype':>14}")
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--one", case, "--batch", str(args.batch), "--full-batch",
                   str(args.full_batch), "--tokens", str(args.tokens), "--steps", str(args.steps)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{case:36} failed: {reason[:150]}")
            continue
        r = json.loads(lines[-1])
        print(f"{case:36} {r['batch']:>5} {r['s_per_step']:>7.2f} {r['cpu_s_per_step']:>7.2f} "
              f"{r['peak_rss_gb']:>7.2f}GB {r['trainable']:>12,} {r['trainable_dtype'].replace('torch.', ''):>14}"
              + (f"  ({'; '.join(r['notes'])})" if r["notes"] else ""), flush=True)


if __name__ == "__main__":
    main()
