"""Benchmark of the evaluate stage: classifier training speed and the memorisation screen at IMDb size.

    .venv/bin/python benchmarks/bench_evaluate.py                  # default: 25,000 x 25,000 screen
    .venv/bin/python benchmarks/bench_evaluate.py --n 5000 --steps 2
    .venv/bin/python benchmarks/bench_evaluate.py --skip-classifier --max-tokens 1024

1. Classifier: optimizer steps per second of `minilm-l6` (the offline default classifier) at batch
   16 and 64 x 128 tokens, on real IMDb reviews, after one warm-up step.
2. Memorisation screen: `dpnb.evaluation.memorisation.longest_shared_runs` for n "synthetic" texts against n
   training reviews. The real IMDb test split stands in for the synthetic set (train texts vs test
   texts), both in SmolLM2's tokens cut to --max-tokens (prepare's max_length; the paper uses 300).
   Tokenising is timed apart from the screen; the token ids are cached in $DPNB_CACHE
   (~/.cache/dpnb) so a rerun measures the screen alone.

Reads the IMDb mirror from $DPNB_DATA_DIR (default /work/shared/data/imdb). Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def imdb_texts(split: str, n: int, seed: int) -> list[str]:
    """n reviews of a split, shuffled (the mirror is sorted by label)."""
    root = Path(os.environ.get("DPNB_DATA_DIR", "/work/shared/data/imdb"))
    frame = pd.read_csv(root / f"{split}.csv.gz")
    return frame.sample(n=min(n, len(frame)), random_state=seed)["text"].tolist()


def bench_classifier(batch_sizes: list[int], seq_len: int, steps: int, threads: int | None) -> None:
    import torch

    from dpnb.models import load_classifier

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_classifier("minilm-l6", 2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2.1e-5)
    texts = imdb_texts("train", max(batch_sizes), seed=0)
    print(f"classifier minilm-l6 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
          f"{torch.get_num_threads()} torch threads")
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


def bench_screen(n: int, max_tokens: int, threshold: int, seed: int) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25_000, help="texts on each side of the screen")
    parser.add_argument("--max-tokens", type=int, default=300, help="tokens kept per review (prepare.max_length)")
    parser.add_argument("--threshold", type=int, default=50)
    parser.add_argument("--steps", type=int, default=3, help="timed classifier steps per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-classifier", action="store_true")
    parser.add_argument("--skip-screen", action="store_true")
    args = parser.parse_args()
    if not args.skip_classifier:
        bench_classifier(args.batch_sizes, args.seq_len, args.steps, args.threads)
    if not args.skip_screen:
        bench_screen(args.n, args.max_tokens, args.threshold, args.seed)


if __name__ == "__main__":
    main()
