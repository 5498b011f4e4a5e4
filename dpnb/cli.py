"""`dpnb`: run the pipeline's notebooks headlessly, sweep parameters, and report.

    dpnb run CONFIG [--force] [--stages prepare,finetune] [--set finetune.target_epsilon=3]
    dpnb sweep SWEEP_CONFIG [--jobs N] [--force]
    dpnb report [RUNS_DIR]
    dpnb verify RUN_DIR          recompute the run's epsilon from privacy.json with Opacus
    dpnb models                  list the model presets

`run` executes notebooks 01-04 (and 06 when `audit` is among the stages) with papermill into the run
directory, keeping every executed notebook there. A stage whose outputs are complete is skipped; a
stage that runs makes every later stage run too (its inputs changed); a failed stage stops the run
with its executed notebook kept, and the next `dpnb run` resumes from it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpnb.errors import DpnbError

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = {
    "prepare": "01_prepare.ipynb",
    "finetune": "02_finetune.ipynb",
    "generate": "03_generate.ipynb",
    "evaluate": "04_evaluate.ipynb",
    "audit": "06_audit.ipynb",
}
REPORT_NOTEBOOK = "05_report.ipynb"


def notebook_dir() -> Path:
    """The notebooks shipped with the package ($DPNB_NOTEBOOKS overrides, for installed copies)."""
    path = Path(os.environ.get("DPNB_NOTEBOOKS", REPO / "notebooks"))
    if not (path / NOTEBOOKS["prepare"]).exists():
        raise DpnbError(f"notebooks not found in {path}; run from a dpnb checkout or set DPNB_NOTEBOOKS")
    return path


# --------------------------------------------------------------------------- overrides


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs (dotted keys) with YAML-typed values: `finetune.target_epsilon=3`."""
    import yaml

    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise DpnbError(f"--set {pair!r} must look like section.key=value, e.g. finetune.target_epsilon=3")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


# --------------------------------------------------------------------------- checks before running


def check_environment(run) -> None:  # noqa: ANN001 - RunConfig
    """Fail before any stage starts when the run needs a GPU or a Hub model this machine lacks."""
    from dpnb import models

    if run.requires_gpu:
        import torch

        if not torch.cuda.is_available():
            raise DpnbError(
                f"config '{run.name}' needs a GPU (requires_gpu: true) and torch sees none; run it on a "
                f"GPU machine with a CUDA build of torch (README, 'The paper's configuration'), or use "
                f"configs/demo.yaml on CPU"
            )
    needed = []
    if {"prepare", "finetune", "generate"} & set(run.stages):
        needed.append(run.model)
    if "evaluate" in run.stages:
        needed.append(run.evaluate.classifier)
    for name in needed:
        preset = models.resolve(name)
        if preset.source == "hub" and models.hub_offline() and not _in_hub_cache(preset.location):
            raise DpnbError(
                f"model '{name}' ({preset.location}) is on the Hugging Face Hub, which this machine cannot "
                f"reach, and it is not in the local Hugging Face cache. Run where the Hub is reachable, or "
                f"use the offline presets ({', '.join(models.OFFLINE_PRESETS)}) as configs/demo.yaml does"
            )
    if run.prepare.source == "stanfordnlp/imdb" and "prepare" in run.stages and not os.environ.get("DPNB_DATA_DIR"):
        if models.hub_offline():
            raise DpnbError(
                "the IMDb data set is on the Hugging Face Hub, which this machine cannot reach; set "
                "DPNB_DATA_DIR to a local mirror holding train.csv.gz and test.csv.gz, or set prepare.source "
                "to a local file or directory"
            )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


# --------------------------------------------------------------------------- run


