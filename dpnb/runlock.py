"""One `dpnb run` per run directory at a time: a lock held from the first check to the last stage.

Two runs in one directory would interleave their work: two DP trainings of the same records
logging into one train_log.jsonl, and a privacy.json that states the (epsilon, delta) of one of
them while the directory holds both. So `dpnb run` takes `<run>/dpnb-run.lock` first and keeps it
until it ends; a second `dpnb run` on the same directory refuses at once with one line naming the
one that runs (pid, host, start time, command).

The lock is the kernel's (`flock` on the file), so it ends with the process that holds it, however
that process ends: a run killed with SIGKILL leaves no lock behind, only its record in the file,
which the next run reports when it takes over. Where the file system has no `flock`, the record
decides instead: a holder on this host whose pid is gone is taken over; a live one, or one on
another host (which cannot be checked from here), refuses.

Under torchrun only rank 0 runs the pipeline, so only it takes the lock; the other ranks join its
finetune stage and never touch it. `dpnb sweep` runs each run in its own directory, each with its
own lock (what the runs share, `<runs_dir>/shared/`, has its own rules: `dpnb.io.publish_once` and
`dpnb.training.prefix_cache.building_lock`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import IO, Any

from dpnb.errors import DpnbError

LOCK_FILE = "dpnb-run.lock"


def holder_record() -> dict[str, Any]:
    """Who holds the lock: this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["dpnb", *sys.argv[1:]]) if sys.argv else "dpnb"}


def describe(record: dict[str, Any]) -> str:
    return (f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}, "
            f"command: {record.get('command')}")


def _read_record(handle: IO[str]) -> dict[str, Any] | None:
    handle.seek(0)
    text = handle.read().strip()
    try:
        record = json.loads(text) if text else None
    except json.JSONDecodeError:  # a holder killed while writing its record
        return {"pid": None, "host": None, "started": None, "command": "unknown (record unreadable)"}
    return record if isinstance(record, dict) else None


def _alive_here(record: dict[str, Any]) -> bool:
    """Whether the holder may still run: True unless it is on this host and its pid is gone."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that pid
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` holds the run directory's lock, or raises a one-line `DpnbError`.

    `note` says, after entering, whether a lock left by a killed run was taken over. A run directory
    that the lock itself created and that holds nothing else on leaving is removed again, so a run
    refused by its first checks leaves no trace.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.note: str | None = None
        self._handle: IO[str] | None = None
        self._created_dir = False

    def __enter__(self) -> RunLock:
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            previous = self._lock(handle)
            if previous is not None and previous.get("pid") != os.getpid():
                self.note = (f"note: {self.run_dir} was locked by a dpnb run that ended without releasing it "
                             f"({describe(previous)}), killed perhaps; this run takes it over")
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder_record()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            handle.close()
            self._remove_if_untouched()
            raise
        self._handle = handle
        return self

    def _lock(self, handle: IO[str]) -> dict[str, Any] | None:
        """Take the lock; return the record a previous holder left (None when it released cleanly)."""
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(_read_record(handle)) from None
        except OSError as exc:  # no flock on this file system: judge by the record alone
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            previous = _read_record(handle)
            if previous is not None and _alive_here(previous):
                raise self._busy(previous, checked=False) from None
            return previous
        return _read_record(handle)

    def _busy(self, record: dict[str, Any] | None, checked: bool = True) -> DpnbError:
        holder = describe(record) if record else "its record is not written yet"
        fix = ("wait for it to finish or stop it, then rerun; two runs in one directory would mix their outputs"
               if checked else f"if it no longer runs (this file system cannot tell), delete {self.path} and rerun")
        return DpnbError(f"{self.run_dir} is in use by another dpnb run ({holder}): {fix}")

    def __exit__(self, *exc: object) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.seek(0)
        handle.truncate()  # an empty record: released cleanly
        handle.close()  # closing releases the flock
        self._remove_if_untouched()

    def _remove_if_untouched(self) -> None:
        if self._created_dir and [p.name for p in self.run_dir.iterdir()] in ([], [LOCK_FILE]):
            self.path.unlink(missing_ok=True)
            self.run_dir.rmdir()

