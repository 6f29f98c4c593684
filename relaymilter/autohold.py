"""autohold - automatic holds asked for by the engine, written by the watcher thread.

NAME
    autohold - HoldQueue: hold requests from any thread, taken by one

SYNOPSIS
    holds = HoldQueue()
    holds.request("user", "alice", "over 3 times its outbound limit")   # never blocks
    request = holds.take(timeout=1.0)    # the watcher thread: a HoldRequest or None

DESCRIPTION
    A limit that is exceeded many times over asks for an automatic hold
    (engine.py). The decision must not wait for a store write, and a store
    connection belongs to one thread, so the request is queued here and the
    runtime's watcher thread writes it (storefollow.py). The watcher also
    sleeps on take(): a request wakes it at once.
"""

from __future__ import annotations

import queue
from typing import NamedTuple


class HoldRequest(NamedTuple):
    kind: str           # "client" or "user"
    value: str
    reason: str
    scope: str = "relay"            # "all": block the client (a relay prober)
    duration: float | None = None   # seconds; None: [limits] auto_hold_duration


class HoldQueue:
    """Unbounded in principle, bounded in practice: one request per sender and window."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def request(self, kind: str, value: str, reason: str, scope: str = "relay",
                duration: float | None = None) -> None:
        """Any thread; never blocks."""
        self._queue.put(HoldRequest(kind, value, reason, scope, duration))

    def wake(self) -> None:
        """Make a waiting take() return None now (the runtime stops)."""
        self._queue.put(None)

    def take(self, timeout: float) -> HoldRequest | None:
        """The next request, or None after timeout seconds or a wake()."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
