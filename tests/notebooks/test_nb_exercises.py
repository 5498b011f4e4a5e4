"""The stage notebooks' exercises (02, 04, 06) keep their answers folded until opened, each checked by a cell."""

from __future__ import annotations

import json
import re

import pytest
from testkit import NOTEBOOKS


@pytest.mark.parametrize("name", ["02_finetune.ipynb", "04_evaluate.ipynb", "06_audit.ipynb"])
def test_exercises_ask_first_and_fold_their_answers(name):
    cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells]
    starts = [i for i, source in enumerate(sources) if re.search(r"\*\*Exercise \d+\.\*\*", source)]
    assert len(starts) >= 2, name
    for i in starts:
        question, folded, rest = sources[i].partition("<details><summary>Answer</summary>")
        assert question.split("**Exercise")[-1].strip() and folded and "</details>" in rest, (name, i)
    # where an answer has a number, the next cell computes it and its output is checked on every test run
    checked = [i for i in starts if i + 1 < len(cells) and cells[i + 1]["cell_type"] == "code"]
    assert checked and all(sources[i + 1].startswith("# NBVAL_CHECK_OUTPUT") for i in checked), name
