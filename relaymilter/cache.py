"""cache - DNS answers kept for their TTL, bounded, shared between threads.

NAME
    cache - TTL-clamped, size-bounded, thread-safe cache that coalesces lookups

SYNOPSIS
    cache = LookupCache(max_entries=100000, min_ttl=60, max_ttl=3600)
    fetch = cache.fetch(("zen.example", "192.0.2.1"), start_lookup)
    fetch.source            # FetchSource.CACHE, IN_FLIGHT or DNS
    answer = fetch.future.result(timeout=...)
    cache.stats()           # CacheStats(hits, misses, coalesced, entries, in_flight)

DESCRIPTION
    fetch() answers one key three ways, all under one lock:

    CACHE      a live entry: its value, as a settled promise.Done;
    IN_FLIGHT  a lookup of the same key is running: the SAME future, so a
               burst of connections from one client costs one DNS query;
    DNS        otherwise lookup() starts the lookup and returns its future
               (a promise.Promise; with an executor, lookup() is run there
               and returns the value), remembered as in flight.

    When the lookup completes with a value, the value is stored for its
    TTL, its first item (seconds, from the DNS answer; a negative answer
    carries the negative TTL), clamped to [min_ttl, max_ttl]: min_ttl stops a zone
    with TTL 0 from costing a query per connection, max_ttl bounds how long
    a delisting goes unseen. The cache holds at most max_entries; beyond
    that the least recently used entry goes.

    Only the value is kept, with its expiry, in an OrderedDict (C code for
    the LRU moves): no future, no callbacks. Values are plain tuples
    (ttl, ...) of strings and numbers (dnsbl's ZoneLookup and TxtLookup),
    never instances of a class, a NamedTuple's included: the garbage
    collector stops tracking a plain tuple of such items at its first pass,
    so a full cache adds nothing to the collector's later work (tracked,
    100,000 entries made every full collection in a storm cost about
    100 ms). An entry that has expired is dropped when it is
    next asked for, or when the least recently used entries go.

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

import collections
import enum
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from relaymilter.promise import Done, succeeded


# A cached value: a plain tuple whose first item is its TTL in seconds.
Cached = tuple


class FetchSource(enum.Enum):
    """Where a fetched answer comes from (shown by `relaymilter lookup`)."""

    CACHE = "cache"
    IN_FLIGHT = "in-flight"     # joined a lookup another caller started
    DNS = "dns"


@dataclass(frozen=True, slots=True)
class Fetch:
    """A future for the value (settled for a hit), and where it comes from."""

    future: Any             # promise.Promise, promise.Done or concurrent.futures.Future
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
        # key -> (expires, value), least recently used first
        self._entries: collections.OrderedDict[Hashable, tuple[float, Any]] = \
            collections.OrderedDict()
        self._in_flight: dict[Hashable, Any] = {}
        self._hits = self._misses = self._coalesced = 0

    def clamp_ttl(self, ttl: float) -> float:
        """The lifetime an answer with this TTL gets here."""
        return min(max(ttl, self.min_ttl), self.max_ttl)

    def fetch(self, key: Hashable, lookup: Callable[[], Any],
              executor: Executor | None = None) -> Fetch:
        """The value for key: cached, joined in flight, or looked up now.

        Without an executor, lookup() starts the lookup and returns its
        future; with one, lookup() runs there and returns the value.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if self.timer() < entry[0]:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return Fetch(Done(entry[1]), FetchSource.CACHE)
                del self._entries[key]
            running = self._in_flight.get(key)
            if running is not None:
                if succeeded(running):
                    # Done, but its done-callback (_finish) has not run yet: a
                    # Future wakes waiters before callbacks. It is an answer.
                    del self._in_flight[key]
                    self._store(key, running.result())
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
            now = self.timer()
            for key in [key for key, (expires, _) in self._entries.items() if expires <= now]:
                del self._entries[key]
            return CacheStats(self._hits, self._misses, self._coalesced,
                              len(self._entries), len(self._in_flight))

    def _finish(self, key: Hashable, future: Any) -> None:
        with self._lock:
            if self._in_flight.get(key) is future:
                del self._in_flight[key]
            if future.cancelled() or future.exception() is not None:
                return
            self._store(key, future.result())

    def _store(self, key: Hashable, value: Cached) -> None:
        """Under the lock."""
        self._entries[key] = (self.timer() + self.clamp_ttl(value[0]), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

