"""Report: the paper's table, its figures and what they say, over every run under a directory.

Rows of the table, one per (run, source) for every source a run's metrics.json holds, in this order:
- `real`: the classifier trained on real training data, without DP (the ceiling), once per distinct
  data and classifier setting (the mean when several runs repeat it);
- `dp_classifier`: logistic regression trained with DP-SGD directly on the private records' embeddings,
  at its own (epsilon, delta) (`dp_classifier/privacy.json`, carried in its metrics entry);
- `synthetic`: trained on text sampled from the DP fine-tuned model (one row per run: model x
  epsilon x seed), and from non-DP fine-tuned models (epsilon infinite, shown as "inf (no DP)");
- `pe`: trained on a Private Evolution set, the second DP generator (epsilon from `pe/privacy.json`);
- `zero_shot`: trained on text sampled from the base model, which never saw the private data
  (epsilon 0), once per distinct data, base model and classifier.
Columns: epsilon spent, delta, noise multiplier, noise-adding steps (PE: iterations); the classifier
that produced the numbers; accuracy on the real test set with its standard error `accuracy_se` =
sqrt(p (1 - p) / n_test) (`dpnb.evaluation.standard_errors`); F1; `mauve` of the source's texts
against held-out real texts (the real row: real training texts against the same, the ceiling); label
fidelity (the share of a synthetic set's texts the real-data classifier labels as prompted); counts;
wall time. Rows scored by different classifiers do not compare.

**What the table says** (`findings`, in words computed from it). The difference of two accuracies
p_a - p_b has standard error sqrt(se_a^2 + se_b^2) (the two treated as independent; both are scored on
the same test texts, so this errs on the large side); a difference of 2 standard errors or more is
unlikely to be test noise alone. Each private row is compared with the real and the zero-shot rows
of its data; along each line (a generator, or the direct classifier, by model) the accuracy at the
largest epsilon is compared with that at the smallest (rows at the same epsilon averaged), and the
non-DP run with the largest epsilon. Only the test sample is counted: each point is one training
run, and the spread over training seeds comes on top.

Every epsilon in the table is read from a privacy.json that the code wrote from its accountant (or
is 0 for the zero-shot set, which reads no private data); runs with `dp: false` show infinity. Each
run spent its own budget on the private data: a sweep of k runs over the same data costs the
composition of the k guarantees, and choosing the best run by its accuracy on private data leaks
privacy too, unless the selection is itself made private or uses public validation data. The loss
figures are statistics of the private training batches, outside every guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dpnb.config import SOURCE_NAMES
from dpnb.evaluation.standard_errors import accuracy_standard_error, standard_errors
from dpnb.io import read_json, read_jsonl, save_figure, write_text_atomic
from dpnb.rundir import RunDir
from dpnb.training.train_log import plot_loss_vs_epsilon, smoothed

SELECTION_WARNING = (
    "Every run in the table spent its own privacy budget on the same private data: releasing the outputs of k "
    "runs costs the composition of their k guarantees, not the largest one. Choosing the best run by "
    "looking at results computed on private data also spends privacy; select with public data or "
    "account for the selection."
)
LOSS_TITLE = "Training loss against privacy spent"
LOSS_NOTE = ("The training losses are statistics of the private training batches, outside every guarantee: keep "
             "the loss figures with the runs, not with what you release.")
COLUMNS_NOTE = (
    "`epsilon`: from the privacy.json the row's accountant wrote (`real`: trained without DP; `zero_shot`: 0, it "
    "reads no private data; `inf (no DP)`: a generator trained without DP). `classifier`: the model and how it was "
    "trained (`finetune`: fine-tuned; `embedding`: logistic regression on its frozen sentence embeddings; the "
    "`dp_classifier` row: the same with DP-SGD). `accuracy_se`: the standard error of the accuracy from the test "
    "sample alone, sqrt(p (1 - p) / n_test); a difference between two rows has a standard error of about sqrt(2) "
    "times theirs, so gaps under about 3 accuracy_se may be test noise. `mauve`: MAUVE of the row's training texts "
    "against held-out real texts on MiniLM features (1: indistinguishable; the real row compares real training "
    "texts, the ceiling); noisy below a few hundred texts per side. `label_fidelity`: the share of a set's texts "
    "that the real-data classifier labels as they were prompted."
)
# the sources drawn as lines against epsilon, with their names in the figures and the findings
LINES = {"synthetic": "DP fine-tuned", "pe": "Private Evolution", "dp_classifier": "direct DP classifier"}
REFERENCES = {"real": "real data (no DP)", "zero_shot": "zero-shot (epsilon 0)"}
COLUMNS = ["source", "run", "model", "mode", "dp", "epsilon", "delta", "noise_multiplier", "steps", "classifier",
           "accuracy", "accuracy_se", "f1", "mauve", "label_fidelity", "n_train", "n_test", "wall_time_s", "runs"]
SIGNIFICANT_Z = 2.0  # a difference this many standard errors from 0 is unlikely to be test noise alone


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories under `runs_dir`: those holding completion markers."""
    root = Path(runs_dir)
    return sorted(p.parent.parent for p in root.glob("**/stages/*.json") if p.name == "prepare.json")