def _child_pids() -> list[int]:
    """Processes this one started (the notebook kernels), read from /proc; empty where there is none."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid():
            children.append(int(stat.parent.name))
    return children


@contextlib.contextmanager
def forward_interrupts() -> Iterator[None]:
    """Pass the first Ctrl-C (or SIGTERM) on to the running kernel, which checkpoints and stops.

    Kernels run in their own session, so a terminal's Ctrl-C never reaches them; without this, the
    fine-tuning stage could not save its state before the run ends. A second Ctrl-C stops at once.
    """
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print("\ninterrupt: the running stage stops at its next safe point and keeps its progress "
              "(Ctrl-C again to stop at once)", flush=True)
        for pid in _child_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:  # the stage may have finished its last step anyway: do not start the next one
        raise KeyboardInterrupt


def execute_stage(stage: str, run_dir: Path, config: dict[str, Any], force: bool, log_output: bool) -> None:
    """Execute one stage's notebook with papermill into the run directory."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out = run_dir / "notebooks" / NOTEBOOKS[stage]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with forward_interrupts():
            papermill.execute_notebook(
                str(notebook_dir() / NOTEBOOKS[stage]), str(out),
                parameters={"run_dir": str(run_dir), "config": config, "force": force},
                kernel_name="python3", cwd=str(Path.cwd()), progress_bar=False, log_output=log_output,
            )
    except PapermillExecutionError as exc:
        raise DpnbError(
            f"stage '{stage}' failed: {exc.ename}: {exc.evalue}. The executed notebook is kept at {out}; "
            f"fix the cause and rerun the same command to resume"
        ) from None


def run_pipeline(config_path: str, overrides: dict[str, Any], force: bool = False,
                 stages: list[str] | None = None, verbose: bool = False) -> Path:
    """Run (or resume) every stage of one config; return its run directory."""
    import yaml

    from dpnb.config import load_run_config, to_dict
    from dpnb.rundir import RunDir, write_text_atomic

    run = load_run_config(config_path, overrides)
    selected = list(stages or run.stages)
    for stage in selected:
        if stage not in NOTEBOOKS:
            raise DpnbError(f"unknown stage {stage!r}; stages are {', '.join(NOTEBOOKS)}")
    check_environment(run)
    run_dir = RunDir(run.run_dir)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir.path / "config.yaml", yaml.safe_dump(to_dict(run), sort_keys=False))
    print(f"run {run.name} -> {run_dir.path}  (stages: {', '.join(selected)})", flush=True)
    started = time.time()
    upstream_ran = False
    for stage in selected:
        stage_config = to_dict(run.stage(stage))
        forced = force or upstream_ran
        if not forced and run_dir.is_complete(stage) and not run_dir.should_run(stage, run.stage(stage)):
            print(f"  {stage:<9} done earlier, skipped", flush=True)
            continue
        t0 = time.time()
        print(f"  {stage:<9} running ...", flush=True)
        execute_stage(stage, run_dir.path, stage_config, forced, log_output=verbose)
        upstream_ran = True
        print(f"  {stage:<9} finished in {time.time() - t0:.0f} s", flush=True)
    print(f"run {run.name} complete in {time.time() - started:.0f} s: {run_dir.path}", flush=True)
    _print_headline(run_dir)
    return run_dir.path


def _print_headline(run_dir) -> None:  # noqa: ANN001 - RunDir
    """The numbers a user looks for first: epsilon spent and downstream accuracy."""
    from dpnb.rundir import read_json

    if run_dir.privacy.exists():
        p = read_json(run_dir.privacy)
        if p.get("dp"):
            print(f"  privacy: epsilon = {p['epsilon']:.3f} ({p['accountant']}), delta = {p['delta']:.2e}, "
                  f"noise multiplier = {p['noise_multiplier']:.3f}, steps = {p['steps']}")
        else:
            print("  privacy: trained WITHOUT differential privacy (no guarantee)")
    if run_dir.metrics.exists():
        metrics = read_json(run_dir.metrics)
        for source in ("real", "synthetic", "zero_shot"):
            m = metrics.get(source)
            if isinstance(m, dict) and m.get("accuracy") is not None:
                print(f"  classifier trained on {source:<9}: accuracy {m['accuracy']:.3f}, F1 {m['f1']:.3f} "
                      f"(n_train {m['n_train']}, n_test {m['n_test']})")


