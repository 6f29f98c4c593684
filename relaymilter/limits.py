"""limits - outbound limits: recipients and messages per hour and per day, counted in memory.

NAME
    limits - Limit, the rates of one sender, and LimitCounter, their count in this process

SYNOPSIS
    limit = Limit(per_hour=500, per_day=2000, messages_per_hour=100)
    counter = LimitCounter(hour=3600, auto_hold_factor=3)
    charge = counter.charge(("user", "alice"), limit, message="4F1A2.6554.0",
                            recipient="bob@example.org")
    charge.allowed        # False once one of alice's rates is used up
    charge.exceeded       # which: "per_hour", "per_day", "messages_per_hour", ...
    charge.hold_due       # True exactly once, when the attempts reach 3 x a rate

DESCRIPTION
    A Limit has up to four rates: recipients per hour and per day,
    messages per hour and per day. A recipient is allowed when every rate
    has room; then it counts against every recipient rate, and, when it is
    the first allowed recipient of its message, against every message rate.
    A recipient of a message that a message rate refused is refused too.

    Sliding window. Each rate's window (an hour, or `hour` seconds when
    [limits] window stretches it; a day is 24 of those) is cut into SLOTS
    slots, and a rate counts the slots of the last window: the current
    one and the SLOTS - 1 before it. So a rate of N never allows more than
    N in any stretch of (SLOTS - 1) / SLOTS of its window (59 minutes of
    an hour, 23 h 36 min of a day), and the count decays a slot at a time
    rather than dropping to zero at a boundary, which would let a sender
    send N at the end of one window and N again at the start of the next.

    Attempts. Refused recipients are counted as attempts, beside the
    allowed ones: an infected host keeps trying after it is refused, so
    when the attempts in a rate's window reach auto_hold_factor x the rate,
    hold_due is set, once (when they reach it, not while they stay above),
    and the caller puts the sender on hold.

    Asked again. With a message id (Postfix's `instance`, the milter's own)
    and a recipient, the same recipient of the same message asked again
    gets its first answer and is not counted twice.

    Counts live in this process only: a restart forgets them (the limits
    are a brake on a spam run, not accounting); rediscounter.py keeps the
    same counts in Redis for a fleet, by the same rules. Thread-safe: one
    lock around a dict of senders; a sender is swept once its windows and
    remembered answers have all passed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, NamedTuple

SLOTS = 60             # slots per window
SWEEP_EVERY = 4096     # charges between two sweeps of idle senders
ANSWER_TTL = 3600.0    # seconds an answer is remembered for its message

# The rates of a Limit: (field, what is counted, hours in its window).
RATES = (("per_hour", "recipients", 1), ("per_day", "recipients", 24),
         ("messages_per_hour", "messages", 1), ("messages_per_day", "messages", 24))
RATE_NAMES = tuple(name for name, _, _ in RATES)


class Rate(NamedTuple):
    name: str           # a Limit field: "per_hour" ...
    unit: str           # "recipients" or "messages"
    hours: int          # 1 or 24
    count: int          # allowed per window

    def describe(self) -> str:
        return f"{self.count} {self.unit} per {'hour' if self.hours == 1 else 'day'}"


class Limit(NamedTuple):
    """A sender's rates; None: not limited that way."""

    per_hour: int | None = None
    per_day: int | None = None
    messages_per_hour: int | None = None
    messages_per_day: int | None = None

    def rates(self) -> Iterator[Rate]:
        for (name, unit, hours), count in zip(RATES, self):
            if count is not None:
                yield Rate(name, unit, hours, count)

    def describe(self) -> str:
        """ "500 recipients per hour, 100 messages per hour" """
        return ", ".join(rate.describe() for rate in self.rates())


@dataclass(frozen=True, slots=True)
class Charge:
    """The outcome of one recipient charged to a sender."""

    allowed: bool
    hold_due: bool = False      # the attempts just reached auto_hold_factor x a rate
    exceeded: str | None = None     # the rate that refused it (a Limit field)
    unavailable: bool = False   # not counted: shared counters down, on_error = "tempfail"


def slot_seconds(hour: float, rate: Rate) -> float:
    """The length of one of rate's slots, with an hour of `hour` seconds."""
    return hour * rate.hours / SLOTS


class WindowCount(NamedTuple):
    """What a rate's window holds now (see window_count)."""

    accepted: int
    attempts: int
    frees_in: float | None      # seconds until the oldest accepted slot leaves the window
    empty_in: float | None      # seconds until no accepted slot is left


