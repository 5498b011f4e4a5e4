"""Seconds per DP physical step: the full model vs the frozen-prefix cache with the chunked head loss.

    .venv/bin/python benchmarks/bench_finetune_paths.py                  # the demo's shapes, 2 threads
    .venv/bin/python benchmarks/bench_finetune_paths.py --steps 5 --tops 10 4 --batch 8 --tokens 96

At the demo's shapes: the real SmolLM2-135M (dpnb.models.load_causal_lm), float32, LoRA r=2 on
v_proj of the top K blocks only (peft `layers_to_transform`, as `lora_top_layers`), 8 records of
--tokens tokens, each starting with the demo's chat prompt (its tokens are not in the loss),
torch threads --threads. One physical step = forward + backward with Opacus's GradSampleModule
hooks, then DPOptimizer's clip + noise + AdamW step. Cases, for each K in --tops:

- full:        the whole model, HF logits + per_record_loss (what dpnb.dpsgd runs today);
- full+head:   the whole model's last hidden states + dpnb.head_loss (the head alone);
- cached:      dpnb.prefix_cache.TopBlocks over cached states + dpnb.head_loss.

The first step is a warm-up; wall and CPU seconds (all threads) per step are the mean over
--steps. On a shared machine the numbers are indicative only. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def demo_records(tokenizer, batch: int, tokens: int, seed: int = 0):
    import torch

    from dpnb.dpsgd import Records
    from dpnb.prompts import PromptFormat

    prompt = PromptFormat(style="chat").prompt_ids("positive", tokenizer)
    g = torch.Generator().manual_seed(seed)
    reviews = torch.randint(100, len(tokenizer) - 100, (batch, tokens - len(prompt)), generator=g).tolist()
    return Records([prompt + row for row in reviews], [len(prompt)] * batch)


def lora_top(top: int):
    from peft import LoraConfig, get_peft_model

    from dpnb.models import load_causal_lm

    base = load_causal_lm("smollm2-135m", dtype="float32")
    depth = base.config.num_hidden_layers
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["v_proj"],
                        layers_to_transform=list(range(depth - top, depth)), task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.train()
    return model


def time_case(name: str, top: int, records, steps: int) -> dict:
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from dpnb.dpsgd import collate, per_record_loss
    from dpnb.head_loss import FrozenHeadLoss
    from dpnb.prefix_cache import TopBlocks, build_prefix_cache, collate_cached, model_parts

    torch.manual_seed(0)
    model = lora_top(top)
    indices = list(range(len(records)))
    head = FrozenHeadLoss.of_model(model)
    build_s = None
    if name == "cached":
        started = time.perf_counter()
        cache = build_prefix_cache(model, records, batch_size=len(records))
        build_s = time.perf_counter() - started
        module = TopBlocks(model)
        batch = collate_cached(cache, records, indices)
    else:
        module = model if name == "full" else model_parts(model).body
        batch = collate(records, indices, pad_id=0)
    gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    gsm.train()
    params = [p for p in gsm.parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=1.0, max_grad_norm=1e-2,
                            expected_batch_size=len(records), loss_reduction="mean")

    def step() -> float:
        out = gsm(**batch.model_inputs())
        if name == "full":
            losses = per_record_loss(out.logits[:, :-1], batch.targets, batch.target_mask)
        else:
            final = out if name == "cached" else out.last_hidden_state
            losses = head(final[:, :-1], batch.targets, batch.target_mask)
        losses.mean().backward()
        if optimizer.pre_step():
            optimizer.original_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(losses.detach().mean())

    loss = step()  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    result = {"case": f"{name} top-{top}", "wall_s": (time.perf_counter() - wall) / steps,
              "cpu_s": (time.process_time() - cpu) / steps, "loss": loss, "build_s": build_s}
    gsm._close()
    return result


def main() -> None:
    import warnings

    import torch

    from dpnb.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tops", type=int, nargs="+", default=[10, 4])
    parser.add_argument("--cases", nargs="+", default=["full", "full+head", "cached"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(Full backward hook|is_gradient_checkpointing|Secure RNG).*")

    records = demo_records(load_tokenizer("smollm2-135m"), args.batch, args.tokens)
    print(f"SmolLM2-135M float32, LoRA r=2 on v_proj, {args.batch} records x {args.tokens} tokens "
          f"(prompt {records.prompt_lengths[0]} tokens, not in the loss), {args.threads} threads, "
          f"mean of {args.steps} steps after a warm-up")
    for top in args.tops:
        results = [time_case(name, top, records, args.steps) for name in args.cases]
        base = results[0]
        for r in results:
            built = f"  (cache built in {r['build_s']:.2f} s)" if r["build_s"] is not None else ""
            print(f"{r['case']:18s} {r['wall_s']:6.2f} s/step wall ({base['wall_s'] / r['wall_s']:4.2f}x)  "
                  f"{r['cpu_s']:6.2f} s/step CPU ({base['cpu_s'] / r['cpu_s']:4.2f}x)  loss {r['loss']:.4f}{built}",
                  flush=True)


if __name__ == "__main__":
    main()
