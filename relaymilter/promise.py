"""promise - a result that arrives later, for one producer and any number of waiters.

NAME
    promise - Promise (set once, waited on), Done (already there), wait_all()

DESCRIPTION
    concurrent.futures.Future does this job with a Condition, an RLock and a
    deque per future, and a lock round trip for every done(): in a botnet
    storm, two futures per new client made the lock traffic and the
    allocations a large share of a policy request's CPU. A Promise is a
    few slots: done() is an attribute read; a thread that must wait gets an
    Event, made only when someone waits. One module lock guards the moment
    a promise is settled against a callback or a waiter arriving, so none
    is lost.

    The methods are the Future's (done, cancelled, result, exception,
    add_done_callback), so the DNSBL code reads a Promise and a Future (a
    ThreadedResolver's) alike; wait_all() waits for either kind. A Promise
    is never cancelled. Callbacks run on the thread that settles it, or at
    once in add_done_callback() when it is already settled; an exception in
    one is logged and the others still run.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

_lock = threading.Lock()


class Promise:
    """See the module docstring. set_result() or set_exception(), once."""

    __slots__ = ("_done", "_value", "_error", "_callbacks", "_event")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], None]] | None = None
        self._event: threading.Event | None = None

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, value: Any) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        with _lock:
            if self._done:
                raise RuntimeError("a promise is settled once")
            self._value, self._error = value, error
            self._done = True
            callbacks, event = self._callbacks, self._event
            self._callbacks = None      # nothing is kept alive by a settled promise
        if event is not None:
            event.set()
        for callback in callbacks or ():
            _run(callback, self)

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if not self._done:
            with _lock:
                if not self._done:
                    if self._callbacks is None:
                        self._callbacks = []
                    self._callbacks.append(callback)
                    return
        _run(callback, self)

    def wait(self, timeout: float | None = None) -> bool:
        """True once settled; False if timeout seconds passed first."""
        if self._done:
            return True
        with _lock:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        if not self.wait(timeout):
            raise TimeoutError("no result yet")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.wait(timeout):
            raise TimeoutError("no result yet")
        return self._error


class Done:
    """A value that is already there, dressed as a settled Promise (cache hits)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        return self._value

    def exception(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        _run(callback, self)


def wait_all(futures: Iterable[Any], timeout: float) -> None:
    """Wait until every one of futures (Promises or Futures) is done, or timeout."""
    deadline = time.monotonic() + timeout
    for future in futures:
        if future.done():
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            future.exception(timeout=remaining)
        except (TimeoutError, CancelledError):
            pass


def succeeded(future: Any) -> bool:
    """Done, not cancelled, no exception: result() gives the value at once."""
    return future.done() and not future.cancelled() and future.exception() is None


def _run(callback: Callable[[Any], None], promise: Any) -> None:
    try:
        callback(promise)
    except Exception:
        log.exception("a promise callback failed")
