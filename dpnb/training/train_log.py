"""train_log.jsonl, the per-step log of a fine-tuning run: written by the loop, read back, and drawn.

One line per logical step: `step`, `epoch`, `epsilon` spent so far (null without DP), `loss` (the
mean loss over the step's Poisson batch, computed during its forward passes with the weights before
the step's update; null when the batch drew no record), `lr`, `wall_s`. Line 0 is the loss before
any update, on a fixed sample of min(N, logical_batch_size) records drawn with the seed, in eval
mode. No batch sizes. The losses are statistics of the private records sampled at each step: they
are outside the DP guarantee (only the weights, and what is sampled from them, are covered).

The loss-against-epsilon figure (`plot_loss_vs_epsilon`, with the moving mean `smoothed`) is drawn
by the finetune stage for one run and by the report for many.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt

from dpnb.io import read_jsonl, write_text_atomic
from dpnb.rundir import RunDir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def read_train_log(path: str | os.PathLike | RunDir) -> list[dict[str, Any]]:
    """The records of train_log.jsonl (`path` may be the file, the directory holding it, or a RunDir)."""
    if isinstance(path, RunDir):
        return read_jsonl(path.train_log)
    return read_jsonl(RunDir(path).train_log if os.path.isdir(path) else path)


def truncate_log(path: os.PathLike, length: int) -> None:
    """Keep the first `length` lines: steps after the checkpoint are redone, exactly as before."""
    kept = read_jsonl(path)[:length]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def report_step(say: Callable[..., Any], record: dict[str, Any], total: int) -> None:
    """Print a log line as progress: about 50 lines a run, and always the last step."""
    every = max(1, total // 50)
    if record["step"] % every and record["step"] != total:
        return
    loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
    eps = "" if record["epsilon"] is None else f"  epsilon {record['epsilon']:.3f}"
    say(f"step {record['step']}/{total}  epoch {record['epoch']:.2f}  loss {loss}{eps}  ({record['wall_s']:.0f} s)",
        flush=True)


def plot_loss_vs_epsilon(logs: Mapping[str, Sequence[dict[str, Any]]] | Sequence[dict[str, Any]],
                         ax: Axes | None = None, title: str = "") -> Figure:
    """Training loss against the epsilon spent so far (the paper's figure); one curve per log.

    `logs` is one train log (a list of its records) or several by name (labelled curves, e.g. one
    per run of a report). Steps that drew no record (loss null) are left out. A DP log is drawn
    against epsilon; when no log is private, they are drawn against the step instead (epsilon is
    infinite), and beside DP logs a non-DP one is left out (it has no epsilon to place it on).
    Draws on `ax` when given, else on a new figure; returns the figure.
    """
    named = dict(logs) if isinstance(logs, Mapping) else {"": logs}
    curves = {name: [r for r in log if r.get("loss") is not None] for name, log in named.items()}
    curves = {name: points for name, points in curves.items() if points}
    private = {name: all(r.get("epsilon") is not None for r in points) for name, points in curves.items()}
    against_epsilon = any(private.values()) or not curves
    created = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        if against_epsilon and not private[name]:
            continue
        xs = [r["epsilon"] if against_epsilon else r["step"] for r in points]
        losses = [r["loss"] for r in points]
        # each point is one Poisson batch's mean loss: noisy; the smoothed line shows the trend through it
        dots = ax.plot(xs, losses, marker="o", markersize=2.5, linewidth=0, alpha=0.35,
                       label=f"{name}: each step" if name else "each step's batch")
        if len(points) >= 4:
            ax.plot(xs, smoothed(losses), linewidth=2, color=dots[0].get_color(),
                    label=f"{name}: smoothed" if name else f"smoothed (moving mean of {smoothing_window(len(losses))})")
    ax.set_xlabel("epsilon spent" if against_epsilon else "logical step (no DP: epsilon is infinite)")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title(title or ("Training loss against epsilon" if against_epsilon else "Training loss (no DP)"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if created:
        ax.figure.tight_layout()
    return ax.figure


def smoothing_window(n: int) -> int:
    """Steps averaged by `smoothed`: about a tenth of the run, odd, at least 3."""
    return max(3, (n // 10) | 1)


def smoothed(values: Sequence[float]) -> list[float]:
    """A centred moving mean over `smoothing_window(len(values))` steps (shorter at the ends).

    A per-step loss is the mean over one Poisson-sampled batch: its spread hides a slow fall. The
    window shrinks symmetrically at the ends, so the first and last points are their own values'
    neighbourhood, not a lag.
    """
    half = smoothing_window(len(values)) // 2
    out = []
    for i in range(len(values)):
        reach = min(half, i, len(values) - 1 - i)
        window = values[i - reach : i + reach + 1]
        out.append(sum(window) / len(window))
    return out
