"""notebooks/00_dp_sgd_explained.ipynb runs end to end and its checked cells are reproducible; the committed
copy carries its outputs and keeps its exercises' answers folded."""

from __future__ import annotations

import json
import os
import re

from testkit import NOTEBOOKS, execute_notebook, nbval_check

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NAME = "00_dp_sgd_explained.ipynb"


def test_explained_notebook_runs_and_reproduces(tmp_path):
    # small parameters: the RDP accountant (fast) for the tables, few points on the curves
    executed = execute_notebook(
        NAME, tmp_path, toy_epochs=1, accountant="rdp", target_epsilons=[1, 8],
        batch_sizes=[1028, 4096], curve_every=25, utility_sigmas=[1, 5], utility_seeds=2,
    )
    nbval_check(executed)


def test_committed_notebook_carries_its_figures_and_folds_its_answers():
    cells = json.loads((NOTEBOOKS / NAME).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    outputs = [o for c in code for o in c["outputs"]]
    assert all(c["execution_count"] is not None for c in code)  # executed as committed, not just saved
    assert not [o for o in outputs if o["output_type"] == "error"]
    plotting = [c for c in code if "plt.show()" in "".join(c["source"])]
    assert plotting and all(any("image/png" in o.get("data", {}) for o in c["outputs"]) for c in plotting)

    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    exercises = re.findall(r"\*\*Exercise \d+\.\*\*(.*?)(?=\*\*Exercise \d+\.\*\*|\Z)", markdown, re.S)
    assert len(exercises) >= 3
    for exercise in exercises:  # the question first, then its answer folded away
        question, folded, rest = exercise.partition("<details><summary>Answer</summary>")
        assert question.strip() and folded and "</details>" in rest