def summarise_run(path: Path) -> dict[str, Any]:
    """The facts of one run that the table and figures need, read from its files."""
    run = RunDir(path)
    stages = {p.stem: read_json(p) for p in sorted(run.stages.glob("*.json"))}
    privacy = read_json(run.privacy) if run.privacy.exists() else None
    pe_privacy = run.pe / "privacy.json"
    metrics = read_json(run.metrics) if run.metrics.exists() else {}
    manifest = read_json(run.manifest) if run.manifest.exists() else {}
    finetune = stages.get("finetune", {}).get("config", {})
    evaluate = stages.get("evaluate", {}).get("config", {})
    # runs evaluated before classifier_kind existed fine-tuned their classifier
    kind = evaluate.get("classifier_kind", "finetune") if evaluate else None
    return {
        "run": path.name,
        "path": str(path),
        "model": manifest.get("model"),
        "mode": finetune.get("mode"),
        "dp": privacy.get("dp") if privacy else None,
        "privacy": privacy,
        "pe_privacy": read_json(pe_privacy) if pe_privacy.exists() else None,
        "metrics": metrics,
        "encoder": evaluate.get("classifier"),
        "classifier": f"{evaluate['classifier']} ({kind})" if evaluate.get("classifier") else None,
        "data_key": (manifest.get("train_sha256"), evaluate.get("classifier"), kind, evaluate.get("n_real_train")),
        "wall_time_s": sum(s.get("wall_time_s", 0.0) for s in stages.values()),
        "train_log": read_jsonl(run.train_log),
    }


def source_privacy(source: str, summary: dict[str, Any], metric: dict[str, Any]) -> dict[str, Any]:
    """The guarantee a source's row carries: dp, epsilon (inf without DP, None unknown), delta, sigma, steps."""
    if source == "zero_shot":
        return {"dp": None, "epsilon": 0.0}  # the base model's text: no private data read
    if source == "real":
        return {"dp": False, "epsilon": math.inf}  # the real records themselves, no DP: the ceiling
    record = {"synthetic": summary["privacy"], "pe": summary["pe_privacy"]}.get(source)
    if source == "dp_classifier":
        record = metric.get("privacy") or {"dp": True, "epsilon": metric.get("epsilon"), "delta": metric.get("delta")}
    if record is None:
        return {"dp": None, "epsilon": None}  # no privacy record: no epsilon is claimed
    dp = bool(record.get("dp", record.get("epsilon") is not None))
    if not dp:
        return {"dp": False, "epsilon": math.inf, "steps": record.get("steps")}
    return {"dp": True, **{k: record.get(k) for k in ("epsilon", "delta", "noise_multiplier", "steps")}}


