"""Sweeps: one run config expanded into many runs (a grid and explicit runs), run as `dpnb run`s.

A sweep file is a run config plus a `sweep:` section:

    sweep:
      name: "eps{finetune.target_epsilon}-seed{seed}"  # run name template (dotted keys)
      grid: {finetune.target_epsilon: [1, 3, 8], seed: [0, 1]}   # cartesian product
      runs: [{finetune.dp: false, name: nodp}]         # extra runs, as they are

Every run's full config is validated before the first one starts, and each run is its own
`dpnb run` process, so one run's failure never stops the others and a rerun of the sweep resumes.

Parallel runs: `--jobs N` runs N at a time; when the runs use GPUs each job gets a GPU of its own
(CUDA_VISIBLE_DEVICES) and N above the number of visible GPUs is refused; on the CPU each job gets
its share of the cores (`cpu_threads`). `--print-commands` prints
one `dpnb run` command per run instead, for a cluster scheduler (a SLURM job array, say). The runs
share `<runs_dir>/shared/` (`dpnb.rundir.shared_store`) either way.
"""

from __future__ import annotations

import copy
import itertools
import os
import shlex
import string
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from dpnb.errors import DpnbError
from dpnb.io import write_text_atomic
from dpnb.runconfig import RunConfig, read_config_values, run_config_from_dict, set_dotted, to_yaml
from dpnb.rundir import SHARED_STORE_ENV, RunDir


def expand_sweep(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Expand a sweep file into one override dict per run, and the base config they override.

    The runs are the grid's combinations (cartesian product), then the explicit `runs`, each a dict
    of overrides taken as it is; a run's name comes from the template unless it sets `name`.
    """
    values = read_config_values(path)
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


def sweep_configs(path: str) -> list[RunConfig]:
    """Every run of a sweep as a validated RunConfig; an invalid run is an error naming it."""
    runs, base = expand_sweep(path)
    configs = []
    for overrides in runs:
        merged = copy.deepcopy(base)
        for key, value in overrides.items():
            set_dotted(merged, key, value)
        where = f"{path} ({overrides['name']})"
        try:
            configs.append(run_config_from_dict(merged, where=where))
        except DpnbError as exc:
            raise DpnbError(f"{where}: {exc}") from None
    return configs


def _template_keys(template: str) -> list[str]:
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


def _write_run_config(run: RunConfig) -> RunDir:
    """Keep the run's full config beside its results (`sweep-config.yaml`): what `dpnb run` is given."""
    run_dir = RunDir(run.run_dir)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir.sweep_config, to_yaml(run))
    return run_dir


def cpu_threads(jobs: int, environ: Mapping[str, str], cores: int | None) -> dict[str, str]:
    """The thread setting each of `jobs` parallel CPU runs gets: the cores shared out, one at least.

    Two runs that each start one OpenMP thread per core compete for every core, and OpenMP's threads
    spin while they wait for each other: measured on 2 cores, a run beside another ran 10-100 times
    slower, while runs of one thread each, side by side, took 1.3-2.4 times as long as one run alone
    on both cores (the demo: 12-22 minutes against 9). A thread count the user set (OMP_NUM_THREADS)
    is kept; one job keeps the library's default.
    """
    if jobs <= 1 or "OMP_NUM_THREADS" in environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (cores or 1) // jobs))}


