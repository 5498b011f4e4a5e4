"""Report: the paper's table and figures over every run under a directory.

Rows of the table:
- `real`: the classifier trained on real training data (the reference), once per distinct data and
  classifier setting (the mean when several runs repeat it);
- `zero_shot`: trained on text sampled from the base model with no fine-tuning (no private data);
- `synthetic`: trained on text sampled from each DP fine-tuned model (one row per run: model x
  epsilon x seed), and from non-DP fine-tuned models (epsilon shown as infinity).
Columns: epsilon spent, delta, noise multiplier, noise-adding steps; the classifier that produced the
numbers (`classifier`: model and kind, `finetune` or `embedding`); accuracy on the real test set with
its standard error `accuracy_se` = sqrt(p (1 - p) / n_test) (`dpnb.stages.evaluate.standard_errors`;
a difference between two rows has a standard error of about sqrt(2) times theirs); F1; `mauve` of the
source's texts against held-out real texts (the real row: real training texts against the same, the
ceiling); counts; wall time. Rows scored by different classifiers do not compare.

Every epsilon in the table is read from the run's own `privacy.json`, which the fine-tuning stage
wrote from its accountant; runs with `dp: false` show no epsilon. Each run spent its own budget on
the private data: a sweep of k runs over the same data costs the composition of the k guarantees, and
choosing the best run by its accuracy on private data leaks privacy too, unless the selection is
itself made private or uses public validation data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dpnb.io import read_json, read_jsonl, save_figure, write_text_atomic
from dpnb.rundir import RunDir
from dpnb.stages.evaluate import accuracy_standard_error, standard_errors
from dpnb.stages.finetune import plot_loss_vs_epsilon

SELECTION_WARNING = (
    "Every run in the table spent its own privacy budget on the same private data: releasing the outputs of k "
    "runs costs the composition of their k guarantees, not the largest one. Choosing the best run by "
    "looking at results computed on private data also spends privacy; select with public data or "
    "account for the selection."
)
LOSS_TITLE = "Training loss against privacy spent"
COLUMNS_NOTE = (
    "`classifier`: the model and how it was trained (`finetune`: fine-tuned; `embedding`: logistic regression on "
    "its frozen sentence embeddings). `accuracy_se`: the standard error of the accuracy from the test sample alone, "
    "sqrt(p (1 - p) / n_test); a difference between two rows has a standard error of about sqrt(2) times theirs, "
    "so gaps under about 3 accuracy_se may be test noise. `mauve`: MAUVE of the row's training texts against held-out "
    "real texts on MiniLM features (1: indistinguishable; the real row compares real training texts, the ceiling); "
    "noisy below a few hundred texts per side."
)


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories under `runs_dir`: those holding completion markers."""
    root = Path(runs_dir)
    return sorted(p.parent.parent for p in root.glob("**/stages/*.json") if p.name == "prepare.json")


def summarise_run(path: Path) -> dict[str, Any]:
    """The facts of one run that the table and figures need, read from its files."""
    run = RunDir(path)
    stages = {p.stem: read_json(p) for p in sorted(run.stages.glob("*.json"))}
    privacy = read_json(run.privacy) if run.privacy.exists() else None
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
        "metrics": metrics,
        "classifier": f"{evaluate['classifier']} ({kind})" if evaluate.get("classifier") else None,
        "data_key": (manifest.get("train_sha256"), evaluate.get("classifier"), kind, evaluate.get("n_real_train")),
        "wall_time_s": sum(s.get("wall_time_s", 0.0) for s in stages.values()),
        "train_log": read_jsonl(run.train_log),
    }


def _metric_row(source: str, summary: dict[str, Any], metric: dict[str, Any]) -> dict[str, Any]:
    privacy = summary["privacy"] if source == "synthetic" else None
    dp = privacy.get("dp") if privacy else None
    return {
        "source": source,
        "run": summary["run"],
        "model": summary["model"] if source != "real" else None,
        "mode": summary["mode"] if source == "synthetic" else None,
        "dp": dp,
        "epsilon": (privacy.get("epsilon") if dp else math.inf) if privacy else None,
        "delta": privacy.get("delta") if dp else None,
        "noise_multiplier": privacy.get("noise_multiplier") if dp else None,
        "steps": privacy.get("steps") if privacy else None,
        "classifier": summary["classifier"],
        "accuracy": metric.get("accuracy"),
        "accuracy_se": standard_errors(summary["metrics"])["accuracy"].get(source, {}).get("se"),
        "f1": metric.get("f1"),
        "mauve": metric.get("mauve"),
        "n_train": metric.get("n_train"),
        "n_test": metric.get("n_test"),
        "wall_time_s": round(summary["wall_time_s"], 1) if source == "synthetic" else None,
    }


