"""cache - DNS answers kept for their TTL, bounded, shared between threads.

NAME
    cache - TTL-clamped, size-bounded, thread-safe cache that coalesces lookups

SYNOPSIS
    cache = LookupCache(max_entries=100000, min_ttl=60, max_ttl=3600)
    fetch = cache.fetch(("zen.example", "192.0.2.1"), lookup, executor)
    fetch.source            # FetchSource.CACHE, IN_FLIGHT or DNS
    answer = fetch.future.result(timeout=...)
    cache.stats()           # CacheStats(hits, misses, coalesced, entries, in_flight)

DESCRIPTION
    fetch() answers one key three ways, all under one lock (cachetools
    caches are not thread-safe):

    CACHE      a live entry: an already completed future holding it;
    IN_FLIGHT  a lookup of the same key is running: the SAME future, so a
               burst of connections from one client costs one DNS query;
    DNS        otherwise lookup() is submitted to the caller's executor (or,
               without one, returns the future of a lookup it started) and
               that future is remembered as in flight.

    When the lookup completes with a value, the value is stored for its
    `ttl` attribute (seconds, from the DNS answer; a negative answer carries
    the negative TTL) clamped to [min_ttl, max_ttl]: min_ttl stops a zone
    with TTL 0 from costing a query per connection, max_ttl bounds how long
    a delisting goes unseen. The cache holds at most max_entries; beyond
    that the least recently used entry goes.

    A lookup that ends in an exception (timeout, SERVFAIL, no nameserver)
    is NOT cached: the next connection asks again. A failure is transient,
    a cached failure would be a cached "not listed" for a listed client,
    and the price of asking again is bounded: the caller fails open at its
    deadline and identical concurrent lookups still share one query.
    Callers waiting on that future see the exception.

    Expiry reads `timer` (default time.monotonic), so tests can move time
    without sleeping. The cache relies on lookup() ending by itself (the
    resolver's own lifetime): a key whose lookup never ends stays in flight.
"""

from __future__ import annotations

import enum
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Callable, Hashable, Protocol, TypeVar

import cachetools


class HasTTL(Protocol):
    """What a cached value must say: how long it may be kept, in seconds."""

    @property
    def ttl(self) -> float: ...


Value = TypeVar("Value", bound=HasTTL)


class FetchSource(enum.Enum):
    """Where a fetched answer comes from (shown by `relaymilter lookup`)."""

    CACHE = "cache"
    IN_FLIGHT = "in-flight"     # joined a lookup another caller started
    DNS = "dns"


@dataclass(frozen=True)
class Fetch:
    """A future for the value, and where it comes from."""

    future: Future
    source: FetchSource


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made, read together under the lock."""

    hits: int
    misses: int
    coalesced: int
    entries: int
    in_flight: int


class LookupCache:
    """See the module docstring."""

    def __init__(self, max_entries: int = 100000, min_ttl: float = 60, max_ttl: float = 3600,
                 timer: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"need 0 <= min_ttl <= max_ttl, not {min_ttl} and {max_ttl}")
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.timer = timer
        self._lock = threading.Lock()
        self._entries: cachetools.TLRUCache = cachetools.TLRUCache(
            maxsize=max_entries, ttu=self._expiry, timer=timer)
        self._in_flight: dict[Hashable, Future] = {}
        self._hits = self._misses = self._coalesced = 0

    def clamp_ttl(self, ttl: float) -> float:
        """The lifetime an answer with this TTL gets here."""
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def fetch(self, key: Hashable, lookup: Callable[[], Value] | Callable[[], Future],
              executor: Executor | None = None) -> Fetch:
        """The value for key: cached, joined in flight, or looked up now.

        With an executor, lookup() returns the value and runs there;
        without, lookup() starts the lookup and returns its Future.
        """
        with self._lock:
            if key in self._entries:    # `in` checks expiry; [] would not
                self._hits += 1
                return Fetch(self._entries[key], FetchSource.CACHE)
            running = self._in_flight.get(key)
            if running is not None:
                if _succeeded(running):
                    # Done, but its done-callback (_finish) has not run yet:
                    # waiters wake before callbacks. It is an answer already.
                    del self._in_flight[key]
                    self._entries[key] = running
                    self._hits += 1
                    return Fetch(running, FetchSource.CACHE)
                self._coalesced += 1
                return Fetch(running, FetchSource.IN_FLIGHT)
            self._misses += 1
            future = executor.submit(lookup) if executor is not None else lookup()
            self._in_flight[key] = future
        # Outside the lock: a future that is already done runs the callback
        # here and now, and the callback takes the lock.
        future.add_done_callback(lambda done: self._finish(key, done))
        return Fetch(future, FetchSource.DNS)

    def count_hits(self, count: int) -> None:
        """Hits a caller answered from what it kept of earlier fetches (dnsbl's
        verdicts), counted as the fetches they stand for."""
        with self._lock:
            self._hits += count

    def stats(self) -> CacheStats:
        with self._lock:
            self._entries.expire()
            return CacheStats(self._hits, self._misses, self._coalesced,
                              len(self._entries), len(self._in_flight))

    def _finish(self, key: Hashable, future: Future) -> None:
        with self._lock:
            if self._in_flight.get(key) is future:
                del self._in_flight[key]
            if future.cancelled() or future.exception() is not None:
                return
            # The completed future itself is kept: every hit hands out the
            # same one instead of building a new future per hit.
            self._entries[key] = future

    def _expiry(self, key: Hashable, future: Future, now: float) -> float:
        return now + self.clamp_ttl(future.result().ttl)


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
