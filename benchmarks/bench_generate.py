"""Tokens per second of label-prompted sampling: Hugging Face generate against dpnb.decoding, side by side.

Both paths sample the same thing at the demo's settings (SmolLM2-135M-Instruct, the chat prompt of
one label, top_p 0.95, temperature 1, up to 48 new tokens, 80 rows at a time, stop at EOS or end of
turn): `hf` is the generate stage's `sample_batch` (one `model.generate` call per batch), `fast` is
`dpnb.decoding.sample_continuations`. Rows may stop early, so the figure counts the tokens each path
actually produced (a sample's kept tokens plus its stop token) over its wall time (the CPU time is
printed too). Runs of the two paths alternate, so a change in the machine's load touches both.
A figure, not a test: run it on an idle machine, e.g. `python benchmarks/bench_generate.py
--threads 2`; `--quick` finishes in a few minutes, `--json` ends with one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _imports() -> dict[str, Any]:
    """The sampling helpers, wherever the package keeps them (dpnb.generate is being split up)."""
    try:
        from dpnb.sampling import generation_config, sample_batch, stop_token_ids
    except ImportError:
        from dpnb.generate import generation_config, sample_batch, stop_token_ids
    try:
        from dpnb.prompts import PromptFormat
    except ImportError:
        from dpnb.data import PromptFormat
    return {"generation_config": generation_config, "sample_batch": sample_batch,
            "stop_token_ids": stop_token_ids, "PromptFormat": PromptFormat}


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--label", default="positive")
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per run (default: one batch, as the demo's shards of 80)")
    parser.add_argument("--runs", type=int, default=None, help="runs of each path (default 3, --quick 1)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="one run of each path (a few minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    n = args.samples or args.batch_size

    import torch

    from dpnb.config import GenerateConfig
    from dpnb.decoding import sample_continuations
    from dpnb.models import load_causal_lm, load_tokenizer

    helpers = _imports()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype="float32").eval()
    prompt = helpers["PromptFormat"](style="chat").prompt_ids(args.label, tokenizer)
    stops = helpers["stop_token_ids"](tokenizer, model, chat=True)
    cfg = GenerateConfig(max_new_tokens=args.new_tokens, top_p=args.top_p, batch_size=args.batch_size,
                         dtype="float32", device="cpu")
    gen_config = helpers["generation_config"](cfg, stops, tokenizer.pad_token_id)
    info = machine_info()
    print(f"model {args.model}, {info['cores']} cores, torch threads {info['torch_threads']}, "
          f"load average {info['load_average'][0]:.1f}; prompt {len(prompt)} tokens, up to {args.new_tokens} "
          f"new tokens, top_p {args.top_p}, {n} samples per run in batches of {args.batch_size}, {runs} run(s)")

    def hf(seed: int, count: int, config: Any) -> list[tuple[list[int], bool]]:
        torch.manual_seed(seed)
        rows: list[tuple[list[int], bool]] = []
        for start in range(0, count, args.batch_size):
            rows += helpers["sample_batch"](model, prompt, min(args.batch_size, count - start), config, stops)
        return rows

    def fast(seed: int, count: int, new_tokens: int) -> list[tuple[list[int], bool]]:
        return sample_continuations(model, prompt, count, max_new_tokens=new_tokens, stop_ids=stops,
                                    top_p=args.top_p, batch_size=args.batch_size,
                                    generator=torch.Generator().manual_seed(seed))

    warm = helpers["generation_config"](GenerateConfig(max_new_tokens=4, top_p=args.top_p), stops,
                                        tokenizer.pad_token_id)
    hf(0, 8, warm)
    fast(0, 8, 4)

    fields = ("tokens", "seconds", "cpu_seconds", "samples", "stopped")
    totals = {path: dict.fromkeys(fields, 0.0) for path in ("hf", "fast")}
    print(f"{'path':>5} {'run':>3} {'samples':>7} {'stopped':>7} {'tokens':>6} {'seconds':>8} {'cpu s':>8} "
          f"{'tokens/s':>8}")
    for run in range(runs):
        for path in ("hf", "fast"):
            started, cpu_started = time.perf_counter(), time.process_time()
            rows = hf(run, n, gen_config) if path == "hf" else fast(run, n, args.new_tokens)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
            tokens = sum(len(ids) + stopped for ids, stopped in rows)
            stopped = sum(stopped for _, stopped in rows)
            for field, value in zip(fields, (tokens, seconds, cpu, len(rows), stopped), strict=True):
                totals[path][field] += value
            print(f"{path:>5} {run:>3} {len(rows):>7} {stopped:>7} {tokens:>6} {seconds:>8.2f} {cpu:>8.2f} "
                  f"{tokens / seconds:>8.1f}", flush=True)
    rate = {path: t["tokens"] / t["seconds"] for path, t in totals.items()}
    speedup = rate["fast"] / rate["hf"]
    print(f"hf {rate['hf']:.1f} tokens/s, fast {rate['fast']:.1f} tokens/s, speedup {speedup:.2f}x "
          f"(load average {os.getloadavg()[0]:.1f} at the end)")
    if args.json:
        result = {
            "hf_tokens_per_s": round(rate["hf"], 2),
            "fast_tokens_per_s": round(rate["fast"], 2),
            "speedup": round(speedup, 3),
            "hf": {k: round(v, 3) for k, v in totals["hf"].items()},
            "fast": {k: round(v, 3) for k, v in totals["fast"].items()},
            "settings": {"model": args.model, "label": args.label, "prompt_tokens": len(prompt),
                         "max_new_tokens": args.new_tokens, "top_p": args.top_p, "temperature": 1.0,
                         "batch_size": args.batch_size, "samples_per_run": n, "runs": runs, "stop_ids": stops},
            "machine": {**info, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