# --------------------------------------------------------------------------- sweep


def expand_sweep(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Expand a sweep file into one override dict per run.

    A sweep file is a run config plus a `sweep:` section:
        sweep:
          name: "eps{finetune.target_epsilon}-seed{seed}"  # run name template (dotted keys)
          grid: {finetune.target_epsilon: [1, 3, 8], seed: [0, 1]}   # cartesian product
          runs: [{finetune.dp: false, name: nodp}]         # extra runs, as they are
    The runs are the grid's combinations (cartesian product), then the explicit `runs`, each a dict
    of overrides taken as it is; a run's name comes from the template unless it sets `name`.
    """
    import yaml

    values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    sweep = values.pop("sweep", None)
    if not isinstance(sweep, dict):
        raise DpnbError(f"{path} has no 'sweep:' section; see configs/sweep-eps.yaml")
    unknown = set(sweep) - {"name", "grid", "runs"}
    if unknown:
        raise DpnbError(f"unknown key(s) {', '.join(sorted(unknown))} in {path} sweep; valid: name, grid, runs")
    grid = sweep.get("grid") or {}
    keys = list(grid)
    combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]
    combos = combos if keys else []
    runs = combos + [dict(extra) for extra in sweep.get("runs") or []]
    if not runs:
        raise DpnbError(f"{path} sweep expands to no runs; give sweep.grid or sweep.runs")
    template = sweep.get("name") or "-".join(f"{{{k}}}" for k in keys) or "run"
    for overrides in runs:
        if "name" not in overrides:
            names = {k: overrides.get(k, _dotted_get(values, k)) for k in _template_keys(template)}
            overrides["name"] = _format_name(template, names)
    names = [r["name"] for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DpnbError(f"{path} sweep gives several runs the same name ({', '.join(duplicates)}); "
                        f"put the varying keys into sweep.name")
    return runs, values


def _template_keys(template: str) -> list[str]:
    import string

    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _format_name(template: str, values: dict[str, Any]) -> str:
    name = template
    for key, value in values.items():
        text = "nodp" if value is False else str(value).replace("/", "_")
        name = name.replace(f"{{{key}}}", text)
    return name


def _dotted_get(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def run_sweep(path: str, jobs: int = 1, force: bool = False) -> list[str]:
    """Run every run of a sweep, `jobs` at a time, each in its own `dpnb run` process.

    Every run's full config is validated before the first one starts (a typo fails in a second, not
    an hour in) and written next to its results as `sweep-config.yaml`; its output goes to
    `dpnb-run.log` there. Rerunning the sweep resumes: completed stages are skipped.
    """
    import yaml

    from dpnb.config import run_config_from_dict, set_dotted, to_dict

    runs, base = expand_sweep(path)
    configs = []
    for overrides in runs:
        merged = yaml.safe_load(yaml.safe_dump(base))
        for key, value in overrides.items():
            set_dotted(merged, key, value)
        where = f"{path} ({overrides['name']})"
        try:
            configs.append(run_config_from_dict(merged, where=where))
        except DpnbError as exc:
            raise DpnbError(f"{where}: {exc}") from None
    total = len(configs)
    print(f"sweep {path}: {total} runs, {jobs} at a time", flush=True)
    pending = list(configs)
    active: list[tuple[str, subprocess.Popen, Any, float]] = []
    failed: list[str] = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            run.run_dir.mkdir(parents=True, exist_ok=True)
            config_file = run.run_dir / "sweep-config.yaml"
            config_file.write_text(yaml.safe_dump(to_dict(run), sort_keys=False), encoding="utf-8")
            cmd = [sys.executable, "-m", "dpnb.cli", "run", str(config_file)] + (["--force"] if force else [])
            log = open(run.run_dir / "dpnb-run.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below
            print(f"[{total - len(pending) - len(active) - 1}/{total} done] start {run.name}", flush=True)
            active.append((run.name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time()))
        time.sleep(1)
        for item in list(active):
            name, proc, log, t0 = item
            if proc.poll() is None:
                continue
            active.remove(item)
            log.close()
            if proc.returncode != 0:
                failed.append(name)
            done = total - len(pending) - len(active)
            status = "ok" if proc.returncode == 0 else f"FAILED (see {log.name})"
            print(f"[{done}/{total} done] {name}: {status} in {time.time() - t0:.0f} s", flush=True)
    if failed:
        raise DpnbError(f"{len(failed)} of {total} runs failed: {', '.join(failed)}; rerun the sweep to resume them")
    return [run.name for run in configs]


# --------------------------------------------------------------------------- report, verify, models


def run_report(runs_dir: str, out: str | None = None) -> Path:
    """Execute notebooks/05_report.ipynb over every run under `runs_dir`."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out_dir = Path(out or Path(runs_dir) / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / REPORT_NOTEBOOK
    try:
        papermill.execute_notebook(
            str(notebook_dir() / REPORT_NOTEBOOK), str(executed),
            parameters={"runs_dir": str(runs_dir), "out_dir": str(out_dir)},
            kernel_name="python3", progress_bar=False,
        )
    except PapermillExecutionError as exc:
        raise DpnbError(f"report failed: {exc.ename}: {exc.evalue} (notebook kept at {executed})") from None
    print(f"report: {out_dir / 'report.md'} (table {out_dir / 'table.csv'}, notebook {executed})")
    return out_dir


