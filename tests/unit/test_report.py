"""The report over a sweep with every evaluate source: its rows, what it says in words, and its figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from testkit import REPORT_N_TEST, REPORT_REAL, REPORT_SWEEP, REPORT_ZERO_SHOT, report_sweep

from dpnb.stages import report


def se(p: float) -> float:
    return math.sqrt(p * (1 - p) / REPORT_N_TEST)


@pytest.fixture
def sweep(tmp_path):
    report_sweep(tmp_path / "runs")
    return report.write_report(tmp_path / "runs", tmp_path / "report")


def test_one_row_per_run_and_source_with_the_epsilon_of_each_sources_own_accountant(sweep):
    table = sweep["table"]
    assert list(table.source) == ["real"] + ["dp_classifier"] * 4 + ["synthetic"] * 4 + ["pe"] * 3 + ["zero_shot"]
    real, zero_shot = table.iloc[0], table.iloc[-1]
    assert real.runs == 4 and math.isinf(real.epsilon) and real.accuracy == REPORT_REAL  # trained without DP
    assert zero_shot.runs == 4 and zero_shot.epsilon == 0.0  # reads no private data
    synthetic = table[table.source == "synthetic"]
    assert list(synthetic.run) == ["eps1", "eps3", "eps8", "nodp"]  # by epsilon, no DP last
    assert list(synthetic.epsilon[:3]) == [1.0, 3.0, 8.0] and math.isinf(synthetic.epsilon.iloc[-1])
    assert list(synthetic.accuracy) == [accuracies[0] for _, accuracies in REPORT_SWEEP.values()]
    assert list(synthetic.label_fidelity) == pytest.approx([0.5, 0.6, 0.7, 0.8])
    pe = table[table.source == "pe"]  # pe/privacy.json's sigma, not the fine-tuned model's
    assert list(pe.run) == ["eps1", "eps3", "eps8"] and list(pe.noise_multiplier) == pytest.approx([5.0, 5 / 3, 5 / 8])
    direct = table[table.source == "dp_classifier"].set_index("run")
    assert direct.loc["nodp", "epsilon"] == 8.0 and direct.loc["nodp", "dp"]  # its own budget, in a run without DP
    assert direct.mauve.isna().all() and direct.classifier.iloc[0] == "minilm-l6 (embedding, DP-SGD)"
    for row in table.itertuples():
        assert row.accuracy_se == pytest.approx(se(row.accuracy))
    csv = Path(sweep["figures"]["accuracy_vs_epsilon.png"]).parent / "table.csv"
    assert csv.read_text().splitlines()[0].split(",") == report.COLUMNS


def test_the_findings_say_which_differences_exceed_two_standard_errors_and_what_rises_with_epsilon(sweep):
    differences = sweep["comparisons"].set_index(["source", "run", "against"])
    assert len(differences) == 2 * 11  # every private row against real and against zero-shot
    eps8 = differences.loc[("synthetic", "eps8", "zero_shot")]
    assert eps8.difference == pytest.approx(0.70 - REPORT_ZERO_SHOT)
    assert eps8.se == pytest.approx(math.hypot(se(0.70), se(REPORT_ZERO_SHOT)))
    said = "\n".join(sweep["findings"])
    # 0.70 - 0.55 is 4.4 standard errors (bold); 0.58 - 0.55 is 0.9 (not)
    assert f"epsilon 8 (eps8): **+0.150** ({eps8.z:+.1f} s.e.)" in said
    assert "epsilon 1 (eps1): +0.030 (+0.9 s.e.)" in said
    assert "Against zero-shot (epsilon 0)** (accuracy 0.550 +- 0.025): 8 of 11 differences exceed 2" in said
    # along the lines: the fine-tuned set rises beyond test noise, PE does not, the no-DP run stands beside epsilon 8
    fine_tuned = next(line for line in sweep["findings"] if line.startswith("**DP fine-tuned"))
    rise = math.hypot(se(0.58), se(0.70))
    assert f"from epsilon 1 to 8: +0.120 +- {rise:.3f} ({0.12 / rise:+.1f} s.e.), a rise beyond test noise" \
        in fine_tuned
    assert "without DP (nodp) 0.740 against epsilon 8: +0.040" in fine_tuned
    pe = next(line for line in sweep["findings"] if line.startswith("**Private Evolution"))
    assert "no change beyond test noise" in pe and "without DP" not in pe
    # the direct classifier's two rows at epsilon 8 (the eps8 run's and the non-DP run's) are averaged
    assert "0.755 at epsilon 8" in next(line for line in sweep["findings"] if line.startswith("**direct DP"))
    text = (Path(sweep["figures"]["loss_vs_step.png"]).parent / "report.md").read_text()
    assert "## What the table says" in text and "composition" in text and "outside every guarantee" in text


def draw(plot, *args):
    ax = Figure().add_subplot()
    plot(*args, ax)
    return ax


def test_the_no_dp_run_stands_at_a_labelled_edge_and_every_source_has_its_line(sweep):
    ax = draw(report.plot_accuracy_vs_epsilon, sweep["table"])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0", "1", "3", "8", "no DP"]  # the runs' epsilons, then the no-DP position: no epsilon
    no_dp = ax.get_xticks()[-1]
    legend = ax.get_legend_handles_labels()[1]
    assert legend == ["real data (no DP)", "zero-shot (epsilon 0) [tiny-llama]", "direct DP classifier",
                      "DP fine-tuned (tiny-llama)", "Private Evolution (tiny-llama)"]
    points = [(None if c.get_label().startswith("_") else c.get_label(),  # "_...": not in the legend
               list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers]
    assert points == [("direct DP classifier", [1, 3, 8, 8], [0.70, 0.74, 0.76, 0.75]),
                      ("DP fine-tuned (tiny-llama)", [1, 3, 8], [0.58, 0.66, 0.70]),
                      (None, [no_dp], [0.74]),  # the fine-tuned model without DP, alone at the edge
                      ("Private Evolution (tiny-llama)", [1, 3, 8], [0.60, 0.61, 0.63])]
    # MAUVE: the generators only (the direct classifier writes no text); the loss: every run, no DP included
    mauve = draw(report.plot_mauve_vs_epsilon, sweep["table"])
    assert "direct DP classifier" not in mauve.get_legend_handles_labels()[1]
    loss = draw(report.plot_loss_vs_step, report.train_logs(sweep["summaries"]))
    assert loss.get_legend_handles_labels()[1] == ["eps1 (epsilon 1)", "eps3 (epsilon 3)", "eps8 (epsilon 8)",
                                                   "nodp (no DP)"]