def _start_run(run: RunConfig, force: bool, gpu: str | None, jobs: int = 1) -> tuple[subprocess.Popen, IO[str]]:
    """Start `dpnb run` on one sweep run (on GPU `gpu` alone, when given), its output in dpnb-run.log."""
    run_dir = _write_run_config(run)
    cmd = [sys.executable, "-m", "dpnb.cli", "run", str(run_dir.sweep_config)] + (["--force"] if force else [])
    log = open(run_dir.run_log, "a", encoding="utf-8")  # noqa: SIM115 - closed when the run ends
    env = {**os.environ, SHARED_STORE_ENV: str(shared_dir(run))}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu  # the job sees one GPU, as cuda:0
    else:
        env.update(cpu_threads(jobs, os.environ, os.cpu_count()))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def visible_gpus(environ: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The GPUs this process may hand out, as CUDA_VISIBLE_DEVICES entries: the ones it already names,
    else 0..count-1 (`count` defaults to torch's device count)."""
    environ = os.environ if environ is None else environ
    named = environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [entry.strip() for entry in named.split(",") if entry.strip() and entry.strip() != "-1"]
    count = torch.cuda.device_count() if count is None else count
    return [str(i) for i in range(count)]


def uses_gpu(run: RunConfig) -> bool:
    """Whether any stage of the run may take a GPU (device cuda, or auto with one present)."""
    devices = {getattr(run.stage(stage), "device", "cpu") for stage in run.stages}
    return "cuda" in devices or ("auto" in devices and torch.cuda.is_available())


def gpu_slots(configs: list[RunConfig], jobs: int, gpus: list[str]) -> list[str | None]:
    """One slot per parallel job: its own GPU when the runs use GPUs, else None (the CPU).

    Two jobs on one GPU would compete for its memory (each run sizes its batches for a whole GPU), so
    more jobs than GPUs is refused.
    """
    if not any(uses_gpu(run) for run in configs) or not gpus:
        return [None] * jobs
    if jobs > len(gpus):
        raise DpnbError(f"--jobs {jobs} asks for more parallel runs than the {len(gpus)} GPU(s) visible "
                        f"({','.join(gpus)}): each run takes a GPU of its own; use --jobs {len(gpus)} or fewer, or "
                        f"--print-commands to spread the runs over a cluster")
    return gpus[:jobs]


def sweep_commands(path: str, force: bool = False) -> list[str]:
    """One shell command per run, to hand to a scheduler (a SLURM job array, say): each run's config is
    written beside its results, and every command shares the sweep's store (`shared_dir`)."""
    commands = []
    for run in sweep_configs(path):
        run_dir = _write_run_config(run)
        command = ["dpnb", "run", str(run_dir.sweep_config.resolve())] + (["--force"] if force else [])
        commands.append(f"{SHARED_STORE_ENV}={shlex.quote(str(shared_dir(run)))} {shlex.join(command)}")
    return commands


def shared_dir(run: RunConfig) -> Path:
    """Where the runs of a sweep share what they would each compute alike: `<runs_dir>/shared`."""
    return Path(run.runs_dir).resolve() / "shared"


def run_sweep(path: str, jobs: int = 1, force: bool = False) -> list[str]:
    """Run every run of a sweep, `jobs` at a time, each in its own `dpnb run` process.

    Every run's full config is validated before the first one starts (a typo fails in a second, not
    an hour in) and written next to its results as `sweep-config.yaml`; its output goes to
    `dpnb-run.log` there. The runs share `<runs_dir>/shared/` (`dpnb.rundir.shared_store`): a
    frozen-prefix cache or a zero-shot set that one run computed is reused by the next run that
    would compute it alike (same key), not computed again. Rerunning the sweep resumes: completed stages are skipped.
    """
    configs = sweep_configs(path)
    total = len(configs)
    free = gpu_slots(configs, jobs, visible_gpus())
    where = f" on GPU(s) {','.join(s for s in free if s is not None)}" if free[0] is not None else ""
    print(f"sweep {path}: {total} runs, {jobs} at a time{where}", flush=True)
    pending = list(configs)
    active: list[tuple[str, subprocess.Popen, IO[str], float, str | None]] = []
    failed: list[str] = []
    while pending or active:
        while pending and len(active) < jobs:
            run, gpu = pending.pop(0), free.pop(0)
            on = f" on GPU {gpu}" if gpu is not None else ""
            print(f"[{total - len(pending) - len(active) - 1}/{total} done] start {run.name}{on}", flush=True)
            proc, log = _start_run(run, force, gpu, jobs)
            active.append((run.name, proc, log, time.time(), gpu))
        time.sleep(1)
        for item in list(active):
            name, proc, log, t0, gpu = item
            if proc.poll() is None:
                continue
            active.remove(item)
            free.append(gpu)
            log.close()
            if proc.returncode != 0:
                failed.append(name)
            done = total - len(pending) - len(active)
            status = "ok" if proc.returncode == 0 else f"FAILED (see {log.name})"
            print(f"[{done}/{total} done] {name}: {status} in {time.time() - t0:.0f} s", flush=True)
    if failed:
        raise DpnbError(f"{len(failed)} of {total} runs failed: {', '.join(failed)}; rerun the sweep to resume them")
    return [run.name for run in configs]