def window_count(accepted: dict[int, int], attempts: dict[int, int], now: float,
                 slot: float) -> WindowCount:
    """The count of a window from its slots (slot number -> count) at unix
    time now: the slots of the last SLOTS, the current one included."""
    current = int(now // slot)
    live = [number for number, count in accepted.items()
            if current - SLOTS < number <= current and count > 0]

    def leaves(number: int) -> float:
        return max(0.0, (number + SLOTS) * slot - now)
    return WindowCount(
        sum(accepted[number] for number in live),
        sum(count for number, count in attempts.items() if current - SLOTS < number <= current),
        leaves(min(live)) if live else None, leaves(max(live)) if live else None)


class _Slots:
    """One rate's window for one sender: slot number -> [accepted, attempts]."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, list[int]] = {}

    def tally(self, current: int) -> tuple[int, int]:
        """(accepted, attempts) in the window ending with slot current; older
        slots are dropped."""
        accepted = attempts = 0
        stale = []
        for number, (allowed, tried) in self.counts.items():
            if number <= current - SLOTS:
                stale.append(number)
            else:
                accepted += allowed
                attempts += tried
        for number in stale:
            del self.counts[number]
        return accepted, attempts

    def add(self, current: int, accepted: int, attempts: int) -> None:
        counts = self.counts.setdefault(current, [0, 0])
        counts[0] += accepted
        counts[1] += attempts


class _Sender:
    __slots__ = ("rates", "messages", "answers", "idle_at")

    def __init__(self) -> None:
        self.rates: dict[str, _Slots] = {}
        # message -> (when, the message rate that refused it or None), oldest first
        self.messages: dict[str, tuple[float, str | None]] = {}
        # (message, recipient) -> (when, its Charge), oldest first
        self.answers: dict[tuple[str, str], tuple[float, Charge]] = {}
        self.idle_at = 0.0      # when its windows and answers have all passed

    def forget(self, now: float) -> None:
        """Drop answers and messages older than ANSWER_TTL (they are in time order)."""
        for remembered in (self.messages, self.answers):
            while remembered:
                first = next(iter(remembered))
                if now - remembered[first][0] < ANSWER_TTL:
                    break
                del remembered[first]


class LimitCounter:
    """See the module docstring."""

    def __init__(self, hour: float = 3600.0, auto_hold_factor: int = 0,
                 timer: Callable[[], float] = time.time) -> None:
        if hour <= 0:
            raise ValueError(f"an hour must be positive, not {hour}")
        self.hour = hour
        self.auto_hold_factor = auto_hold_factor
        self._timer = timer
        self._lock = threading.Lock()
        self._senders: dict[Hashable, _Sender] = {}
        self._since_sweep = 0

    def charge(self, key: Hashable, limit: Limit, message: str | None = None,
               recipient: str | None = None) -> Charge:
        """Count one recipient for key against every rate of limit (see the
        module docstring)."""
        now = self._timer()
        with self._lock:
            self._sweep(now)
            sender = self._senders.get(key)
            if sender is None:
                sender = self._senders[key] = _Sender()
            sender.forget(now)
            asked = (message, recipient) if message and recipient else None
            if asked is not None and asked in sender.answers:
                return sender.answers[asked][1]
            charge = self._count(sender, limit, message, now)
            if asked is not None:
                sender.answers[asked] = (now, Charge(charge.allowed, False, charge.exceeded))
            return charge

    def _count(self, sender: _Sender, limit: Limit, message: str | None, now: float) -> Charge:
        seen = sender.messages.get(message) if message else None
        if seen is not None and seen[1] is not None:    # a message rate refused it
            return Charge(False, False, seen[1])
        new_message = seen is None
        involved = []
        exceeded, hold_due = None, False
        for rate in limit.rates():
            if rate.unit == "messages" and not new_message:
                continue
            slots = sender.rates.get(rate.name)
            if slots is None:
                slots = sender.rates[rate.name] = _Slots()
            slot = slot_seconds(self.hour, rate)
            current = int(now // slot)
            accepted, attempts = slots.tally(current)
            if exceeded is None and accepted >= rate.count:
                exceeded = rate.name
            slots.add(current, 0, 1)
            threshold = self.auto_hold_factor * rate.count
            if threshold and attempts < threshold <= attempts + 1:
                hold_due = True
            involved.append((slots, current))
            sender.idle_at = max(sender.idle_at, (current + SLOTS + 1) * slot)
        sender.idle_at = max(sender.idle_at, now + ANSWER_TTL)
        if exceeded is None:
            for slots, current in involved:
                slots.add(current, 1, 0)
        if message and new_message and (exceeded is None or exceeded.startswith("messages")):
            sender.messages[message] = (now, exceeded)
        return Charge(exceeded is None, hold_due, exceeded)

    def senders(self) -> int:
        """Senders counted and not yet swept."""
        with self._lock:
            return len(self._senders)

    def _sweep(self, now: float) -> None:
        self._since_sweep += 1
        if self._since_sweep < SWEEP_EVERY:
            return
        self._since_sweep = 0
        idle = [key for key, sender in self._senders.items() if now >= sender.idle_at]
        for key in idle:
            del self._senders[key]
