"""activity - what the filter did in the last hour, in memory, for the status page.

NAME
    activity - Activity: per-minute verdicts, top lists and the last decisions

SYNOPSIS
    activity = Activity(minutes=60, recent=1000)
    activity.record(Seen(at, "rcpt", "reject", "remote-domain", "192.0.2.9", None,
                         "s@example.org", "u@remote.example", False))
    activity.per_minute(now)               # [(minute start, {"reject": 3, ...}), ...]
    activity.top_refused_clients(now, 10)  # [("192.0.2.9", 3), ...]
    activity.top_senders(now, 10)          # outbound: SASL users, or relaying clients
    activity.recent(client="192.0.2.9", limit=50)

DESCRIPTION
    The status page (statuspage.py) and its JSON API read this; the
    metrics recorder (metrics.py) feeds it one Seen per decision. Counts
    are kept per minute for the last `minutes` minutes: each minute holds
    the verdicts, the refused clients and the outbound senders (a SASL
    user, else the client address, of a recipient that was let relay);
    older minutes are dropped as new ones open, so memory is bounded by
    the distinct clients of an hour. The last `recent` decisions are kept
    whole, newest first, for the "last decisions" table and its filters.

    Thread-safe: one lock; every method copies what it returns.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import NamedTuple

from relaymilter.address import shown_domain


class Seen(NamedTuple):
    """One decision, as the status page shows it."""

    at: float               # unix time
    stage: str              # "rcpt" or "connect"
    verdict: str            # permit, reject, defer, would-reject, would-defer
    reason: str             # reason.Reason.word
    client: str             # address, or "unknown"
    user: str | None        # SASL login
    sender: str | None
    recipient: str | None
    relayed: bool           # a permit that lets the client relay (outbound mail)


class _Minute:
    __slots__ = ("start", "verdicts", "refused", "senders")

    def __init__(self, start: int) -> None:
        self.start = start
        self.verdicts: Counter = Counter()
        self.refused: Counter = Counter()
        self.senders: Counter = Counter()


class Activity:
    """See the module docstring."""

    def __init__(self, minutes: int = 60, recent: int = 1000) -> None:
        self.minutes = minutes
        self._lock = threading.Lock()
        self._minutes: deque[_Minute] = deque()
        self._recent: deque[Seen] = deque(maxlen=recent)
        # Counts not yet taken by drain() (fleettops.py shares them): minute
        # start -> ("refused" | "senders" -> Counter).
        self._pending: dict[int, dict[str, Counter]] = {}
        self.sharing = False            # set when a FleetTops drains the pending counts

    def record(self, seen: Seen) -> None:
        start = int(seen.at // 60) * 60
        refused = seen.verdict in ("reject", "defer")
        with self._lock:
            self._recent.append(seen)
            if not self._minutes or self._minutes[-1].start < start:
                self._minutes.append(_Minute(start))
                self._drop(start)
            minute = self._minutes[-1]
            if minute.start != start:       # a decision stamped before the newest minute
                minute = next((m for m in self._minutes if m.start == start), minute)
            minute.verdicts[seen.verdict] += 1
            if refused:
                minute.refused[seen.client] += 1
                if self.sharing:
                    self._pending_of(start, "refused")[seen.client] += 1
            elif seen.relayed:
                sender = seen.user or seen.client
                minute.senders[sender] += 1
                if self.sharing:
                    self._pending_of(start, "senders")[sender] += 1

    def _pending_of(self, start: int, kind: str) -> Counter:
        return self._pending.setdefault(start, {}).setdefault(kind, Counter())

    def drain(self) -> dict[int, dict[str, Counter]]:
        """The counts recorded since the last drain (for the fleet's top lists)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def _drop(self, now_start: int) -> None:
        oldest = now_start - (self.minutes - 1) * 60
        while self._minutes and self._minutes[0].start < oldest:
            self._minutes.popleft()

    def _window(self, now: float) -> list[_Minute]:
        oldest = int(now // 60) * 60 - (self.minutes - 1) * 60
        return [minute for minute in self._minutes if minute.start >= oldest]

    def per_minute(self, now: float) -> list[tuple[int, dict[str, int]]]:
        """(minute start, verdict -> count) for each minute of the window with
        decisions, oldest first."""
        with self._lock:
            return [(minute.start, dict(minute.verdicts)) for minute in self._window(now)]

    def totals(self, now: float) -> dict[str, int]:
        """Verdict -> count over the window."""
        total: Counter = Counter()
        with self._lock:
            for minute in self._window(now):
                total.update(minute.verdicts)
        return dict(total)

    def top_refused_clients(self, now: float, count: int) -> list[tuple[str, int]]:
        return self._top(now, count, "refused")

    def top_senders(self, now: float, count: int) -> list[tuple[str, int]]:
        return self._top(now, count, "senders")

    def _top(self, now: float, count: int, name: str) -> list[tuple[str, int]]:
        total: Counter = Counter()
        with self._lock:
            for minute in self._window(now):
                total.update(getattr(minute, name))
        return total.most_common(count)

    def recent(self, client: str | None = None, user: str | None = None,
               domain: str | None = None, limit: int = 100) -> list[Seen]:
        """The last decisions, newest first: of this client, this SASL user (any
        letter case), a sender or recipient in this domain."""
        user_key = user.lower() if user else None
        domain_key = domain.lower().rstrip(".") if domain else None
        with self._lock:
            decisions = list(self._recent)
        found = []
        for seen in reversed(decisions):
            if client and seen.client != client:
                continue
            if user_key and (seen.user or "").lower() != user_key:
                continue
            if domain_key and domain_key not in (shown_domain(seen.sender),
                                                 shown_domain(seen.recipient)):
                continue
            found.append(seen)
            if len(found) >= limit:
                break
        return found
