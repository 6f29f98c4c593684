"""procs - a process's children and whether one lives, from /proc (Linux).

NAME
    procs - children(pid), alive(pid): for fixtures and tests that fork and kill;
    wait_ready(): a server fixture's start, until it answers

DESCRIPTION
    A zombie (dead, not yet reaped by its parent, which is often PID 1
    here, a parent that may never reap) counts as not alive and as no
    child: it serves nothing and holds no socket.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state first."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """The live processes whose parent is pid, in pid order."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return sorted(found)


def wait_ready(process: subprocess.Popen, ready: Callable[[], bool], timeout: float,
               stop: Callable[[], None], failure: Callable[[str], Exception],
               log_tail: Callable[[], str], step: float = 0.02) -> None:
    """Return once ready() says a server started as process answers; raise
    failure(message), the log's tail in it, when the process exits first or
    timeout seconds pass (then stop() it)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise failure(f"exited with {process.returncode}:\n{log_tail()}")
        if time.monotonic() > deadline:
            stop()
            raise failure(f"not answering after {timeout:.0f} s:\n{log_tail()}")
        time.sleep(step)
