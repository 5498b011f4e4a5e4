"""notebooks/04_evaluate.ipynb runs on a tiny run directory (real prepare, hand-made synthetic sets)."""

from __future__ import annotations

import json
import re

from testkit import TINY_EVALUATE, build_run, execute_notebook, nbval_check

from dpnb.evaluation.standard_errors import standard_errors
from dpnb.privacy.guarantee import round_up
from dpnb.stages import evaluate


def checked_outputs(executed) -> list[str]:
    cells = json.loads(executed.read_text())["cells"]
    return ["".join("".join(output.get("text", "")) for output in cell["outputs"]) for cell in cells
            if "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT")]


def test_evaluate_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = build_run(tmp_path, pe=True)
    # force=True: nbval's re-execution trains every classifier again, so the checked accuracy and F1
    # cells also check that training repeats bit for bit on one machine.
    executed = execute_notebook("04_evaluate.ipynb", tmp_path / "executed", run_dir=str(run.path), config=TINY_EVALUATE,
                                force=True)

    one_checked, counts, scores, distinct, gap_answer = checked_outputs(executed)
    assert "training sets: real, dp_classifier, synthetic, pe, zero_shot" in counts
    assert "table shape: (5, 11)" in counts
    for source, n_train in (("real", 32), ("dp_classifier", 32), ("synthetic", 16), ("pe", 8), ("zero_shot", 4)):
        assert re.search(rf"^{source} +{n_train} +20$", counts, re.M), counts
    assert "only label 'positive'" in scores
    metrics = json.loads(run.metrics.read_text())
    assert f"{metrics['zero_shot']['accuracy']:.1f}" == "0.5"
    # the utility table names the classifier and gives MAUVE and the standard errors
    printed = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                      for cell in json.loads(executed.read_text())["cells"] for o in cell.get("outputs", []))
    assert "classifier: minilm-l6 (finetune)" in printed and "accuracy_se" in printed and "mauve" in printed
    assert "zero_shot - real: accuracy" in printed and "standard error" in printed
    assert all(0 <= metrics[s]["mauve"] <= 1 for s in ("real", "synthetic", "pe", "zero_shot"))
    # the one table: a row per evaluated source with metrics.json's numbers and each source's epsilon
    one = evaluate.one_table(run, metrics)
    assert list(one.index) == evaluate.evaluated_sources(metrics) == ["real", "dp_classifier", "synthetic", "pe",
                                                                      "zero_shot"]
    for source in one.index:
        assert one.loc[source, "accuracy"] == metrics[source]["accuracy"]
        assert one.loc[source, "accuracy_se"] == standard_errors(metrics)["accuracy"][source]["se"]
    pe_privacy = json.loads((run.pe / "privacy.json").read_text())
    assert one.loc["pe", "epsilon"] == round_up(pe_privacy["epsilon"]) == round_up(metrics["pe"]["epsilon"])
    assert one.loc["dp_classifier", "epsilon"] == round_up(metrics["dp_classifier"]["epsilon"])
    assert one.loc["zero_shot", "epsilon"] == 0 and one.loc["real", "epsilon"] == float("inf")
    assert one[["what", "n_train", "epsilon"]].to_string() in one_checked
    assert one.round(3).to_string() in printed
    # the samples beside it: every generated set, PE included
    samples = evaluate.sample_table(run)
    assert set(samples.source) == {"real", "synthetic", "pe", "zero_shot"}
    html = "".join("".join(o.get("data", {}).get("text/html", "")) for cell in json.loads(executed.read_text())["cells"]
                   for o in cell.get("outputs", []))
    first_pe = samples[samples.source == "pe"].text.iloc[0]
    assert first_pe.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html
    # the memorisation screen says, from this run's lengths, which sets its threshold cannot reach
    for source in ("synthetic", "pe", "zero_shot"):
        longest = metrics[source]["length"]["max"]
        start = f"{source}: longest shared run {metrics[source]['memorisation']['max']} tokens"
        line = next(line for line in printed.splitlines() if start in line)
        assert f"longest sample {longest} tokens" in line
        assert ("CANNOT flag" in line) == (longest < TINY_EVALUATE["memorisation_threshold"]), line
    assert (run.figures / "memorisation.png").exists()
    # the exercises' answers: real reviews with their words garbled have a higher distinct-1
    real, garbled = (float(v) for v in re.findall(r"distinct-1 (\d\.\d+)", distinct)[:2])
    assert "16 real reviews" in distinct and garbled > real
    gap = standard_errors(metrics)["differences"]["synthetic - zero_shot"]
    assert f"synthetic - zero_shot: {gap['difference']:+.3f}, one standard error {gap['se']:.3f}" in gap_answer
    assert f"with 80 test reviews instead of 20: about {gap['se'] / 2:.3f}" in gap_answer
    nbval_check(executed)
