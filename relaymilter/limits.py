"""limits - outbound recipients per sender and window, counted in memory.

NAME
    limits - the rate counter behind the per-user and per-client outbound limits

SYNOPSIS
    counter = RecipientCounter(window=3600, auto_hold_factor=3)
    charge = counter.charge(("user", "alice"), limit=500)
    charge.allowed        # False once alice relayed 500 recipients this window
    charge.hold_due       # True exactly once, when the attempts reach 3 x 500

DESCRIPTION
    One fixed window per sender key, opened by the key's first recipient:
    up to `limit` recipients are allowed in it; further ones are refused and
    counted as attempts. When the window has passed, the next recipient
    opens a new one. An infected host keeps trying after it is refused, so
    the attempts (allowed + refused) tell a compromised sender from a busy
    one: when they reach auto_hold_factor x limit, hold_due is set once per
    window and the caller puts the sender on hold.

    A recipient asked again (the same recipient of the same message, by
    the MTA's instance id) gets its first answer and is not counted twice.

    Counts live in this process only: a restart forgets them (the limits
    are a brake on a spam run, not accounting); rediscounter.py keeps them
    in Redis for a fleet. Thread-safe: one lock
    around a dict; expired windows are dropped as the dict is swept, so the
    dict holds at most the senders of one window.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable

SWEEP_EVERY = 4096     # charges between two sweeps of expired windows


@dataclass(frozen=True, slots=True)
class Charge:
    """The outcome of one recipient charged to a sender."""

    allowed: bool
    accepted: int       # recipients allowed in this window, this one included
    attempts: int       # recipients asked for in this window, this one included
    hold_due: bool      # the attempts just reached auto_hold_factor x limit
    unavailable: bool = False   # not counted: shared counters down, on_error = "tempfail"


class _Window:
    __slots__ = ("started", "accepted", "attempts", "hold_done", "answers")

    def __init__(self, started: float) -> None:
        self.started, self.accepted, self.attempts, self.hold_done = started, 0, 0, False
        self.answers: dict[tuple[str, str], bool] | None = None   # (instance, recipient)


class RecipientCounter:
    """See the module docstring."""

    def __init__(self, window: float = 3600.0, auto_hold_factor: int = 0,
                 timer: Callable[[], float] = time.monotonic) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, not {window}")
        self.window = window
        self.auto_hold_factor = auto_hold_factor
        self._timer = timer
        self._lock = threading.Lock()
        self._windows: dict[Hashable, _Window] = {}
        self._since_sweep = 0

    def charge(self, key: Hashable, limit: int, instance: str | None = None,
               recipient: str | None = None) -> Charge:
        """Count one recipient for key against limit (recipients per window).

        With instance (the MTA's id of the message) and recipient, the same
        recipient of the same message asked again in this window gets its
        first answer and is not counted again."""
        now = self._timer()
        with self._lock:
            self._sweep(now)
            window = self._windows.get(key)
            if window is None or now - window.started >= self.window:
                window = self._windows[key] = _Window(now)
            asked = (instance, recipient) if instance and recipient else None
            if asked is not None and window.answers is not None and asked in window.answers:
                return Charge(window.answers[asked], window.accepted, window.attempts, False)
            window.attempts += 1
            allowed = window.accepted < limit
            if allowed:
                window.accepted += 1
            hold_due = (self.auto_hold_factor > 0 and not window.hold_done
                        and window.attempts >= self.auto_hold_factor * limit)
            if hold_due:
                window.hold_done = True
            if asked is not None:
                if window.answers is None:
                    window.answers = {}
                window.answers[asked] = allowed
            return Charge(allowed, window.accepted, window.attempts, hold_due)

    def senders(self) -> int:
        """Senders with an open window."""
        with self._lock:
            return len(self._windows)

    def _sweep(self, now: float) -> None:
        self._since_sweep += 1
        if self._since_sweep < SWEEP_EVERY:
            return
        self._since_sweep = 0
        expired = [key for key, window in self._windows.items()
                   if now - window.started >= self.window]
        for key in expired:
            del self._windows[key]
