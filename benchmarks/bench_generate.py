"""Tokens per second of batched sampling (dpnb.generate.sample_batch) from SmolLM2-135M on this machine.

Prints one line per (dtype, batch size): every row is made to produce exactly `--new-tokens` tokens
(min_new_tokens = max_new_tokens), so the figures compare equal work. A figure, not a test: run it
on an idle machine, e.g. `python benchmarks/bench_generate.py --threads 2`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from dpnb.config import GenerateConfig
    from dpnb.data import PromptFormat
    from dpnb.generate import generation_config, sample_batch, stop_token_ids
    from dpnb.models import load_causal_lm, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    prompt = PromptFormat(style="chat").prompt_ids("positive", tokenizer)
    print(f"model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens per row")
    print(f"{'dtype':>9} {'batch':>5} {'seconds':>8} {'tokens/s':>9} {'ms/step':>8}")
    for dtype in args.dtypes.split(","):
        model = load_causal_lm(args.model, dtype=dtype).to(args.device).eval()
        stops = stop_token_ids(tokenizer, model, chat=True)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            cfg = GenerateConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 batch_size=batch_size, dtype=dtype, device=args.device)
            gen_config = generation_config(cfg, stops, tokenizer.pad_token_id)
            torch.manual_seed(0)
            sample_batch(model, prompt, batch_size, generation_config(
                GenerateConfig(max_new_tokens=4, min_new_tokens=4), stops, tokenizer.pad_token_id), stops)  # warm-up
            started = time.perf_counter()
            rows = sample_batch(model, prompt, batch_size, gen_config, stops)
            seconds = time.perf_counter() - started
            tokens = sum(len(ids) + stopped for ids, stopped in rows)
            print(f"{dtype:>9} {batch_size:>5} {seconds:>8.2f} {tokens / seconds:>9.1f} "
                  f"{1000 * seconds / args.new_tokens:>8.1f}")
        del model


if __name__ == "__main__":
    main()
