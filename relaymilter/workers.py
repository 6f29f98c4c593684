"""workers - one policy service socket served by several processes.

NAME
    workers - supervise(): fork N workers on one listening socket, keep them running

SYNOPSIS
    listener = policyd.open_listener(config.policyd.socket, config.policyd.mode)
    return supervise(4, lambda number: serve_worker(number, listener), listener_path)

DESCRIPTION
    CPython decides on one core at a time; [policyd] workers = N runs N
    processes that accept on the one socket the supervisor bound, so
    Postfix's connections spread over N cores (the kernel hands each new
    connection to one waiting worker).

    The supervisor forks the workers before it starts any thread (a fork
    copies only the calling thread: a lock held by another would stay
    held forever in the child) and then only waits, with the daemon
    signals blocked and taken by sigtimedwait(): SIGTERM and SIGINT are
    passed to every worker and the supervisor waits for them (SIGKILL
    after STOP_WAIT seconds), then removes a unix socket; SIGHUP is passed
    on (each worker reloads). A worker that dies otherwise is logged and
    started again after RESTART_DELAY seconds; one that keeps dying within
    STARTUP seconds of its start RAPID_DEATHS times in a row stops the
    service (exit 70): a config that cannot run would fork forever.

    A worker gets SIGTERM when the supervisor dies, however it dies
    (prctl PR_SET_PDEATHSIG): no worker serves unsupervised.

    Each worker is a whole policy service (its own engine, DNS loop, store
    watcher, metrics), numbered from 1. Limits are counted per process
    unless [counters] url is set: cli.py refuses workers > 1 then, when
    the store holds limits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_WAIT = 10.0            # seconds workers get to stop before SIGKILL
RESTART_DELAY = 1.0         # seconds before a dead worker is started again
STARTUP = 5.0               # a worker dying younger than this died at start
RAPID_DEATHS = 5            # in a row: give up
EX_SOFTWARE = 70
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
PR_SET_PDEATHSIG = 1


def supervise(count: int, work: Callable[[int], int], socket_path: str | None = None) -> int:
    """Run work(number) in count forked workers until SIGTERM or SIGINT; see the
    module docstring. socket_path: a unix socket to remove at the end."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    workers: dict[int, tuple[int, float]] = {}     # pid -> (number, started)
    for number in range(1, count + 1):
        _start(number, work, workers)
    log.info("policy service: %d workers (pids %s)", count,
             " ".join(str(pid) for pid in sorted(workers)))
    rapid = 0
    status = 0
    try:
        while True:
            received = signal.sigtimedwait(SIGNALS, 1.0)
            if received is None:
                continue
            if received.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.info("policy service: stopping %d workers", len(workers))
                break
            if received.si_signo == signal.SIGHUP:
                _tell(workers, signal.SIGHUP)
                continue
            for pid, number, code, started in _reaped(workers):
                young = time.monotonic() - started < STARTUP
                rapid = rapid + 1 if young else 0
                log.warning("policy service worker %d (pid %d) ended (%s); %s", number, pid,
                            code, "giving up: it keeps dying at start" if rapid >= RAPID_DEATHS
                            else f"starting it again in {RESTART_DELAY:.0f} s")
                if rapid >= RAPID_DEATHS:
                    status = EX_SOFTWARE
                    break
                time.sleep(RESTART_DELAY)
                _start(number, work, workers)
            if status:
                break
    finally:
        _stop(workers)
        if socket_path is not None:
            try:
                os.unlink(socket_path)
            except OSError:
                pass
    log.info("policy service stopped")
    return status


def _start(number: int, work: Callable[[int], int], workers: dict[int, tuple[int, float]]
           ) -> None:
    pid = os.fork()
    if pid == 0:                # the worker: its own process from here on
        code = 1
        try:
            _end_with_parent()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            code = work(number)
        except BaseException:  # noqa: BLE001 - a worker must never return into the loop
            log.exception("policy service worker %d failed", number)
        finally:
            logging.shutdown()
            os._exit(code)
    workers[pid] = (number, time.monotonic())


def _end_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (SIGKILL, a crash), so that no
    worker goes on serving unsupervised (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot ask to end with the supervisor (prctl): a worker outlives it")
    if os.getppid() == 1:       # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _reaped(workers: dict[int, tuple[int, float]]) -> list[tuple[int, int, str, float]]:
    """The workers that ended: (pid, number, how, started), removed from workers."""
    ended = []
    for pid in list(workers):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done == 0:
            continue
        number, started = workers.pop(pid)
        how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        ended.append((pid, number, how, started))
    return ended


def _tell(workers: dict[int, tuple[int, float]], signum: int) -> None:
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _stop(workers: dict[int, tuple[int, float]]) -> None:
    _tell(workers, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while workers and time.monotonic() < deadline:
        _reaped(workers)
        time.sleep(0.05)
    if workers:
        log.warning("policy service: %d workers still running after %.0f s: killed",
                    len(workers), STOP_WAIT)
        _tell(workers, signal.SIGKILL)
        for pid in list(workers):
            os.waitpid(pid, 0)
            workers.pop(pid)