def verify(run_dir: str) -> None:
    from dpnb import privacy
    from dpnb.rundir import RunDir, read_json

    record = read_json(RunDir(run_dir).privacy)
    privacy.verify_privacy(record)
    if record.get("dp"):
        print(f"{run_dir}: epsilon {record['epsilon']} recomputed with Opacus's {record['accountant']} accountant "
              f"from noise_multiplier={record['noise_multiplier']}, sample_rate={record['sample_rate']}, "
              f"steps={record['steps']}, delta={record['delta']}: matches")
    else:
        print(f"{run_dir}: trained without DP; privacy.json correctly claims no epsilon")


def list_models() -> None:
    from dpnb.models import describe_presets

    for row in describe_presets():
        print(f"{row['name']:<24} {row['kind']:<10} {row['source']:<8} {row['description']}")


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpnb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) one experiment from a YAML config")
    p.add_argument("config")
    p.add_argument("--force", action="store_true", help="redo stages that already completed")
    p.add_argument("--stages", help="comma-separated subset of stages to run, e.g. prepare,finetune")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--verbose", action="store_true", help="stream the notebooks' output")
    p = sub.add_parser("sweep", help="run a grid of experiments")
    p.add_argument("config")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("report", help="table and figures over every run in a directory")
    p.add_argument("runs_dir", nargs="?", default="runs")
    p.add_argument("--out", help="output directory (default RUNS_DIR/report)")
    p = sub.add_parser("verify", help="recompute a run's epsilon from its privacy.json")
    p.add_argument("run_dir")
    sub.add_parser("models", help="list model presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            stages = args.stages.split(",") if args.stages else None
            run_pipeline(args.config, parse_overrides(args.set), force=args.force, stages=stages,
                         verbose=args.verbose)
        elif args.command == "sweep":
            if args.jobs < 1:
                raise DpnbError("--jobs must be at least 1")
            run_sweep(args.config, jobs=args.jobs, force=args.force)
        elif args.command == "report":
            run_report(args.runs_dir, args.out)
        elif args.command == "verify":
            verify(args.run_dir)
        elif args.command == "models":
            list_models()
    except DpnbError as exc:
        print(f"dpnb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpnb: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
