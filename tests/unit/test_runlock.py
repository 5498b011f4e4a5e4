"""dpnb.runlock: one `dpnb run` per run directory; a lock a killed run left does not block.

A run held mid-stage meeting a second `dpnb run`, and a whole run killed with SIGKILL then taken
over, are in tests/stages/test_faults.py; these are the lock's own cases, in one process (flock
locks of two opens of one file exclude each other, as two processes' do).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from dpnb import runlock
from dpnb.errors import DpnbError
from dpnb.runlock import LOCK_FILE, RunLock


def test_a_second_run_on_a_locked_directory_refuses_at_once_naming_the_first(tmp_path):
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run") as first:
        assert first.note is None
        with pytest.raises(DpnbError) as caught:
            RunLock(tmp_path / "run").__enter__()
    message = str(caught.value)
    assert "\n" not in message and f"is in use by another dpnb run (pid {os.getpid()} on host " in message
    assert "started 20" in message and "command: dpnb" in message and "wait for it to finish or stop it" in message
    with RunLock(tmp_path / "run") as again:  # released: the next run takes it without a note
        assert again.note is None
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""


def test_a_refused_start_in_a_new_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path / "new"):
        raise RuntimeError("a bad input found before any stage ran")
    assert not (tmp_path / "new").exists()


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(),
                                                  "started": "2026-12-01T10:00:00+00:00", "command": "dpnb run x"}))
    with RunLock(tmp_path) as lock:  # nobody holds the flock: the record is a killed run's
        assert "ended without releasing it" in lock.note and "command: dpnb run x" in lock.note
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(("holder", "refused"), [
    ("dead pid, this host", False),
    ("live pid, this host", True),
    ("another host", True),  # cannot be checked from here: refused, with how to clear it
])
def test_without_flock_the_record_decides(tmp_path, monkeypatch, holder, refused):
    def no_flock(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    record = {"pid": dead_pid() if holder.startswith("dead") else os.getppid(),
              "host": "elsewhere" if holder == "another host" else socket.gethostname(),
              "started": "2026-12-01T10:00:00+00:00", "command": "dpnb run x"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    if refused:
        with pytest.raises(DpnbError, match=f"if it no longer runs .*delete {tmp_path / LOCK_FILE}"):
            RunLock(tmp_path).__enter__()
    else:
        with RunLock(tmp_path) as lock:
            assert "ended without releasing it" in lock.note