def paper_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """The paper's table: real, zero-shot, then every fine-tuned model by epsilon (non-DP last)."""
    rows: list[dict[str, Any]] = []
    for summary in summaries:
        for source in ("real", "zero_shot", "synthetic"):
            metric = summary["metrics"].get(source)
            if isinstance(metric, dict) and metric.get("accuracy") is not None:
                rows.append({**_metric_row(source, summary, metric), "_key": summary["data_key"]})
    columns = ["source", "run", "model", "mode", "dp", "epsilon", "delta", "noise_multiplier", "steps",
               "classifier", "accuracy", "accuracy_se", "f1", "mauve", "n_train", "n_test", "wall_time_s"]
    if not rows:
        return pd.DataFrame(columns=columns + ["runs"])
    frame = pd.DataFrame(rows)
    frame["runs"] = 1
    # The same real-data (or zero-shot) reference repeated by several runs is one row: its mean.
    shared = frame[frame.source.isin(["real", "zero_shot"])]
    grouped = []
    for _, group in shared.groupby(["source", "model", "_key"], dropna=False, sort=False):
        row = group.iloc[0].to_dict()
        accuracy = group.accuracy.mean()
        mauve = pd.to_numeric(group.mauve, errors="coerce").mean()  # NaN when no run has one
        # the standard error of one run's accuracy (the runs share the test set, so their mean is no surer)
        row.update(accuracy=accuracy, f1=group.f1.mean(), mauve=None if math.isnan(mauve) else mauve,
                   accuracy_se=accuracy_standard_error(accuracy, row["n_test"]), runs=len(group),
                   run=", ".join(group.run) if len(group) <= 3 else f"{len(group)} runs")
        grouped.append(row)
    synthetic = frame[frame.source == "synthetic"].copy()
    synthetic["_order"] = synthetic.epsilon.fillna(math.inf)
    synthetic = synthetic.sort_values(["model", "_order", "run"]).drop(columns="_order")
    table = pd.concat([pd.DataFrame(grouped), synthetic], ignore_index=True)
    order = {"real": 0, "zero_shot": 1, "synthetic": 2}
    table = table.sort_values("source", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    return table[columns + ["runs"]]


def dp_train_logs(summaries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The training logs of the DP runs by run name: the curves of the paper's loss figure."""
    return {s["run"]: s["train_log"] for s in summaries if s["train_log"] and s["dp"]}


def _se_or_zero(values: pd.Series) -> list[float]:
    return [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]


def plot_accuracy_vs_epsilon(table: pd.DataFrame, ax: Axes) -> None:
    """Downstream accuracy against epsilon, +-1 standard error; non-DP runs at the right, references as
    lines with a +-1 standard error band. Runs without a privacy record (no epsilon) are not drawn."""
    synthetic = table[(table.source == "synthetic") & table.epsilon.notna()]
    finite = synthetic[synthetic.epsilon.apply(math.isfinite)]
    right = max([1.0, *finite.epsilon.tolist()]) * 1.3
    for model, group in synthetic.groupby("model", dropna=False):
        xs = [e if math.isfinite(e) else right for e in group.epsilon]
        ax.errorbar(xs, group.accuracy, yerr=_se_or_zero(group.accuracy_se), fmt="o", capsize=3,
                    label=f"synthetic ({model})")
    for source, style in (("real", "-"), ("zero_shot", "--")):
        for _, row in table[table.source == source].iterrows():
            ax.axhline(row.accuracy, linestyle=style, color="grey", linewidth=1)
            se = _se_or_zero(pd.Series([row.accuracy_se]))[0]
            if se:
                ax.axhspan(row.accuracy - se, row.accuracy + se, color="grey", alpha=0.12, linewidth=0)
            ax.text(0, row.accuracy, f" {source}", va="bottom", fontsize=8, color="grey")
    ax.axhline(0.5, linestyle=":", color="black", linewidth=0.8)
    if not synthetic.empty and not synthetic.epsilon.apply(math.isfinite).all():
        ax.axvline(right, color="lightgrey", linewidth=0.8)
        ax.text(right, 0.5, " no DP", fontsize=8)
    ax.set_xlim(left=0)  # epsilon starts at 0, where the reference lines are labelled
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel("test accuracy (real test set), +-1 s.e.")
    ax.set_title("Classifier trained on synthetic data")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


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
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.3f}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """The table as Markdown, numbers formatted for reading (counts whole, no DP as "inf (no DP)")."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    whole = [column in WHOLE_NUMBER_COLUMNS for column in table.columns]
    body = ["| " + " | ".join(_format_value(v, w) for v, w in zip(row, whole, strict=True)) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_report(runs_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write table.csv, report.md and the two figures for every run under `runs_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = [summarise_run(p) for p in find_runs(runs_dir) if out_dir not in p.parents]
    table = paper_table(summaries)
    write_text_atomic(out_dir / "table.csv", table.to_csv(index=False))
    plots: dict[str, Callable[[Axes], None]] = {
        "loss_vs_epsilon.png": lambda ax: plot_loss_vs_epsilon(dp_train_logs(summaries), ax=ax, title=LOSS_TITLE),
        "accuracy_vs_epsilon.png": lambda ax: plot_accuracy_vs_epsilon(table, ax),
    }
    figures = {}
    for name, plot in plots.items():
        figure = Figure(figsize=(6.5, 4), layout="tight")
        plot(figure.add_subplot())
        figures[name] = str(save_figure(figure, out_dir / name))
    text = "\n\n".join([
        f"# dpnb report: {len(summaries)} runs under {runs_dir}",
        markdown_table(table) if len(table) else "_No run has finished its evaluate stage yet._",
        COLUMNS_NOTE,
        f"**Privacy.** {SELECTION_WARNING}",
        "![loss against epsilon](loss_vs_epsilon.png)\n\n![accuracy against epsilon](accuracy_vs_epsilon.png)",
    ])
    write_text_atomic(out_dir / "report.md", text + "\n")
    return {"runs": len(summaries), "rows": len(table), "table": table, "figures": figures, "summaries": summaries}
