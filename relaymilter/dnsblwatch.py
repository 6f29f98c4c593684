"""dnsblwatch - the life of the DNSBL checker in force: health checks, retirement.

NAME
    dnsblwatch - keeps RFC 5782 health checks on the checker in force, and
    closes a checker a reload replaced once nobody can still need it

SYNOPSIS
    watch = DnsblWatch()
    watch.start(snapshot)                # first health round now, then periodic
    watch.follow(previous, snapshot)     # after every snapshot swap
    watch.stop(snapshot)

DESCRIPTION
    A reload that changes [dnsbl] or [cache] builds a new checker
    (reload.py). The health monitor (dnsbl.HealthMonitor) of the old one is
    stopped and one for the new checker started, if health checks were
    started at all (`relaymilter run` and `policyd` start them; `lookup`
    does not). The old checker is closed a grace period later, so that
    sessions that started lookups on it can still collect them.

    Called from one thread: the runtime's watcher (follow) and the thread
    that starts and stops the daemon (start, stop).
"""

from __future__ import annotations

import threading

from relaymilter.dnsbl import HealthMonitor
from relaymilter.engine import Snapshot

GRACE_SECONDS = 1.0     # past the old checker's [dnsbl] timeout


class DnsblWatch:
    """See the module docstring."""

    def __init__(self) -> None:
        self._checking = False
        self._monitor: HealthMonitor | None = None

    def start(self, snapshot: Snapshot) -> None:
        """Start health checks, for this snapshot's checker and every later one."""
        self._checking = True
        self._start_monitor(snapshot)

    def follow(self, previous: Snapshot, snapshot: Snapshot) -> None:
        """snapshot replaced previous: move the health checks, retire an old checker."""
        if previous.dnsbl is snapshot.dnsbl:
            return
        self._stop_monitor()
        self._start_monitor(snapshot)
        if previous.dnsbl is not None:
            timer = threading.Timer(previous.config.dnsbl.timeout + GRACE_SECONDS,
                                    previous.dnsbl.close)
            timer.daemon = True
            timer.start()

    def stop(self, snapshot: Snapshot) -> None:
        self._stop_monitor()
        if snapshot.dnsbl is not None:
            snapshot.dnsbl.close()

    def _start_monitor(self, snapshot: Snapshot) -> None:
        if self._checking and snapshot.dnsbl is not None:
            self._monitor = HealthMonitor(snapshot.dnsbl, snapshot.config.dnsbl.health_interval)
            self._monitor.start()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.stop(timeout=0)
            self._monitor = None
