"""notebooks/00_dp_sgd_explained.ipynb runs end to end and its checked cells are reproducible."""

from __future__ import annotations

import os

from testkit import execute_notebook, nbval_check

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_explained_notebook_runs_and_reproduces(tmp_path):
    # small parameters: the RDP accountant (fast) for the tables, few points on the curves
    executed = execute_notebook(
        "00_dp_sgd_explained.ipynb", tmp_path, toy_epochs=1, accountant="rdp", target_epsilons=[1, 8],
        batch_sizes=[1028, 4096], curve_every=25,
    )
    nbval_check(executed)
