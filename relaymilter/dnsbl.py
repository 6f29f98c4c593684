"""dnsbl - is the client listed? DNSBL and DNSWL queries, the deadline, list health.

NAME
    dnsbl - query names, the resolver, the checker and its deadline, list health

SYNOPSIS
    zones = [Zone.build("zen.spamhaus.org", weight=1, codes=["127.0.0.2-127.0.0.11"]),
             Zone.build("list.dnswl.org", weight=-2)]
    checker = DnsblChecker(zones, DnsResolver(["127.0.0.1:5353"], timeout=2.0),
                           LookupCache(100000, 60, 3600), timeout=2.0, threshold=1)
    pending = checker.start(client_ip)     # at connect: all zones, in parallel
    ...                                    # HELO, MAIL FROM
    result = pending.result()              # at RCPT: back by the deadline, always
    if result.listed: ... result.reply_zone, result.txt ...
    checker.check_health()                 # one RFC 5782 test-point round
    print("\\n".join(report_lines(result)))  # `relaymilter lookup IP`

DESCRIPTION
    Query names. An IPv4 client a.b.c.d is asked as d.c.b.a.ZONE; an IPv6
    client as its 32 nibbles, reversed (RFC 5782 section 2.4). An IPv4-mapped
    IPv6 client (::ffff:192.0.2.1) is the IPv4 client it maps.

    Answers. The zone types, the codes and the verdict (classify(),
    summarise()) are zones.py's; this module gets the answers. Each zone's
    A answer becomes a ZoneAnswer:
      LISTED       an address in the zone's codes;
      NOT_LISTED   NXDOMAIN, no A record, or 127/8 outside the codes;
      ZONE_ERROR   an address in 127.255.255.0/24 or outside 127.0.0.0/8:
                   the zone refusing us (Spamhaus answers 127.255.255.254 to
                   public resolvers), never a listing, whatever the codes say;
      TIMEOUT, DNS_FAILURE   no answer by the deadline; SERVFAIL, REFUSED or
                   no usable nameserver. Counted as not listed: mail flows.
      DISABLED     the zone failed its last health check and is not asked.
    Every zone's status goes to the metrics recorder (metrics=, which also
    times each A query that is sent; NO_METRICS counts nothing).
    Problems are logged at most once per zone and kind
    per log_interval (60 s), with how many were not logged in between. Logs
    and metrics name zones by display_name, never by their real name, which
    may hold an access key; for the same reason query names are never logged.

    TXT. When a blocklist's (weight > 0) A answer lists the client, its TXT
    record is asked at once, as a lookup of its own with its own cache entry
    (an allowlist's TXT is never shown, so never asked). The verdict does not
    depend on it: result() waits only for the TXT the refusal shows (the
    reply zone's, when the client is listed once the allowlists have
    counted), only until the same deadline, and a listing stands without
    it. `relaymilter lookup` shows every listing blocklist's TXT. That costs a listed client one more round
    trip; a clean client costs no TXT query at all (Postfix does the same).
    A zone with txt = "with-a" has its TXT asked together with A, when a
    new client connects: no round trip after a listing, one more query per
    new client; with txt = "off" it is never asked. TXT is cleaned to printable ASCII and at most 200 characters, since it
    goes into an SMTP reply.

    Timing. start() asks every enabled zone at once, through the cache
    (cache.py: TTL-clamped, coalesced) and the resolver, and fixes the
    deadline: start time + timeout, for all zones together. The resolver
    (dnsclient.DnsResolver) sends the queries from the process's I/O loop
    and returns at once, so start() never waits for DNS. result() waits
    for the lookups only until that deadline; a lookup still running then
    is a TIMEOUT. The waiting thread never blocks past the deadline; the
    lookup itself runs on, bounded by the resolver's lifetime (= timeout),
    and an answer by then still lands in the cache for the next
    connection. A caller on the I/O loop itself (the policy service) must
    not wait: it asks ready(), and when_ready() calls it back on the loop.

    A resolver with only a blocking query() (a test's stand-in) runs on a
    ThreadedResolver: a pool of DEFAULT_WORKERS_PER_ZONE (8) threads per
    zone, at least 8, at most MAX_WORKERS (128).

    Health. check_health() asks each zone its RFC 5782 test points,
    127.0.0.2 (must be listed) and 127.0.0.1 (must not be), and the IPv6
    ones ::ffff:7f00:2 and ::ffff:7f00:1 in nibble form, bypassing the cache.
    A zone that lists 127.0.0.1 or ::ffff:7f00:1 "lists the world"; one that
    answers 127.0.0.2 with error codes refuses us. Either is disabled, with an
    ERROR log, until a later round finds it healthy (a WARNING when it is
    re-enabled). A round where the IPv4 test points get no answer changes
    nothing. A zone that does not list 127.0.0.2 is kept (it can do no harm)
    but warned about once: the zone name may be wrong. IPv6 test points that
    go unanswered are ignored: not every list serves IPv6. HealthMonitor runs
    a round every few minutes in a thread of its own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import functools
import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

from relaymilter.address import IPAddress, normalise_ip, parse_ip
from relaymilter.cache import Fetch, FetchSource, LookupCache
# DnsFailure and DnsResolver are named through this module by its callers too.
from relaymilter.dnsclient import (DnsAnswer, DnsError, DnsFailure, DnsResolver,  # noqa: F401
                                   DnsTimeout)
from relaymilter.promise import Promise, succeeded, wait_all
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.text import printable
from relaymilter.zones import (PROBLEMS, ListingResult, Status, Zone, ZoneAnswer, classify,
                               reply_answer, summarise)


if TYPE_CHECKING:
    from relaymilter.ioloop import IoLoop

log = logging.getLogger(__name__)

DEFAULT_WORKERS_PER_ZONE = 8
MIN_WORKERS = 8
MAX_WORKERS = 128
DEFAULT_LOG_INTERVAL = 60.0     # seconds between two logs of one zone's problem
MAX_TXT_LENGTH = 200            # a reply line is at most 512 octets (RFC 5321)


# ------------------------------------------------------------ query names ---

def reverse_labels(address: IPAddress) -> str:
    """192.0.2.1 -> "1.2.0.192"; IPv6 -> 32 reversed nibbles. No v4 mapping."""
    if isinstance(address, ipaddress.IPv4Address):
        octets = address.packed     # str(address) is slow Python: this is per new client
        return "%d.%d.%d.%d" % (octets[3], octets[2], octets[1], octets[0])
    return ".".join(reversed(address.exploded.replace(":", "")))


def client_key(address: IPAddress) -> str:
    """str(address), faster for IPv4: the client's part of a cache key."""
    if isinstance(address, ipaddress.IPv4Address):
        return socket.inet_ntoa(address.packed)
    return str(address)


