"""The pipeline: a run config's stage notebooks executed headlessly with papermill, in order.

`run_pipeline` executes the notebooks of the selected stages (`dpnb.registry.STAGES`: 01-04, and
06 when `audit` is among them) into the run directory, keeping every executed notebook there.
Whether a stage runs is decided only by the run directory (`RunDir.is_current`): a stage whose
outputs are current is skipped; a stage that runs makes every later stage run too (its inputs
changed); a completed stage with a different config is refused unless forced; a failed stage stops
the run with its executed notebook kept, and the same command resumes.

A stage's parameters reach its notebook as a plain dict (`to_dict` of the validated stage config),
which the notebook turns back into the config with `dpnb.notebook.open_stage`.

Under torchrun (`torchrun --nproc_per_node=N -m dpnb.cli run config.yaml`, `dpnb.training.distributed`) rank 0
runs the pipeline as above, except the finetune stage: rank 0 tells the other ranks, which wait
for it, to join, and every rank runs `stages.finetune.run_stage` in its own process (a notebook
kernel could not join the process group); rank 0 then executes the finetune notebook, which finds
the stage complete and current and only shows it. The other ranks exit after fine-tuning, or at
once when rank 0 has no fine-tuning to run; the other stages run on rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import papermill
import torch
from huggingface_hub import try_to_load_from_cache
from nbclient.exceptions import DeadKernelError
from papermill.exceptions import PapermillExecutionError

from dpnb import models, registry
from dpnb.config import SOURCE_NAMES, FinetuneConfig, build
from dpnb.errors import DpnbError
from dpnb.io import read_json, remove_stale_temporaries, write_text_atomic
from dpnb.notebook import HOME_ENV
from dpnb.runconfig import RunConfig, load_run_config, to_dict, to_yaml
from dpnb.rundir import RunDir
from dpnb.runlock import RunLock
from dpnb.training import distributed
from dpnb.training.plan import plan_training

REPO = Path(__file__).resolve().parent.parent


def notebook_dir() -> Path:
    """The notebooks shipped with the package ($DPNB_NOTEBOOKS overrides, for installed copies)."""
    path = Path(os.environ.get("DPNB_NOTEBOOKS", REPO / "notebooks"))
    if not (path / registry.STAGES["prepare"].notebook).exists():
        raise DpnbError(f"notebooks not found in {path}; run from a dpnb checkout or set DPNB_NOTEBOOKS")
    return path


# --------------------------------------------------------------------------- checks before running


def check_environment(run: RunConfig) -> None:
    """Fail before any stage starts when the run needs a GPU or a Hub model this machine lacks."""
    if run.requires_gpu and not torch.cuda.is_available():
        raise DpnbError(
            f"config '{run.name}' needs a GPU (requires_gpu: true) and torch sees none; run it on a "
            f"GPU machine with a CUDA build of torch (docs/gpu.md), or use "
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
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id or cache reads as "not cached": the check above then explains
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


@contextlib.contextmanager
def _kernel_home() -> Iterator[None]:
    """Kernels started inside read relative run paths from this process's working directory.

    `dpnb.notebook.open_stage` reads a relative `run_dir` from `$DPNB_HOME` (else the dpnb
    checkout): set to where `dpnb run` was started, it means what the user typed.
    """
    previous = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(Path.cwd())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = previous


# The kernel's own log (e.g. its "running over TCP without encryption" warning on every start) is noise
# in a run's output; its errors still show.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


def _not_kernel_died(record: logging.LogRecord) -> bool:
    """A dead kernel is `execute_stage`'s one line of error; papermill's log line about it would be a second."""
    return not record.getMessage().startswith("Kernel died")


def execute_stage(stage: str, run_dir: Path, config: dict[str, Any], force: bool, log_output: bool) -> None:
    """Execute one stage's notebook with papermill into the run directory."""
    out = RunDir(run_dir).executed_notebook(stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill_log = logging.getLogger("papermill")
    papermill_log.addFilter(_not_kernel_died)
    try:
        with forward_interrupts(), _kernel_home():
            papermill.execute_notebook(
                str(notebook_dir() / registry.stage(stage).notebook), str(out),
                parameters={"run_dir": str(run_dir), "config": config, "force": force},
                kernel_name="python3", cwd=str(Path.cwd()), progress_bar=False, log_output=log_output,
                extra_arguments=KERNEL_ARGUMENTS,
            )
    except PapermillExecutionError as exc:
        raise DpnbError(
            f"stage '{stage}' failed: {exc.ename}: {exc.evalue}. The executed notebook is kept at {out}; "
            f"fix the cause and rerun the same command to resume"
        ) from None
    except DeadKernelError:
        raise DpnbError(
            f"stage '{stage}' stopped: its notebook kernel died (killed, by the out-of-memory killer or kill -9 "
            f"perhaps); what it finished is kept and nothing half-written is read: rerun the same command to "
            f"resume (with less memory in use, if it ran out)"
        ) from None
    finally:
        papermill_log.removeFilter(_not_kernel_died)


class FinetunePeers:
    """Rank 0's word to the other ranks under torchrun: join this finetune stage, or nothing to do.

    The other ranks wait in `join_finetune` for exactly one message; leaving the block without
    having sent one (no fine-tuning to run, or an error on rank 0) sends "nothing to do", so that
    no rank waits for a stage that will not come.
    """

    def __init__(self) -> None:
        self.told = False

    def tell(self, order: dict[str, Any] | None) -> None:
        if not self.told and distributed.is_distributed():
            distributed.broadcast_from_main(order)
        self.told = True

    def __enter__(self) -> FinetunePeers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tell(None)


def join_finetune() -> Path | None:
    """A rank other than 0: wait for rank 0's word, train with it when told to; return the run directory."""
    print(f"dpnb: {distributed.describe()}: waiting for rank 0 to reach the finetune stage", flush=True)
    order = distributed.broadcast_from_main()
    if order is None:
        print(f"dpnb: {distributed.describe()}: rank 0 has no fine-tuning for this process; exiting", flush=True)
        return None
    from dpnb.stages import finetune  # the stage module, loaded only by the ranks that train

    run_dir = RunDir(order["run_dir"])
    print(f"dpnb: {distributed.describe()}: fine-tuning {run_dir.path} with rank 0", flush=True)
    finetune.run_stage(run_dir, build(FinetuneConfig, order["config"]), force=order["force"])
    print(f"dpnb: {distributed.describe()}: fine-tuning done; rank 0 runs the rest", flush=True)
    return run_dir.path


def finetune_across_ranks(run_dir: RunDir, cfg: FinetuneConfig, force: bool, verbose: bool,
                          peers: FinetunePeers) -> None:
    """Rank 0's side of the finetune stage under torchrun: train with every rank, then show the notebook."""
    from dpnb.stages import finetune  # as in join_finetune

    peers.tell({"run_dir": str(run_dir.path.resolve()), "config": to_dict(cfg), "force": force})
    print(f"  {'finetune':<9} training in {distributed.world_size()} processes (rank 0 writes the outputs) ...",
          flush=True)
    finetune.run_stage(run_dir, cfg, force=force)
    # complete and current now: the notebook reads the stage's outputs and shows them, training nothing
    execute_stage("finetune", run_dir.path, to_dict(cfg), False, log_output=verbose)


def run_pipeline(config_path: str, overrides: dict[str, Any], force: bool = False,
                 stages: list[str] | None = None, verbose: bool = False) -> Path | None:
    """Run (or resume) every stage of one config; return its run directory.

    Under torchrun, rank 0 runs the stages and the other ranks join its finetune stage only (the
    module docstring); they return the run directory, or None when there was nothing to join.
    """
    if not distributed.launched_by_torchrun():
        return run_stages(config_path, overrides, force, stages, verbose)
    with distributed.process_group():
        if not distributed.is_main_process():
            return join_finetune()
        others = "rank 1 joins" if distributed.world_size() == 2 else f"ranks 1-{distributed.world_size() - 1} join"
        print(f"dpnb: torchrun with {distributed.world_size()} processes: rank 0 runs the pipeline, {others} "
              f"its finetune stage", flush=True)
        with FinetunePeers() as peers:
            return run_stages(config_path, overrides, force, stages, verbose, peers)


def run_stages(config_path: str, overrides: dict[str, Any], force: bool = False, stages: list[str] | None = None,
               verbose: bool = False, peers: FinetunePeers | None = None) -> Path:
    """The stages of one config in order, each as its notebook (the finetune stage with `peers`, when given).

    Whatever can be checked is checked before anything in the run directory changes: the config,
    the machine (`check_environment`), the directory's lock (`dpnb.runlock`, held to the end) and
    format, which stages are done or refused (`stages_to_run`), and the data the stages about to run
    would read (`check_inputs`). Temporary files that a killed run left are removed under the lock.
    """
    run = load_run_config(config_path, overrides)
    selected = list(stages or run.stages)
    for name in selected:
        registry.stage(name)  # an unknown stage fails here, before any work
    check_environment(run)
    run_dir = RunDir(run.run_dir)
    with RunLock(run_dir.path) as lock:
        if lock.note:
            print(lock.note, flush=True)
        removed = remove_stale_temporaries(run_dir.path)
        if removed:
            print(f"removed {removed} temporary file(s) that an interrupted run left in {run_dir.path}", flush=True)
        run_dir.require_compatible()
        check_inputs(run, run_dir, stages_to_run(run, run_dir, selected, force))
        write_text_atomic(run_dir.config_file, to_yaml(run))
        return _run_in_order(run, run_dir, selected, force, verbose, peers)


def stages_to_run(run: RunConfig, run_dir: RunDir, selected: list[str], force: bool) -> list[str]:
    """The selected stages that will run: all when forced, else from the first one not current on.

    A stage that runs makes every later one run too (its inputs change). A completed stage with
    another config is refused here (`RunDir.is_current`), before anything is written.
    """
    if force:
        return list(selected)
    for index, name in enumerate(selected):
        if not run_dir.is_current(name, run.stage(name)):
            return list(selected[index:])
    return []


def check_inputs(run: RunConfig, run_dir: RunDir, to_run: list[str]) -> None:
    """The stages' own checks of their data and of the N-dependent settings, made before any stage starts.

    Prepare's (`stages.prepare.check_data`: columns, encoding, labels, classes, empty texts,
    max_length) reads the source, and fine-tuning's plan (`dpnb.training.plan.plan_training`: the logical
    batch and delta against N) needs only N: a bad input fails in seconds, as one line, with nothing written.
    """
    if "prepare" in to_run:
        from dpnb.stages.prepare import check_data  # only a run that prepares loads the stage (datasets, pandas)

        n_train = check_data(run.prepare)
    elif run_dir.is_complete("prepare") and run_dir.manifest.exists():
        n_train = int(read_json(run_dir.manifest)["n_train"])
    else:
        return  # the stage that needs prepare says so
    if "finetune" in to_run:
        plan_training(run.finetune, n_train)


def _run_in_order(run: RunConfig, run_dir: RunDir, selected: list[str], force: bool, verbose: bool,
                  peers: FinetunePeers | None) -> Path:
    print(f"run {run.name} -> {run_dir.path}  (stages: {', '.join(selected)})", flush=True)
    started = time.time()
    upstream_ran = False
    if peers is not None and "finetune" not in selected:
        peers.tell(None)  # the other ranks need not wait for the stages rank 0 runs alone
    for name in selected:
        cfg = run.stage(name)
        forced = force or upstream_ran
        if not forced and run_dir.is_current(name, cfg):
            print(f"  {name:<9} done earlier, skipped", flush=True)
            if name == "finetune" and peers is not None:
                peers.tell(None)
            continue
        t0 = time.time()
        if name == "finetune" and peers is not None:
            finetune_across_ranks(run_dir, cfg, forced, verbose, peers)
        else:
            print(f"  {name:<9} running ...", flush=True)
            execute_stage(name, run_dir.path, to_dict(cfg), forced, log_output=verbose)
        upstream_ran = True
        print(f"  {name:<9} finished in {time.time() - t0:.0f} s", flush=True)
    print(f"run {run.name} complete in {time.time() - started:.0f} s: {run_dir.path}", flush=True)
    for line in headline(run_dir):
        print(line)
    return run_dir.path


def headline(run_dir: RunDir) -> list[str]:
    """The numbers a user looks for first: epsilon spent and downstream accuracy, as lines to print."""
    lines = []
    if run_dir.privacy.exists():
        p = read_json(run_dir.privacy)
        if p.get("dp"):
            lines.append(f"  privacy: epsilon = {p['epsilon']:.3f} ({p['accountant']}), delta = {p['delta']:.2e}, "
                         f"noise multiplier = {p['noise_multiplier']:.3f}, steps = {p['steps']}")
        else:
            lines.append("  privacy: trained WITHOUT differential privacy (no guarantee)")
    if run_dir.metrics.exists():
        metrics = read_json(run_dir.metrics)
        for source in SOURCE_NAMES:
            m = metrics.get(source)
            if isinstance(m, dict) and m.get("accuracy") is not None:
                mauve = f", MAUVE {m['mauve']:.3f}" if m.get("mauve") is not None else ""
                epsilon = f", epsilon {m['epsilon']:.3g}" if m.get("epsilon") is not None else ""
                lines.append(f"  classifier trained on {source:<13}: accuracy {m['accuracy']:.3f}, F1 {m['f1']:.3f}"
                             f"{mauve}{epsilon} (n_train {m['n_train']}, n_test {m['n_test']})")
    return lines


# --------------------------------------------------------------------------- report


def run_report(runs_dir: str, out: str | None = None) -> Path:
    """Execute notebooks/05_report.ipynb over every run under `runs_dir`."""
    out_dir = Path(out or Path(runs_dir) / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / registry.REPORT_NOTEBOOK
    try:
        with _kernel_home():
            papermill.execute_notebook(
                str(notebook_dir() / registry.REPORT_NOTEBOOK), str(executed),
                parameters={"runs_dir": str(runs_dir), "out_dir": str(out_dir)},
                kernel_name="python3", progress_bar=False, extra_arguments=KERNEL_ARGUMENTS,
            )
    except PapermillExecutionError as exc:
        raise DpnbError(f"report failed: {exc.ename}: {exc.evalue} (notebook kept at {executed})") from None
    print(f"report: {out_dir / 'report.md'} (table {out_dir / 'table.csv'}, notebook {executed})")
    return out_dir


def refresh_notebooks(names: list[str] | None = None) -> list[Path]:
    """Execute the committed notebooks in place, as a reader's *Run all* would (for maintainers).

    Each runs with its committed parameters (so stages 01-04 and 06 read `runs/demo`, 05
    `runs/cpu-long`, none recomputes anything), its kernel started in notebooks/ as JupyterLab
    starts it, relative paths read from this working directory. Its outputs become the ones the
    repository ships; a notebook whose run is missing fails with the command that makes it.
    """
    folder = notebook_dir()
    chosen = names or sorted(p.name for p in folder.glob("0*.ipynb"))
    done = []
    with _kernel_home():
        for name in chosen:
            path = folder / name
            try:
                papermill.execute_notebook(str(path), str(path), kernel_name="python3", cwd=str(folder),
                                           progress_bar=False, extra_arguments=KERNEL_ARGUMENTS)
            except PapermillExecutionError as exc:
                raise DpnbError(f"{name} failed: {exc.ename}: {exc.evalue}") from None
            print(f"  {name}: outputs refreshed", flush=True)
            done.append(path)
    return done
