"""Benchmark of the evaluate stage: classifier training speed, sentence embeddings in float32 against bf16,
and the memorisation screen at IMDb size.

    .venv/bin/python benchmarks/bench_evaluate.py                  # default: 25,000 x 25,000 screen
    .venv/bin/python benchmarks/bench_evaluate.py --quick --json   # a few minutes
    .venv/bin/python benchmarks/bench_evaluate.py --n 5000 --steps 2
    .venv/bin/python benchmarks/bench_evaluate.py --skip-classifier --max-tokens 1024

1. Classifier: optimizer steps per second of `minilm-l6` (the offline default classifier) at batch
   16 and 64 x 128 tokens, on real IMDb reviews, after one warm-up step.
2. Sentence embeddings: texts per second of `minilm-l6` (the embedding classifier's and MAUVE's encoder)
   loaded as the evaluate stage loads it (`dpnb.evaluation.embeddings.Embedder` with the dtype its
   `precision` gives: float32, or bfloat16 where `evaluate.dtype: auto` measures bf16 fast), over
   --embed-texts real IMDb test reviews cut to 128 tokens, in batches of 128 (the stage's 2 x
   batch_size), float32 and bf16 runs alternating after one warm-up batch each;
   speedup_bf16_embedding = bf16 texts/s / float32 texts/s, and the mean and least cosine similarity of
   each text's two embeddings (bf16 rounding only). Skipped where bf16 is slower than float32.
3. Memorisation screen: `dpnb.evaluation.memorisation.longest_shared_runs` for n "synthetic" texts against n
   training reviews. The real IMDb test split stands in for the synthetic set (train texts vs test
   texts), both in SmolLM2's tokens cut to --max-tokens (prepare's max_length; the paper uses 300).
   Tokenising is timed apart from the screen; the token ids are cached in $DPNB_CACHE
   (~/.cache/dpnb) so a rerun measures the screen alone.

The machine's facts come first (benchmarks/machine.py). --quick: classifier batch 16 only, 1 timed
step; 512 texts embedded once per format; the screen on 1,000 x 1,000 reviews. --json prints one JSON
object last. Reads the IMDb mirror from $DPNB_DATA_DIR (default /work/shared/data/imdb). Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from machine import describe, machine_facts  # benchmarks/machine.py, this script's directory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def imdb_texts(split: str, n: int, seed: int) -> list[str]:
    """n reviews of a split, shuffled (the mirror is sorted by label)."""
    root = Path(os.environ.get("DPNB_DATA_DIR", "/work/shared/data/imdb"))
    frame = pd.read_csv(root / f"{split}.csv.gz")
    return frame.sample(n=min(n, len(frame)), random_state=seed)["text"].tolist()


def bench_classifier(batch_sizes: list[int], seq_len: int, steps: int) -> dict[str, Any]:
    import torch

    from dpnb.models import load_classifier

    model, tokenizer = load_classifier("minilm-l6", 2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2.1e-5)
    texts = imdb_texts("train", max(batch_sizes), seed=0)
    print(f"classifier minilm-l6 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"{torch.get_num_threads()} torch threads")
    found = {}
    for batch_size in batch_sizes:
        batch = tokenizer(texts[:batch_size], truncation=True, max_length=seq_len, padding="max_length",
                          return_tensors="pt")
        labels = torch.arange(batch_size) % 2
        times = []
        for step in range(steps + 1):  # the first step warms up (allocations, kernels)
            started = time.perf_counter()
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - started)
        per_step = float(np.median(times))
        print(f"  batch {batch_size:>3} x {seq_len} tokens: {per_step:.2f} s/step = {1 / per_step:.3f} steps/s "
              f"= {batch_size / per_step:.1f} texts/s (median of {steps} steps)")
        found[f"batch_{batch_size}"] = {"s_per_step": per_step, "texts_per_s": batch_size / per_step}
    return {"seq_len": seq_len, "steps": steps, **found}


def bench_embedding(n: int, runs: int, max_length: int = 128, batch_size: int = 128) -> dict[str, Any]:
    """Texts per second of the evaluate stage's sentence encoder in float32 and in bf16, runs alternating."""
    import torch

    from dpnb.evaluation.embeddings import DEFAULT_ENCODER, Embedder, sentence_embeddings

    texts = imdb_texts("test", n, seed=0)
    encoders = {name: Embedder(DEFAULT_ENCODER, max_length=max_length, batch_size=batch_size, dtype=dtype).encoder
                for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16))}
    seconds, features = dict.fromkeys(encoders, 0.0), {}
    print(f"sentence embeddings {DEFAULT_ENCODER}: {len(texts)} IMDb test reviews cut to {max_length} tokens, "
          f"batches of {batch_size}, {runs} run(s) per format, alternating")
    for model, tokenizer in encoders.values():  # warm-up: one batch (allocations, kernel selection)
        sentence_embeddings(texts[:batch_size], model, tokenizer, max_length=max_length, batch_size=batch_size)
    for run in range(runs):
        for name, (model, tokenizer) in encoders.items():
            started = time.perf_counter()
            features[name] = sentence_embeddings(texts, model, tokenizer, max_length=max_length, batch_size=batch_size)
            took = time.perf_counter() - started
            seconds[name] += took
            print(f"  {name:8} run {run}: {took:6.2f} s = {len(texts) / took:7.1f} texts/s  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    rate = {name: runs * len(texts) / s for name, s in seconds.items()}
    cosine = np.sum(features["float32"] * features["bf16"], axis=1)  # unit vectors: their cosine similarity
    speedup = rate["bf16"] / rate["float32"]
    print(f"  float32 {rate['float32']:.1f} texts/s, bf16 {rate['bf16']:.1f} texts/s: "
          f"speedup_bf16_embedding {speedup:.2f}x; cosine(float32, bf16) mean {cosine.mean():.4f}, "
          f"least {cosine.min():.4f}")
    return {"encoder": DEFAULT_ENCODER, "texts": len(texts), "runs": runs, "max_length": max_length,
            "batch_size": batch_size, "texts_per_s": rate, "speedup_bf16_embedding": speedup,
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def generator_tokens(n: int, max_tokens: int, seed: int) -> tuple[list[list[int]], list[list[int]], float]:
    """SmolLM2 token ids of n train and n test reviews, cut to max_tokens (cached on disk)."""
    from dpnb.models import cache_dir, load_tokenizer

    cache = cache_dir() / f"bench_evaluate_tokens_{n}_{max_tokens}_{seed}.pkl"
    if cache.exists():
        with open(cache, "rb") as handle:
            return (*pickle.load(handle), 0.0)
    tokenizer = load_tokenizer("smollm2-135m")
    chars = 8 * max_tokens  # a token is shorter than 8 characters in English text: cut before tokenising
    started = time.perf_counter()
    sides = []
    for split in ("train", "test"):
        texts = [t[:chars] for t in imdb_texts(split, n, seed)]
        ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        sides.append([row[:max_tokens] for row in ids])
    seconds = time.perf_counter() - started
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "wb") as handle:
        pickle.dump(tuple(sides), handle)
    return sides[0], sides[1], seconds


def bench_screen(n: int, max_tokens: int, threshold: int, seed: int) -> dict[str, Any]:
    from dpnb.evaluation.memorisation import longest_shared_runs, memorisation_summary

    train, test, tokenise_s = generator_tokens(n, max_tokens, seed)
    note = f"tokenised in {tokenise_s:.1f} s" if tokenise_s else "tokens from the cache"
    print(f"memorisation screen: {len(test)} texts vs {len(train)} reviews, SmolLM2 tokens cut to {max_tokens} "
          f"({sum(map(len, train)) + sum(map(len, test)):,} tokens; {note})")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    runs = longest_shared_runs(train, test)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = memorisation_summary(runs, threshold)
    print(f"  screen: {seconds:.1f} s; peak RSS {peak / 1024:.0f} MB (before: {rss_before / 1024:.0f} MB)")
    print(f"  longest shared run: max {summary['max']}, median {summary['median']}, mean {summary['mean']:.1f} "
          f"tokens; {summary['n_flagged']} test reviews share >= {threshold} tokens with a training review")
    return {"n": n, "max_tokens": max_tokens, "tokenise_s": tokenise_s, "screen_s": seconds,
            "peak_rss_mb": peak / 1024, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, 1 step; 512 texts embedded; 1,000 x 1,000")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--n", type=int, default=None, help="texts on each side of the screen (25,000; --quick 1,000)")
    parser.add_argument("--max-tokens", type=int, default=300, help="tokens kept per review (prepare.max_length)")
    parser.add_argument("--threshold", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None, help="timed classifier steps per batch size (3; --quick 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="classifier batch sizes (16 64; --quick 16)")
    parser.add_argument("--embed-texts", type=int, default=None, help="texts embedded per format (2,000; --quick 512)")
    parser.add_argument("--embed-runs", type=int, default=None, help="embedding runs per format (2; --quick 1)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-classifier", action="store_true")
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--skip-screen", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    facts = machine_facts(args.threads)
    print(describe(facts), flush=True)
    result: dict[str, Any] = {"machine": facts, "quick": quick}
    if not args.skip_classifier:
        result["classifier"] = bench_classifier(args.batch_sizes or ([16] if quick else [16, 64]), args.seq_len,
                                                args.steps or (1 if quick else 3))
    if not args.skip_embedding and facts["bf16_matmul_speedup"] >= 1.0:
        result["embedding"] = bench_embedding(args.embed_texts or (512 if quick else 2000),
                                              args.embed_runs or (1 if quick else 2))
        result["speedup_bf16_embedding"] = result["embedding"]["speedup_bf16_embedding"]
    elif not args.skip_embedding:
        print("sentence embeddings: bf16 skipped, it is slower than float32 here (emulated)")
    if not args.skip_screen:
        result["screen"] = bench_screen(args.n or (1000 if quick else 25_000), args.max_tokens, args.threshold,
                                        args.seed)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
