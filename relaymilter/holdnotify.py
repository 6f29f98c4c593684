"""holdnotify - run the admin's command when relaymilter puts a sender on hold.

NAME
    holdnotify - notify(): [holds] notify, with the hold in its environment

SYNOPSIS
    notify("/usr/local/bin/page-abuse-desk", HoldRequest("user", "alice", "over 3 times ..."),
           expires=1767225600.0)

DESCRIPTION
    An automatic hold (a sender far over its outbound limit) is an
    incident an abuse desk wants to hear about: a ticket, a mail to the
    customer, a page. After the hold is written to the store, notify()
    runs the command named by [holds] notify, once per hold written (so
    once per incident, not once per refused recipient; with shared
    counters, on the one host whose count crossed the line), with:

      RELAYMILTER_HOLD_KIND      client or user
      RELAYMILTER_HOLD_VALUE     the client address or SASL user name
      RELAYMILTER_HOLD_REASON    why ("over 3 times its outbound limit")
      RELAYMILTER_HOLD_EXPIRES   unix time the hold ends, or "" (until removed)
      RELAYMILTER_HOLD_HOST      this host's name

    and nothing on its command line (no shell: the values, which come
    from clients, reach it only as environment variables). It runs on a
    thread of its own: a decision never waits for it. Standard input is
    /dev/null; what it prints and a non-zero exit status are logged at
    WARNING (escaped, the first MAX_OUTPUT characters); one that runs
    longer than TIMEOUT seconds is killed and said to be.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading

from relaymilter.autohold import HoldRequest
from relaymilter.text import one_line

log = logging.getLogger(__name__)

TIMEOUT = 60.0          # seconds a notify command may run
MAX_OUTPUT = 500        # characters of its output put in the log


def notify(command: str, request: HoldRequest, expires: float | None) -> threading.Thread:
    """Run command for the hold of request, on a thread of its own (returned)."""
    environment = {**os.environ,
                   "RELAYMILTER_HOLD_KIND": request.kind,
                   "RELAYMILTER_HOLD_VALUE": request.value,
                   "RELAYMILTER_HOLD_REASON": request.reason,
                   "RELAYMILTER_HOLD_EXPIRES": "" if expires is None else f"{expires:.0f}",
                   "RELAYMILTER_HOLD_HOST": socket.gethostname()}
    thread = threading.Thread(target=_run, args=(command, environment, request),
                              name="relaymilter-notify", daemon=True)
    thread.start()
    return thread


def _run(command: str, environment: dict[str, str], request: HoldRequest) -> None:
    what = f"[holds] notify {command} for {request.kind} {one_line(request.value)}"
    try:
        done = subprocess.run([command], env=environment, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("%s: still running after %.0f s, killed", what, TIMEOUT)
        return
    except OSError as error:
        log.warning("%s: cannot run: %s", what, error.strerror or error)
        return
    output = one_line((done.stdout + done.stderr).decode("utf-8", "replace").strip())
    if done.returncode != 0:
        log.warning("%s: exit status %d%s", what, done.returncode,
                    f": {output[:MAX_OUTPUT]}" if output else "")
    else:
        log.info("%s: done%s", what, f": {output[:MAX_OUTPUT]}" if output else "")
