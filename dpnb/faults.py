"""Test hooks for the fault tests: stop a process dead, or hold it, at a named point of its work.

The fault tests (tests/stages/test_faults.py) need a stage to die in the middle of its work, at a
place they choose, without guessing at timings. The code names such places by calling
`reached(point)`; a test sets `$DPNB_FAULT_AT` to "ACTION POINT[#K]" for the process it starts
(notebook kernels inherit it), and the K-th time (default the first) that process reaches POINT:

    kill       SIGKILL this process: no handler runs, nothing is flushed (the OOM killer, `kill -9`);
    kill-run   SIGKILL the `dpnb run` that started this notebook kernel, then this process (a job
               killed whole by its scheduler);
    hold       write this process's pid to `$DPNB_FAULT_READY`, then wait until it is killed (so a
               test can act while the stage is mid-way, e.g. start a second run on the same directory).

Points: "write NAME" in every atomic writer of `dpnb.io`, after the data is in the temporary file
and before the rename that makes it visible; "finetune step K" after logical step K is logged.
Without `$DPNB_FAULT_AT` (always, outside the tests) `reached` only reads the environment.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV = "DPNB_FAULT_AT"
READY_ENV = "DPNB_FAULT_READY"
ACTIONS = ("kill", "kill-run", "hold")
_seen: dict[str, int] = {}  # times each point was reached in this process


def reached(point: str) -> None:
    """Act as `$DPNB_FAULT_AT` says when it names `point` (see the module docstring); else nothing."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    action, _, target = wanted.partition(" ")
    target, _, nth = target.partition("#")
    if target != point or action not in ACTIONS:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] != int(nth or 1):
        return
    if action == "hold":
        ready = Path(os.environ[READY_ENV])
        ready.with_name(ready.name + ".part").write_text(f"{os.getpid()}\n")
        os.replace(ready.with_name(ready.name + ".part"), ready)  # the test never reads half a pid
        while True:  # until the test kills this process
            time.sleep(0.05)
    if action == "kill-run" and os.environ.get("JPY_PARENT_PID"):
        os.kill(int(os.environ["JPY_PARENT_PID"]), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
