"""What the stage notebooks say in prose agrees with what the code does (read from the committed notebooks)."""

from __future__ import annotations

import json

import pytest
from testkit import NOTEBOOKS

STAGE_NOTEBOOKS = ["01_prepare.ipynb", "02_finetune.ipynb", "03_generate.ipynb", "04_evaluate.ipynb",
                   "05_report.ipynb", "06_audit.ipynb"]


def markdown(name: str) -> list[str]:
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown"]


@pytest.mark.parametrize("name", STAGE_NOTEBOOKS)
def test_the_nbval_marker_is_explained_once_near_the_top(name):
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    assert any("".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT") for c in cells if c["cell_type"] == "code")
    explained = [i for i, text in enumerate(markdown(name)) if "`# NBVAL_CHECK_OUTPUT`" in text]
    assert explained == [0], name  # in the introduction, and nowhere else


def test_prepare_says_where_the_data_hash_goes():
    """privacy.json holds no hash of the records (dpnb.privacy.guarantee); the hash stays in private files."""
    text = "\n".join(markdown("01_prepare.ipynb"))
    assert "checkpoints/identity.json" in text and "holds no hash of the records" in text
    assert "into `privacy.json`" not in text


def test_finetune_calls_the_losses_outside_the_guarantee_and_nothing_else():
    text = "\n".join(markdown("02_finetune.ipynb"))
    assert text.count("outside the guarantee") >= 2  # the figure's section and the summary
    assert "are not private" not in text
