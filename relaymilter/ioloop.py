"""ioloop - the process's one I/O loop, on a thread of its own.

NAME
    ioloop - an asyncio event loop that any thread can hand work to

SYNOPSIS
    io = ioloop.shared()            # started on first use, for the process's life
    io.call(function, arg)          # from any thread: runs on the loop, in order
    io.loop.call_at(when, ...)      # on the loop thread only

DESCRIPTION
    Every DNS query of the process runs on this loop (dnsclient.py), and the
    policy service's connections may too. Work reaches it from other
    threads (libmilter's, one per MTA connection) through call(): calls
    queue up under a lock and one wake-up of the loop runs them all, so a
    client whose zones are asked together costs the loop one wake-up, not
    one per zone. On the loop thread itself call() runs the function at
    once.

    Timers: at(when, callback) keeps every deadline of the process (a DNS
    try, a policy request's DNSBL deadline) in one heap of plain tuples,
    with one asyncio timer armed for the earliest: a deadline costs a heap
    push, not an asyncio TimerHandle. They cannot be cancelled; a callback
    looks whether it is still wanted (most are not: the answer came first).

    Everything a component keeps for its work on the loop (sockets, queries
    in flight, timers) is owned by the loop thread and touched by no other:
    it needs no lock. An exception in a handed-over call or a timer is
    logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


class IoLoop:
    """An asyncio loop running in a daemon thread; see the module docstring."""

    def __init__(self, name: str = "io") -> None:
        self.loop = asyncio.new_event_loop()
        self._name = name
        self._lock = threading.Lock()
        self._queue: list[tuple[Callable[..., Any], tuple]] = []
        self._woken = False
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        # The loop thread's: (when, sequence, callback), the earliest first.
        self._timers: list[tuple[float, int, Callable[[], Any]]] = []
        self._sequence = itertools.count()
        self._armed: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    def start(self) -> "IoLoop":
        started = threading.Event()

        def run() -> None:
            self._thread_id = threading.get_ident()
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        started.wait()
        return self

    def stop(self) -> None:
        """Stop the loop and join its thread (tests; the shared loop lives on)."""
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self._thread = None
            self.loop.close()

    @property
    def on_loop(self) -> bool:
        """Is the calling thread the loop's?"""
        return threading.get_ident() == self._thread_id

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run function(*args) on the loop: now if on it, else soon, in call order."""
        if threading.get_ident() == self._thread_id:
            function(*args)
            return
        with self._lock:
            self._queue.append((function, args))
            if self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self._run_queued)

    def at(self, when: float, callback: Callable[[], Any]) -> None:
        """On the loop thread: callback() at when (time.monotonic), or soon after."""
        heapq.heappush(self._timers, (when, next(self._sequence), callback))
        if self._armed is None or when < self._armed_for:
            if self._armed is not None:
                self._armed.cancel()
            self._armed_for = when
            self._armed = self.loop.call_at(when, self._run_timers)

    def _run_timers(self) -> None:
        self._armed = None
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            callback = heapq.heappop(timers)[2]
            try:
                callback()
            except Exception:
                log.exception("a timer on the I/O loop failed")
        if timers and self._armed is None:
            self._armed_for = timers[0][0]
            self._armed = self.loop.call_at(self._armed_for, self._run_timers)

    def _run_queued(self) -> None:
        with self._lock:
            queued, self._queue = self._queue, []
            self._woken = False
        for function, args in queued:
            try:
                function(*args)
            except Exception:
                log.exception("a call on the I/O loop failed")


_shared: IoLoop | None = None
_shared_lock = threading.Lock()


def shared() -> IoLoop:
    """The process's I/O loop, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = IoLoop("io").start()
        return _shared