def _metric_row(source: str, summary: dict[str, Any], metric: dict[str, Any]) -> dict[str, Any]:
    fidelity = metric.get("label_fidelity") or {}
    generated = source in ("synthetic", "pe", "zero_shot")
    classifier = summary["classifier"]
    if source == "dp_classifier" and summary["encoder"]:
        classifier = f"{summary['encoder']} (embedding, DP-SGD)"
    return {
        "source": source,
        "run": summary["run"],
        "model": summary["model"] if generated else None,
        "mode": summary["mode"] if source == "synthetic" else None,
        **source_privacy(source, summary, metric),
        "classifier": classifier,
        "accuracy": metric.get("accuracy"),
        "accuracy_se": standard_errors(summary["metrics"])["accuracy"].get(source, {}).get("se"),
        "f1": metric.get("f1"),
        "mauve": metric.get("mauve"),
        "label_fidelity": fidelity.get("overall") if generated else None,
        "n_train": metric.get("n_train"),
        "n_test": metric.get("n_test"),
        "wall_time_s": round(summary["wall_time_s"], 1) if source == "synthetic" else None,
        "_key": summary["data_key"],
    }


def _mean_or_none(values: pd.Series) -> float | None:
    mean = pd.to_numeric(values, errors="coerce").mean()  # NaN when no run has one
    return None if math.isnan(mean) else float(mean)


def _shared_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The real-data and zero-shot references repeated by several runs, one row each: their mean."""
    grouped = []
    for _, group in frame.groupby(["source", "model", "_key"], dropna=False, sort=False):
        row = group.iloc[0].to_dict()
        accuracy = group.accuracy.mean()
        # the standard error of one run's accuracy (the runs share the test set, so their mean is no surer)
        row.update(accuracy=accuracy, f1=group.f1.mean(), mauve=_mean_or_none(group.mauve),
                   label_fidelity=_mean_or_none(group.label_fidelity),
                   accuracy_se=accuracy_standard_error(accuracy, row["n_test"]), runs=len(group),
                   run=", ".join(group.run) if len(group) <= 3 else f"{len(group)} runs")
        grouped.append(row)
    return grouped


def report_rows(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """Every (run, source) row, references merged, in the table's order, with the data key `_key` kept."""
    rows = [_metric_row(source, summary, summary["metrics"][source]) for summary in summaries for source in SOURCE_NAMES
            if isinstance(summary["metrics"].get(source), dict) and summary["metrics"][source].get("accuracy")
            is not None]
    if not rows:
        return pd.DataFrame(columns=[*COLUMNS, "_key"])
    frame = pd.DataFrame(rows)
    frame["runs"] = 1
    shared = frame.source.isin(list(REFERENCES))
    table = pd.concat([pd.DataFrame(_shared_rows(frame[shared])), frame[~shared]], ignore_index=True)
    table["_source"] = table.source.map(SOURCE_NAMES.index)
    table["_epsilon"] = pd.to_numeric(table.epsilon, errors="coerce").fillna(math.inf)  # unknown: last
    table = table.sort_values(["_source", "model", "_epsilon", "run"], kind="stable", na_position="first")
    return table.drop(columns=["_source", "_epsilon"]).reset_index(drop=True)[[*COLUMNS, "_key"]]


def paper_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """The paper's table: real, the direct DP classifier, each generator by epsilon (no DP last), zero-shot."""
    return report_rows(summaries).drop(columns="_key")