def query_name(address: IPAddress | str, zone_name: str) -> str:
    """The name to ask zone_name about a client; v4-mapped IPv6 asks as IPv4."""
    return f"{reverse_labels(client_address(address))}.{zone_name}"


def client_address(client: IPAddress | str) -> IPAddress:
    """The address a client is asked as: v4-mapped IPv6 as IPv4; ValueError."""
    return parse_ip(client) if isinstance(client, str) else normalise_ip(client)


def clean_txt(text: str) -> str:
    """A TXT record made fit for an SMTP reply: printable(), stripped, MAX_TXT_LENGTH."""
    return printable(text).strip()[:MAX_TXT_LENGTH]


# --------------------------------------------------------------- resolver ---

class Resolver(Protocol):
    """Starts one question; the future ends in a DnsAnswer (or convert(answer)),
    DnsTimeout or DnsFailure, nothing else. dnsclient.DnsResolver is the real one."""

    def submit(self, name: str, rdtype: str, lifetime: float | None = None,
               convert: Callable[[DnsAnswer], object] | None = None
               ) -> "Promise | concurrent.futures.Future": ...


class ThreadedResolver:
    """A resolver that only answers blocking query() calls, run on a bounded pool.

    For stand-ins in tests and anything else without submit(): at most
    workers of its queries run at once, the rest wait their turn.
    """

    def __init__(self, resolver: object, workers: int) -> None:
        self._resolver = resolver
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="dnsbl")

    def submit(self, name: str, rdtype: str, lifetime: float | None = None,
               convert: Callable[[DnsAnswer], object] | None = None
               ) -> concurrent.futures.Future:
        return self._pool.submit(self._query, name, rdtype, lifetime, convert)

    def _query(self, name: str, rdtype: str, lifetime: float | None,
               convert: Callable[[DnsAnswer], object] | None) -> object:
        answer = self._resolver.query(name, rdtype, lifetime)
        return answer if convert is None else convert(answer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- results ---

@dataclass(frozen=True, slots=True)
class Verdict:
    """A returning client's result, kept until the first of its answers expires."""

    result: ListingResult
    expires: float              # on the cache's clock
    disabled: frozenset[str]    # the disabled zones it was made with
    fetches: int                # the cache hits it stands for


# What the cache keeps of one zone's answers about one client. Plain
# tuples of strings and numbers, TTL first (cache.py), read by unpacking:
# the garbage collector stops tracking a plain tuple, not an instance of a
# class (a NamedTuple's either). Neither depends on the zone's codes, so a
# reload that changes them keeps the cache. `at`: when it was answered, on
# the cache's clock.
ZoneLookup = tuple        # (ttl, addresses: tuple[str, ...], nxdomain: bool, at: float)
TxtLookup = tuple         # (ttl, txt: str | None, at: float)


def report_lines(result: ListingResult) -> list[str]:
    """`relaymilter lookup IP`: the verdict, then one line per zone."""
    if result.listed:
        verdict = f"LISTED, blocked using {result.reply_zone}"
        if result.txt:
            verdict += f"; {result.txt}"
    else:
        verdict = "not listed"
    lines = [f"{result.client}: {verdict} (score {result.score}, threshold {result.threshold})"]
    width = max([4] + [len(answer.zone.display_name) for answer in result.answers])
    lines.append(f"  {'zone':<{width}}  weight  {'status':<11}  {'answer':<18}  {'ttl':>5}"
                 f"  {'source':<9}  txt")
    for answer in result.answers:
        if answer.addresses:
            raw = ",".join(answer.addresses)
        elif answer.status in (Status.LISTED, Status.NOT_LISTED, Status.ZONE_ERROR):
            raw = "NXDOMAIN" if answer.nxdomain else "NODATA"
        else:
            raw = "-"
        ttl = "-" if answer.ttl is None else str(answer.ttl)
        source = answer.source.value if answer.source else "-"
        txt = f'"{answer.txt}"' if answer.txt else ""
        lines.append(f"  {answer.zone.display_name:<{width}}  {answer.zone.weight:>6}"
                     f"  {answer.status.value:<11}  {raw:<18}  {ttl:>5}  {source:<9}  {txt}".rstrip())
    return lines


# ---------------------------------------------------------------- logging ---

class RateLimiter:
    """allow(key): log now? At most once per key per interval, thread-safe.

    Returns None when the caller should stay quiet, else how many times the
    key was refused since it was last allowed.
    """

    def __init__(self, interval: float = DEFAULT_LOG_INTERVAL,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._timer = timer
        self._lock = threading.Lock()
        self._last: dict[object, float] = {}
        self._quiet: Counter = Counter()

    def allow(self, key: object) -> int | None:
        now = self._timer()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._quiet[key] += 1
                return None
            self._last[key] = now
            return self._quiet.pop(key, 0)


# ---------------------------------------------------------------- checker ---

def default_workers(zone_count: int) -> int:
    """See "Thread pool" in the module docstring."""
    return min(MAX_WORKERS, max(MIN_WORKERS, DEFAULT_WORKERS_PER_ZONE * zone_count))


class DnsblChecker:
    """Starts and collects every zone's lookups for a client.

    Owns a bounded thread pool (close() ends it). Thread-safe: sessions on
    many threads call start(), the health monitor calls check_health().
    """

    def __init__(self, zones: Sequence[Zone], resolver: Resolver, cache: LookupCache,
                 timeout: float = 2.0, threshold: int = 1, *, max_workers: int | None = None,
                 timer: Callable[[], float] = time.monotonic,
                 log_interval: float = DEFAULT_LOG_INTERVAL,
                 metrics: Recorder = NO_METRICS) -> None:
        names = [zone.name for zone in zones]
        if len(set(names)) != len(names):
            raise ValueError("a zone is configured twice")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, not {threshold}: "
                             "a client that no zone lists would be rejected")
        self.zones = tuple(zones)
        self.timeout = timeout
        self.threshold = threshold
        if not hasattr(resolver, "submit"):
            resolver = ThreadedResolver(resolver, max_workers or default_workers(len(self.zones)))
        self._resolver = resolver
        self._cache = cache
        self._timer = timer
        self._metrics = metrics
        self._verdicts: dict[str, Verdict] = {}    # lock-free reads; writes under the lock
        self._verdicts_lock = threading.Lock()
        self._verdicts_max = max(1, cache.max_entries // max(1, len(self.zones)))
        self._problems = RateLimiter(log_interval, timer)
        self._health_lock = threading.Lock()     # one health round at a time
        self._disabled: frozenset[str] = frozenset()    # swapped, never mutated
        self._warned_test_point: set[str] = set()

    @property
    def cache(self) -> LookupCache:
        return self._cache

    # -- lookups -----------------------------------------------------------
    def start(self, client: IPAddress | str, every_txt: bool = False) -> "PendingListing":
        """Ask every enabled zone about client now; collect with result().

        every_txt: result() shows the TXT of every listing blocklist, not
        only the reply zone's (`relaymilter lookup`).
        """
        address = client_address(client)
        deadline = self._timer() + self.timeout
        disabled = self._disabled     # one read: a health round may swap it
        key = client_key(address)
        verdict = self._verdicts.get(key)
        if verdict is not None and verdict.disabled is disabled \
                and self._cache.timer() < verdict.expires:
            self._cache.count_hits(verdict.fetches)
            return PendingListing(self, address, (), deadline, verdict.result)
        lookups: list[tuple[Zone, Fetch | None]] = []
        for zone in self.zones:
            if zone.name in disabled:
                lookups.append((zone, None))
                continue
            # The query name is built only for a lookup that runs: a cache hit,
            # most connections, never needs it.
            fetch = self._cache.fetch((zone.name, key),
                                      functools.partial(self._ask_zone, address, zone))
            if zone.shows_txt and fetch.source is not FetchSource.CACHE:
                if zone.txt == "with-a":
                    self._fetch_txt(zone, address)      # no round trip after a listing
                else:
                    fetch.future.add_done_callback(
                        functools.partial(self._txt_when_listed, zone, address))
            lookups.append((zone, fetch))
        return PendingListing(self, address, tuple(lookups), deadline, every_txt=every_txt)

    def lookup(self, client: IPAddress | str) -> ListingResult:
        """start() and result() in one (the `lookup` command), with the TXT of
        every listing blocklist."""
        return self.start(client, every_txt=True).result()

    def _ask_zone(self, address: IPAddress, zone: Zone) -> "Promise | concurrent.futures.Future":
        """A zone's A query, started now and timed for the metrics."""
        started = self._timer()
        future = self._resolver.submit(query_name(address, zone.name), "A", self.timeout,
                                       self._zone_lookup)
        if self._metrics is not NO_METRICS:     # no callback per query when nothing counts
            future.add_done_callback(
                lambda _: self._metrics.dns_query(zone.display_name, self._timer() - started))
        return future

    def _fetch_txt(self, zone: Zone, address: IPAddress) -> Fetch:
        return self._cache.fetch((zone.name, client_key(address), "TXT"), functools.partial(
            self._resolver.submit, query_name(address, zone.name), "TXT", self.timeout,
            self._txt_lookup))

    def _zone_lookup(self, answer: DnsAnswer) -> ZoneLookup:
        return (answer.ttl, answer.records, answer.nxdomain, self._cache.timer())

    def _txt_lookup(self, answer: DnsAnswer) -> TxtLookup:
        texts = dict.fromkeys(answer.records)
        return (answer.ttl, clean_txt(" / ".join(texts)) if texts else None,
                self._cache.timer())

    def _remember(self, result: ListingResult, lookups: tuple[tuple[Zone, Fetch | None], ...],
                  txt_fetches: list[Fetch]) -> None:
        """Keep a returning client's verdict: one whose every answer came from the
        cache, none a problem. A client seen once (a storm) is never kept here."""
        fetches = [fetch for _, fetch in lookups if fetch is not None] + txt_fetches
        if not fetches or any(fetch.source is not FetchSource.CACHE
                              or not succeeded(fetch.future) for fetch in fetches) \
                or any(answer.status in PROBLEMS for answer in result.answers):
            return
        clamp = self._cache.clamp_ttl
        expires = min(value[-1] + clamp(value[0])       # at + ttl
                      for value in (fetch.future.result() for fetch in fetches))
        verdict = Verdict(result, expires, self._disabled, len(fetches))
        key = client_key(result.client)
        with self._verdicts_lock:
            if key not in self._verdicts and len(self._verdicts) >= self._verdicts_max:
                del self._verdicts[next(iter(self._verdicts))]  # the oldest
            self._verdicts[key] = verdict

    def _txt_when_listed(self, zone: Zone, address: IPAddress, done: "Promise") -> None:
        """A-answer callback: ask TXT at once when the zone lists the client."""
        try:
            if done.cancelled() or done.exception() is not None:
                return
            _, addresses, _, _ = done.result()
            if classify(zone, addresses) is Status.LISTED:
                self._fetch_txt(zone, address)
        except RuntimeError:
            pass    # the pool is shut down (a reload); result() fetches TXT if still wanted

    def _zone_answer(self, zone: Zone, fetch: Fetch | None) -> ZoneAnswer:
        if fetch is None:
            return ZoneAnswer(zone, Status.DISABLED)
        future = fetch.future
        if not future.done():
            return ZoneAnswer(zone, Status.TIMEOUT, source=fetch.source)
        if future.cancelled():      # the pool was shut down under us
            return ZoneAnswer(zone, Status.DNS_FAILURE, source=fetch.source)
        error = future.exception()
        if isinstance(error, DnsTimeout):
            return ZoneAnswer(zone, Status.TIMEOUT, source=fetch.source)
        if isinstance(error, DnsError):
            return ZoneAnswer(zone, Status.DNS_FAILURE, source=fetch.source)
        if error is not None:
            raise error             # a bug: the edge logs it and answers on_error
        ttl, addresses, nxdomain, _ = future.result()
        return ZoneAnswer(zone, classify(zone, addresses), addresses, ttl, nxdomain,
                          source=fetch.source)

    def _txt_fetches(self, address: IPAddress, answers: Sequence[ZoneAnswer],
                     every: bool = False) -> dict[int, Fetch]:
        """The TXT lookups the verdict shows, by answer index: the reply zone's
        when the client is listed (every listing blocklist's for `lookup`)."""
        if every:
            wanted = [index for index, answer in enumerate(answers)
                      if answer.status is Status.LISTED and answer.zone.shows_txt]
        else:
            reply = reply_answer(answers, self.threshold)
            wanted = [answers.index(reply)] if reply is not None and reply.zone.shows_txt else []
        fetches = {}
        for index in wanted:
            try:
                fetches[index] = self._fetch_txt(answers[index].zone, address)
            except RuntimeError:
                pass        # the resolver is closed (a reload): no TXT
        return fetches

    def _with_txt(self, address: IPAddress, answers: list[ZoneAnswer], deadline: float,
                  every: bool = False) -> tuple[list[ZoneAnswer], list[Fetch]]:
        """Add the TXT the verdict shows, waiting until the deadline at most;
        the answers, and the TXT fetches made."""
        fetches = self._txt_fetches(address, answers, every)
        if not fetches:
            return answers, []
        remaining = deadline - self._timer()
        if remaining > 0:
            wait_all([fetch.future for fetch in fetches.values()], remaining)
        answers = list(answers)
        for index, fetch in fetches.items():
            if succeeded(fetch.future):
                _, txt, _ = fetch.future.result()
                answers[index] = dataclasses.replace(answers[index], txt=txt)
        return answers, list(fetches.values())

    def _record(self, result: ListingResult) -> None:
        """Count every zone's status (metrics); log problems, rate-limited."""
        for answer in result.answers:
            self._metrics.dnsbl_answer(answer.zone.display_name, answer.status.value)
        for answer in result.answers:
            if answer.status in PROBLEMS:
                self._log_problem(result.client, answer)

    def _log_problem(self, client: IPAddress, answer: ZoneAnswer) -> None:
        quiet = self._problems.allow((answer.zone.name, answer.status))
        if quiet is None:
            return
        more = f" ({quiet} more since last logged)" if quiet else ""
        zone = answer.zone.display_name
        if answer.status is Status.ZONE_ERROR:
            log.warning("dnsbl %s: answered %s for %s: an error code, not a listing "
                        "(query refused, public resolver, rate limited?); zone ignored%s",
                        zone, ",".join(answer.addresses), client, more)
        elif answer.status is Status.TIMEOUT:
            log.warning("dnsbl %s: no answer for %s within %gs; counted as not listed%s",
                        zone, client, self.timeout, more)
        else:
            log.warning("dnsbl %s: lookup for %s failed (SERVFAIL, REFUSED or no nameserver); "
                        "counted as not listed%s", zone, client, more)

    @property
    def disabled_zones(self) -> frozenset[str]:
        """Display names of the zones the last health checks disabled."""
        disabled = self._disabled
        return frozenset(zone.display_name for zone in self.zones if zone.name in disabled)

    # -- health ------------------------------------------------------------
    def check_health(self) -> tuple["HealthReport", ...]:
        """One RFC 5782 test-point round for every zone; see the docstring."""
        with self._health_lock:
            futures = {(zone.name, point): self._resolver.submit(
                           probe_name(point, zone.name), "A", self.timeout)
                       for zone in self.zones for point in TEST_POINTS}
            # Each query ends within the resolver's lifetime; the margin
            # covers its overshoot. Anything later counts as a timeout.
            wait_all(futures.values(), self.timeout + 1.0)
            reports = []
            disabled = set(self._disabled)
            for zone in self.zones:
                answers = {point: _point_outcome(futures[(zone.name, point)])
                           for point in TEST_POINTS}
                health, detail = judge_health(zone, answers)
                self._apply_health(zone, health, detail, disabled)
                reports.append(HealthReport(zone, health, detail, zone.name not in disabled))
            self._disabled = frozenset(disabled)
            return tuple(reports)

    def _apply_health(self, zone: Zone, health: "Health", detail: str, disabled: set[str]) -> None:
        shown = zone.display_name
        if health in (Health.LISTS_THE_WORLD, Health.ERROR_CODES):
            if zone.name not in disabled:
                disabled.add(zone.name)
                log.error("dnsbl %s: disabled, %s", shown, detail)
        elif health is Health.HEALTHY:
            if zone.name in disabled:
                disabled.discard(zone.name)
                log.warning("dnsbl %s: re-enabled, its test points answer correctly again", shown)
            if detail and zone.name not in self._warned_test_point:
                self._warned_test_point.add(zone.name)
                log.warning("dnsbl %s: %s", shown, detail)
        else:
            log.warning("dnsbl %s: health check inconclusive (%s); zone stays %s", shown, detail,
                        "disabled" if zone.name in disabled else "enabled")

    # -- life cycle ----------------------------------------------------------
    def close(self) -> None:
        """Close the resolver; lookups still running finish on their own.

        Lookups still queued (a ThreadedResolver's) are cancelled and read
        as DNS_FAILURE (fail open); start() on a closed checker raises
        RuntimeError, so a reload swaps the reference to the new checker
        before closing the old one.
        """
        self._resolver.close()

    def __enter__(self) -> "DnsblChecker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PendingListing:
    """A client's lookups in flight; result() collects them by the deadline."""

    def __init__(self, checker: DnsblChecker, client: IPAddress,
                 lookups: tuple[tuple[Zone, Fetch | None], ...], deadline: float,
                 known: ListingResult | None = None, every_txt: bool = False) -> None:
        self.client = client
        self.deadline = deadline
        self._checker = checker
        self._lookups = lookups
        self._known = known         # a kept verdict: nothing to wait for
        self._every_txt = every_txt
        self._lock = threading.Lock()
        self._result: ListingResult | None = None
        self._final_answers: list[ZoneAnswer] | None = None   # once every zone answered

    def ready(self) -> bool:
        """Would result() return without waiting? Every zone has answered, and
        so has the TXT the verdict shows (asked now if it was not), or the
        deadline has passed."""
        if self._known is not None or self._result is not None \
                or self._checker._timer() >= self.deadline:
            return True
        return not self._outstanding()

    def _outstanding(self) -> list:
        """The lookups result() would still wait for."""
        waiting = [fetch.future for _, fetch in self._lookups
                   if fetch is not None and not fetch.future.done()]
        if waiting:
            return waiting
        return [fetch.future
                for fetch in self._checker._txt_fetches(self.client, self._answers()).values()
                if not fetch.future.done()]

    def _answers(self) -> list[ZoneAnswer]:
        """Every zone's answer now; classified once, when all of them are in."""
        if self._final_answers is not None:
            return self._final_answers
        checker = self._checker
        answers = [checker._zone_answer(zone, fetch) for zone, fetch in self._lookups]
        if all(fetch is None or fetch.future.done() for _, fetch in self._lookups):
            self._final_answers = answers
        return answers

    def when_ready(self, io: "IoLoop", callback: Callable[[], None]) -> None:
        """Call callback() once, on io's loop, as soon as ready() is true.

        For a caller on the loop, which must never block in result(): the
        answers arrive on the loop, and a timer there fires at the deadline.
        """
        io.call(_Readiness(self, io, callback).arm)

    def result(self) -> ListingResult:
        """The verdict; blocks at most until the deadline set by start().

        Computed once: later calls (one per recipient) return the same
        result without logging or counting again.
        """
        with self._lock:
            if self._result is None:
                if self._known is not None:
                    self._result = self._known
                    self._checker._record(self._known)
                else:
                    self._result = self._collect()
            return self._result

    def _collect(self) -> ListingResult:
        checker = self._checker
        futures = [fetch.future for _, fetch in self._lookups if fetch is not None]
        if not all(future.done() for future in futures):
            remaining = self.deadline - checker._timer()
            if remaining > 0:
                wait_all(futures, remaining)
        answers, txt_fetches = checker._with_txt(self.client, self._answers(), self.deadline,
                                                 self._every_txt)
        result = summarise(self.client, answers, checker.threshold)
        checker._record(result)
        checker._remember(result, self._lookups, txt_fetches)
        return result



# ----------------------------------------------------------------- health ---

class Health(enum.Enum):
    HEALTHY = "healthy"
    LISTS_THE_WORLD = "lists-the-world"     # lists 127.0.0.1: would reject everyone
    ERROR_CODES = "error-codes"             # answers 127.0.0.2 with error codes
    UNKNOWN = "unknown"                     # the IPv4 test points went unanswered


@dataclass(frozen=True)
class HealthReport:
    zone: Zone
    health: Health
    detail: str
    enabled: bool


# RFC 5782 section 5: (address, must be listed). The IPv6 ones are asked in
# nibble form as they are, not mapped to IPv4 as a client's would be.
TEST_POINTS: tuple[tuple[IPAddress, bool], ...] = (
    (ipaddress.IPv4Address("127.0.0.2"), True),
    (ipaddress.IPv4Address("127.0.0.1"), False),
    (ipaddress.IPv6Address("::ffff:7f00:2"), True),
    (ipaddress.IPv6Address("::ffff:7f00:1"), False),
)


def probe_name(point: tuple[IPAddress, bool], zone_name: str) -> str:
    return f"{reverse_labels(point[0])}.{zone_name}"


def _point_outcome(future: "Promise") -> DnsAnswer | DnsError:
    if not future.done():
        return DnsTimeout("no answer within the health check")
    error = future.exception()
    if isinstance(error, DnsError):
        return error
    if error is not None:
        raise error
    return future.result()


def judge_health(zone: Zone,
                 answers: Mapping[tuple[IPAddress, bool], DnsAnswer | DnsError]) -> tuple[Health, str]:
    """Health from the test points' answers; the detail says why."""
    unanswered_v4 = []
    not_listed_v4 = []
    for (address, must_list), answer in answers.items():
        if isinstance(answer, DnsError):
            if address.version == 4:
                unanswered_v4.append(f"{address}: {answer}")
            continue
        status = classify(zone, answer.records)
        if not must_list and status is Status.LISTED:
            return Health.LISTS_THE_WORLD, (f"it lists the test point {address}, which no list "
                                            f"may list: it lists the world")
        if must_list and status is Status.ZONE_ERROR:
            return Health.ERROR_CODES, (f"it answers the test point {address} with error code "
                                        f"{','.join(answer.records)}: it refuses our queries")
        if must_list and status is Status.NOT_LISTED and address.version == 4:
            not_listed_v4.append(str(address))
    if unanswered_v4:
        return Health.UNKNOWN, "; ".join(unanswered_v4)
    if not_listed_v4:
        return Health.HEALTHY, (f"it does not list the test point {not_listed_v4[0]} "
                                f"(RFC 5782): is the zone name right?")
    return Health.HEALTHY, ""


class HealthMonitor:
    """A daemon thread running checker.check_health() every interval seconds."""

    def __init__(self, checker: DnsblChecker, interval: float = 300.0) -> None:
        self.checker = checker
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """First round at once, then one every interval."""
        if self._thread is not None:
            raise RuntimeError("health monitor already started")
        self._thread = threading.Thread(target=self._run, name="dnsbl-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop, waiting for a round in progress (bounded by its DNS timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                self.checker.check_health()
            except Exception:   # the thread's edge: one bad round must not end the checks
                log.exception("dnsbl health check failed")
            if self._stop.wait(self.interval):
                return


class _Readiness:
    """PendingListing.when_ready(): callback() once, when the listing is ready
    or its deadline has passed; owned by the loop thread.

    An object rather than closures that call each other: those were a
    reference cycle per request, left for the garbage collector. Once it
    has fired it lets go of the listing and the callback, so the deadline
    timer, which stays in the loop's heap until it is due, keeps nothing
    of the request alive.
    """

    __slots__ = ("_listing", "_io", "_callback", "_remaining")

    def __init__(self, listing: PendingListing, io: "IoLoop",
                 callback: Callable[[], None]) -> None:
        self._listing: PendingListing | None = listing
        self._io = io
        self._callback: Callable[[], None] | None = callback
        self._remaining = 0         # lookups still running since the last check

    def arm(self) -> None:
        self._io.at(self._listing.deadline, self.fire)     # both on time.monotonic
        self._check()

    def fire(self) -> None:
        callback = self._callback
        if callback is None:
            return
        self._listing = self._callback = None
        callback()

    def _check(self) -> None:
        if self._listing is None:
            return
        outstanding = self._listing._outstanding()
        if not outstanding:
            self.fire()
            return
        # Look again once all of them have ended (counted on the loop): the
        # answers may bring a TXT lookup to wait for.
        self._remaining = len(outstanding)
        for future in outstanding:
            future.add_done_callback(self._ended)

    def _ended(self, _: object) -> None:
        self._io.call(self._count_down)     # a ThreadedResolver's future ends on its thread

    def _count_down(self) -> None:
        self._remaining -= 1
        if self._remaining == 0:
            self._check()
