"""Shared fixtures: small labelled data, offline models, the IMDb mirror when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testkit import toy_reviews, write_csv

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a busy machine two OpenMP threads crawl (10-20x slower
# generation was measured here). Notebook kernels started by the tests inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
# precision "auto" measures whether bf16 is fast on this machine (dpnb.precision); machines differ, so the
# tests state the answer: float32 by default, and the bf16 tests set it themselves (monkeypatch.setenv)
os.environ["DPNB_BF16_SPEEDUP"] = "1"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """A directory in the IMDb mirror's layout (train.csv, test.csv) with 200 + 100 toy reviews."""
    root = tmp_path_factory.mktemp("toy_data")
    write_csv(root / "train.csv", toy_reviews(200, seed=1))
    write_csv(root / "test.csv", toy_reviews(100, seed=2))
    return root


@pytest.fixture(scope="session")
def imdb_dir() -> Path:
    """The local IMDb mirror named by DPNB_DATA_DIR (CI sets it); tests that need it skip without it."""
    path = os.environ.get("DPNB_DATA_DIR")
    if not path or not (Path(path) / "train.csv.gz").exists():
        pytest.skip("DPNB_DATA_DIR does not point at the IMDb mirror (train.csv.gz, test.csv.gz)")
    return Path(path)