def dp_train_logs(summaries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The training logs of the DP runs by run name: the curves of the paper's loss figure."""
    return {s["run"]: s["train_log"] for s in summaries if s["train_log"] and s["dp"]}


def train_logs(summaries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every run's training log by a label naming its run and privacy, the non-DP runs included."""
    def label(summary: dict[str, Any]) -> str:
        privacy = summary["privacy"] or {}
        if privacy.get("dp") and privacy.get("epsilon") is not None:
            return f"{summary['run']} (epsilon {privacy['epsilon']:.3g})"
        return f"{summary['run']} (no DP)" if privacy else summary["run"]
    return {label(s): s["train_log"] for s in summaries if s["train_log"]}

# --------------------------------------------------------------------------- figures


def _epsilons(frame: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(frame.epsilon, errors="coerce")  # None (no privacy record) becomes NaN


def _line_label(source: str, model: Any) -> str:
    return LINES[source] if source == "dp_classifier" or not isinstance(model, str) else f"{LINES[source]} ({model})"


def line_groups(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows drawn as one line against epsilon, by label: each generator by model, and the direct DP classifier.

    Rows without a privacy record (no epsilon) are left out: they have no place on the axis.
    """
    rows = table[table.source.isin(list(LINES)) & _epsilons(table).notna()]
    groups = rows.groupby(["source", "model"], dropna=False, sort=False)
    return {_line_label(source, model): group for (source, model), group in groups}


def _errors(values: pd.Series) -> list[float]:
    return [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]


def _epsilon_axis(ax: Axes, epsilons: list[float], no_dp_at: float | None) -> None:
    """Ticks at the runs' epsilons (round ones when there are many); the non-DP position, past a dotted
    break, named "no DP"."""
    largest = max([1.0, *epsilons])
    ticks = sorted({0.0, *epsilons}) if len(set(epsilons)) <= 6 else \
        [t for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(0, largest) if 0 <= t <= largest]
    labels = [f"{t:.2g}" for t in ticks]
    if no_dp_at is not None:
        ax.axvline((largest + no_dp_at) / 2, color="lightgrey", linestyle=":", linewidth=1)
        ticks, labels = [*ticks, no_dp_at], [*labels, "no DP"]
    ax.set_xlim(0, (no_dp_at or largest) * 1.08)
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("epsilon spent")


def _reference_lines(table: pd.DataFrame, column: str, ax: Axes, band: bool) -> None:
    """The real-data and zero-shot rows as horizontal lines named in the legend (accuracy: a +-1 s.e. band)."""
    for source, style in (("real", "-"), ("zero_shot", "--")):
        for _, row in table[table.source == source].iterrows():
            value = row[column]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            label = REFERENCES[source] + (f" [{row.model}]" if source == "zero_shot" and isinstance(row.model, str)
                                          else "")
            ax.axhline(value, linestyle=style, color="grey", linewidth=1, label=label)
            se = _errors(pd.Series([row.accuracy_se]))[0] if band else 0.0
            if se:
                ax.axhspan(value - se, value + se, color="grey", alpha=0.12, linewidth=0)


def plot_against_epsilon(table: pd.DataFrame, column: str, ax: Axes, *, ylabel: str, title: str,
                         with_errors: bool = False) -> None:
    """`column` against epsilon: one line per generator (and the direct DP classifier), +-1 standard error
    when `with_errors`; non-DP runs at the right edge, named "no DP" (not at any epsilon); real and
    zero-shot as labelled horizontal reference lines."""
    lines = {label: group[group[column].notna()] for label, group in line_groups(table).items()}
    epsilons = pd.concat([_epsilons(g) for g in lines.values()]) if lines else pd.Series(dtype=float)
    finite = [float(e) for e in epsilons[np.isfinite(epsilons)]]
    no_dp_at = max([1.0, *finite]) * 1.25 if np.isinf(epsilons).any() else None
    colours = iter(plt_colours())
    for label, group in lines.items():
        colour = next(colours)  # one colour per line in every figure, drawn or not
        if group.empty:
            continue
        epsilon = _epsilons(group)
        private = group[np.isfinite(epsilon)].sort_values("epsilon")
        plain = group[np.isinf(epsilon)]
        errors = (lambda rows: _errors(rows.accuracy_se)) if with_errors else (lambda rows: None)
        if len(private):
            ax.errorbar(private.epsilon.astype(float), private[column], yerr=errors(private), fmt="o-", capsize=3,
                        color=colour, label=label)
        if len(plain):
            ax.errorbar([no_dp_at] * len(plain), plain[column], yerr=errors(plain), fmt="s", mfc="white", capsize=3,
                        color=colour, label=None if len(private) else label)
    _reference_lines(table, column, ax, band=with_errors)
    _epsilon_axis(ax, finite, no_dp_at)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: covers no point


def plt_colours() -> list[str]:
    """Matplotlib's default colour cycle (the figures' lines, in order)."""
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_accuracy_vs_epsilon(table: pd.DataFrame, ax: Axes) -> None:
    """Downstream accuracy against epsilon, +-1 standard error, with chance (0.5 for two labels) dotted."""
    ax.axhline(0.5, linestyle=":", color="black", linewidth=0.8)
    plot_against_epsilon(table, "accuracy", ax, ylabel="test accuracy (real test set), +-1 s.e.",
                         title="Classifier trained on each source", with_errors=True)


def plot_mauve_vs_epsilon(table: pd.DataFrame, ax: Axes) -> None:
    """MAUVE of each synthetic set against held-out real texts, against epsilon (no error bars: see COLUMNS_NOTE)."""
    plot_against_epsilon(table, "mauve", ax, ylabel="MAUVE against held-out real texts",
                         title="How real the synthetic texts read")
    if not any(table.mauve.notna()):
        ax.text(0.5, 0.5, "no MAUVE in these runs", transform=ax.transAxes, ha="center", color="grey")


def plot_loss_vs_step(logs: dict[str, list[dict[str, Any]]], ax: Axes) -> None:
    """Training loss against the logical step for every run, the non-DP ones included (they have no epsilon)."""
    for label, log in logs.items():
        points = [r for r in log if r.get("loss") is not None]
        if not points:
            continue
        steps, losses = [r["step"] for r in points], [r["loss"] for r in points]
        dots = ax.plot(steps, losses, marker="o", markersize=2.5, linewidth=0, alpha=0.35)
        ax.plot(steps, smoothed(losses) if len(points) >= 4 else losses, linewidth=2, color=dots[0].get_color(),
                label=label)
    ax.set(xlabel="logical step (one Poisson batch; under DP, one noise draw)", ylabel="training loss (nats per token)",
           title="Training loss against the step, every run")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


# --------------------------------------------------------------------------- what the table says


def _difference(a: pd.Series, b: pd.Series) -> dict[str, float] | None:
    """a - b in accuracy, its standard error sqrt(se_a^2 + se_b^2) and z; None without both standard errors."""
    if a.accuracy_se is None or b.accuracy_se is None or pd.isna(a.accuracy_se) or pd.isna(b.accuracy_se):
        return None
    difference = float(a.accuracy - b.accuracy)
    se = math.sqrt(float(a.accuracy_se) ** 2 + float(b.accuracy_se) ** 2)
    return {"difference": difference, "se": se, "z": difference / se if se > 0 else math.nan}


def _epsilon_text(epsilon: Any) -> str:
    if epsilon is None or pd.isna(epsilon):
        return "epsilon unknown"
    return "no DP" if math.isinf(epsilon) else f"epsilon {epsilon:.3g}"


def comparisons(frame: pd.DataFrame) -> pd.DataFrame:
    """Each private row's accuracy against the real and zero-shot rows of its data: difference, se and z.

    `frame` is `report_rows`' (it keeps the data key); a generator's zero-shot reference is the one
    of its own base model.
    """
    rows = []
    references = frame[frame.source.isin(list(REFERENCES))]
    for _, row in frame[frame.source.isin(list(LINES))].iterrows():
        same_data = references[references._key.apply(lambda key, row=row: key == row._key)]
        for _, reference in same_data.iterrows():
            if reference.source == "zero_shot" and isinstance(row.model, str) and reference.model != row.model:
                continue
            difference = _difference(row, reference)
            if difference is not None:
                rows.append({"source": row.source, "model": row.model, "run": row.run, "epsilon": row.epsilon,
                             "against": reference.source, **difference})
    return pd.DataFrame(rows, columns=["source", "model", "run", "epsilon", "against", "difference", "se", "z"])


def _measured(d: dict[str, float] | pd.Series) -> str:
    return f"{d['difference']:+.3f} +- {d['se']:.3f} ({d['z']:+.1f} s.e.)"


def _against_findings(frame: pd.DataFrame, differences: pd.DataFrame) -> list[str]:
    """One paragraph per reference: each line's differences from it, those beyond SIGNIFICANT_Z in bold."""
    out = []
    for against, name in REFERENCES.items():
        part = differences[differences.against == against]
        if part.empty:
            continue
        reference = frame[frame.source == against]
        values = ", ".join(f"{r.accuracy:.3f} +- {r.accuracy_se:.3f}" for r in reference.itertuples())
        beyond = int((part.z.abs() >= SIGNIFICANT_Z).sum())
        lines = []
        for (source, model), rows in part.groupby(["source", "model"], dropna=False, sort=False):
            listed = []
            for r in rows.itertuples():
                value = f"{r.difference:+.3f}"
                listed.append(f"{_epsilon_text(r.epsilon)} ({r.run}): "
                              f"{f'**{value}**' if abs(r.z) >= SIGNIFICANT_Z else value} ({r.z:+.1f} s.e.)")
            lines.append(f"  - {_line_label(source, model)}: " + "; ".join(listed))
        out.append(f"**Against {name}** (accuracy {values}): {beyond} of {len(part)} differences exceed "
                   f"{SIGNIFICANT_Z:g} standard errors (in bold); the others are within what test noise alone "
                   f"gives. Difference in accuracy (its standard error is about {part.se.mean():.3f}):\n"
                   + "\n".join(lines))
    return out


def _per_epsilon(group: pd.DataFrame) -> pd.DataFrame:
    """Accuracy by epsilon along one line: rows at the same epsilon averaged (standard error of their mean)."""
    rows = []
    for epsilon, same in group.groupby("epsilon", sort=True):
        se = math.sqrt(sum(float(v) ** 2 for v in same.accuracy_se)) / len(same)
        rows.append({"epsilon": float(epsilon), "accuracy": float(same.accuracy.mean()), "accuracy_se": se,
                     "runs": ", ".join(same.run)})
    return pd.DataFrame(rows)


def _trend_finding(label: str, group: pd.DataFrame) -> tuple[str | None, int]:
    """Whether accuracy rises with epsilon along one line, and where its non-DP run stands; the differences tested."""
    group = group[group.accuracy_se.notna()]
    epsilon = _epsilons(group)
    points = _per_epsilon(group[np.isfinite(epsilon)])
    plain = group[np.isinf(epsilon)]
    if points.empty and plain.empty:
        return None, 0
    text = [f"**{label}**: accuracy " + ", ".join(f"{p.accuracy:.3f} at epsilon {p.epsilon:.3g}"
                                                  for p in points.itertuples())]
    if len(points) >= 2:
        low, high = points.iloc[0], points.iloc[-1]
        change = _difference(high, low)
        verdict = ("a rise beyond test noise" if change["z"] >= SIGNIFICANT_Z else "a fall beyond test noise"
                   if change["z"] <= -SIGNIFICANT_Z else "no change beyond test noise")
        steps = np.diff(points.accuracy.to_numpy())
        shape = "it rises at each step" if (steps > 0).all() else "it does not rise at each step"
        text.append(f"from epsilon {low.epsilon:.3g} to {high.epsilon:.3g}: {_measured(change)}, {verdict}; {shape}")
    elif len(points) == 1:
        text.append("(one privacy level: no trend to read)")
    for _, row in plain.iterrows():
        against = "" if points.empty else (f" against epsilon {points.iloc[-1].epsilon:.3g}: "
                                          f"{_measured(_difference(row, points.iloc[-1]))}")
        text.append(f"without DP ({row.run}) {row.accuracy:.3f}{against}")
    tested = int(len(points) >= 2) + (len(plain) if len(points) else 0)
    return "; ".join(text) + ".", tested


def _mauve_finding(frame: pd.DataFrame) -> str | None:
    parts = []
    for label, group in line_groups(frame).items():
        values = group[group.mauve.notna()].sort_values("epsilon")
        if len(values):
            parts.append(f"{label} " + ", ".join(f"{r.mauve:.3f} ({_epsilon_text(r.epsilon)})"
                                                 for r in values.itertuples()))
    if not parts:
        return None
    shared = frame[frame.source.isin(list(REFERENCES)) & frame.mauve.notna()]
    references = [f"{REFERENCES[r.source]} {r.mauve:.3f}" for r in shared.itertuples()]
    return (f"**MAUVE** (no standard error: at a few hundred texts per side, draws of the same data differ by about "
            f"0.03): {'; '.join(parts)}" + (f"; references: {', '.join(references)}" if references else "") + ".")


def findings(frame: pd.DataFrame) -> list[str]:
    """What the table says, in words computed from it (`report_rows`' frame): one Markdown paragraph each."""
    differences = comparisons(frame)
    trends = [_trend_finding(label, group) for label, group in line_groups(frame).items()]
    out = _against_findings(frame, differences) + [text for text, _ in trends if text]
    mauve = _mauve_finding(frame)
    if mauve:
        out.append(mauve)
    tests = len(differences) + sum(tested for _, tested in trends)
    if out:
        out.append(f"About {tests} differences are tested here at once: at {SIGNIFICANT_Z:g} standard errors about one "
                   f"in twenty passes by chance alone, so about {tests / 20:.1f} of them may pass with no real "
                   f"difference behind them. The standard errors count the test sample only; each point is one "
                   f"training run, and the spread over training seeds comes on top.")
    return out


# --------------------------------------------------------------------------- the report files


# counts (pandas makes them floats where a row has no value) and whole seconds
WHOLE_NUMBER_COLUMNS = ("steps", "n_train", "n_test", "wall_time_s", "runs")


def _format_value(value: Any, whole: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf (no DP)"
        if whole:
            return f"{value:.0f}"
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """The table as Markdown, numbers formatted for reading (counts whole, no DP as "inf (no DP)")."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    whole = [column in WHOLE_NUMBER_COLUMNS for column in table.columns]
    body = ["| " + " | ".join(_format_value(v, w) for v, w in zip(row, whole, strict=True)) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


FIGURES = ("accuracy_vs_epsilon.png", "mauve_vs_epsilon.png", "loss_vs_step.png", "loss_vs_epsilon.png")


def write_report(runs_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write table.csv, report.md and the figures for every run under `runs_dir`; return them with the findings
    and the differences they read (`comparisons`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarise_run(p) for p in find_runs(runs_dir) if out_dir not in p.parents]
    frame = report_rows(summaries)
    table = frame.drop(columns="_key")
    said, differences = findings(frame), comparisons(frame)
    write_text_atomic(out_dir / "table.csv", table.to_csv(index=False))
    plots: dict[str, Callable[[Axes], None]] = {
        "accuracy_vs_epsilon.png": lambda ax: plot_accuracy_vs_epsilon(table, ax),
        "mauve_vs_epsilon.png": lambda ax: plot_mauve_vs_epsilon(table, ax),
        "loss_vs_step.png": lambda ax: plot_loss_vs_step(train_logs(summaries), ax),
        "loss_vs_epsilon.png": lambda ax: plot_loss_vs_epsilon(dp_train_logs(summaries), ax=ax, title=LOSS_TITLE),
    }
    figures = {}
    for name in FIGURES:
        figure = Figure(figsize=(8.5, 4), layout="tight")
        plots[name](figure.add_subplot())
        figures[name] = str(save_figure(figure, out_dir / name))
    text = "\n\n".join([
        f"# dpnb report: {len(summaries)} runs under {runs_dir}",
        markdown_table(table) if len(table) else "_No run has finished its evaluate stage yet._",
        COLUMNS_NOTE,
        "## What the table says\n\n" + ("\n\n".join(f"- {line}" for line in said) or "_Nothing to compare yet._"),
        f"**Privacy.** {SELECTION_WARNING} {LOSS_NOTE}",
        "\n\n".join(f"![{name[:-4].replace('_', ' ')}]({name})" for name in FIGURES),
    ])
    write_text_atomic(out_dir / "report.md", text + "\n")
    return {"runs": len(summaries), "rows": len(table), "table": table, "findings": said,
            "comparisons": differences, "figures": figures, "summaries": summaries}
