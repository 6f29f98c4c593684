"""dnsbl - is the client listed? DNSBL and DNSWL queries, answers, weights.

NAME
    dnsbl - query names, answer classification, weights, the deadline, list health

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

    Answers. Each zone's A answer is classified (classify()):
      LISTED       an address in the zone's codes;
      NOT_LISTED   NXDOMAIN, no A record, or 127/8 outside the codes;
      ZONE_ERROR   an address in 127.255.255.0/24 or outside 127.0.0.0/8:
                   the zone refusing us (Spamhaus answers 127.255.255.254 to
                   public resolvers), never a listing, whatever the codes say;
      TIMEOUT, DNS_FAILURE   no answer by the deadline; SERVFAIL, REFUSED or
                   no usable nameserver. Counted as not listed: mail flows.
      DISABLED     the zone failed its last health check and is not asked.
    Every zone's status is counted (counters(), and the metrics recorder
    when metrics are on, which also times each A query that is sent).
    Problems are logged at most once per zone and kind
    per log_interval (60 s), with how many were not logged in between. Logs
    and counters name zones by display_name, never by their real name, which
    may hold an access key; for the same reason query names are never logged.

    Verdict. The score is the sum of the weights of the LISTED zones; a
    negative weight makes a zone an allowlist (DNSWL). The client is listed
    when score >= threshold. The reply names the listing zone with the
    highest positive weight, with its TXT record when it has one.

    TXT. When a blocklist's (weight > 0) A answer lists the client, its TXT
    record is asked at once, as a lookup of its own with its own cache entry
    (an allowlist's TXT is never shown, so never asked). The verdict does not
    depend on it: result() waits for TXT only until the same deadline, and a
    listing stands without it. That costs a listed client one more round
    trip; a clean client costs no TXT query at all (Postfix does the same).
    TXT is cleaned to printable ASCII and at most 200 characters, since it
    goes into an SMTP reply.

    Timing. start() asks every enabled zone at once, through the cache
    (cache.py: TTL-clamped, coalesced) and the checker's own thread pool,
    and fixes the deadline: start time + timeout, for all zones together.
    result() waits for the lookups only until that deadline; a lookup still
    running then is a TIMEOUT. The waiting thread never blocks past the
    deadline, whatever the DNS threads do; the lookup itself runs on, is
    bounded by the resolver's lifetime (= timeout), and its answer still
    lands in the cache for the next connection.

    Thread pool. DEFAULT_WORKERS_PER_ZONE (8) workers per zone, at least 8,
    at most MAX_WORKERS (128). One connection needs one worker per zone for
    its lookups to run in parallel; 8 per zone keeps 8 connections' cache
    misses running at once, which at a typical 20-50 ms per query is
    hundreds of new clients a second, while cache hits and coalesced
    lookups take no worker at all. Past that, lookups queue and the clients
    are answered "not listed" at their deadline (fail open); the cap bounds
    the threads that a hanging list server can tie up, each for at most the
    resolver's lifetime.

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
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
try:
    from dns.nameserver import Do53Nameserver
except ImportError:         # dnspython < 2.4 (Debian 12 has 2.3): no nameserver objects
    Do53Nameserver = None

from relaymilter.address import IPAddress, normalise_ip, parse_ip
from relaymilter.cache import Fetch, FetchSource, LookupCache
from relaymilter.recorder import NO_METRICS, Recorder


log = logging.getLogger(__name__)

LOOPBACK_NETWORK = ipaddress.IPv4Network("127.0.0.0/8")
ERROR_NETWORK = ipaddress.IPv4Network("127.255.255.0/24")

DEFAULT_WORKERS_PER_ZONE = 8
MIN_WORKERS = 8
MAX_WORKERS = 128
DEFAULT_LOG_INTERVAL = 60.0     # seconds between two logs of one zone's problem
MAX_TXT_LENGTH = 200            # a reply line is at most 512 octets (RFC 5321)

# The longest reverse name, an IPv6 client's 32 nibbles with their dots,
# plus the dot before the zone, must still fit a 253-character DNS name.
MAX_ZONE_NAME_LENGTH = 253 - 64


# ------------------------------------------------------------------ codes ---

@dataclass(frozen=True)
class CodeRange:
    """An inclusive range of answer addresses that mean "listed"."""

    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    def __contains__(self, address: object) -> bool:
        return isinstance(address, ipaddress.IPv4Address) and self.first <= address <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


# 127.0.0.0/8 minus the error codes in 127.255.255.0/24.
DEFAULT_CODES: tuple[CodeRange, ...] = (
    CodeRange(LOOPBACK_NETWORK.network_address, ERROR_NETWORK.network_address - 1),
)


def parse_codes(entries: Iterable[str]) -> tuple[CodeRange, ...]:
    """["127.0.0.2-127.0.0.11", "127.0.0.20", "127.0.1.0/24"] -> ranges.

    Raises ValueError naming the entry: codes must lie in 127.0.0.0/8 and
    outside 127.255.255.0/24, because any other answer is a zone error and
    can never list; a list of no codes could never list either.
    """
    if isinstance(entries, str):
        raise ValueError(f"codes must be a list, not the string {entries!r}")
    ranges = tuple(_parse_code(entry) for entry in entries)
    if not ranges:
        raise ValueError("no codes: the zone could never list anyone")
    return ranges


def _parse_code(entry: str) -> CodeRange:
    text = entry.strip()
    try:
        if "/" in text:
            network = ipaddress.IPv4Network(text, strict=True)
            first, last = network.network_address, network.broadcast_address
        elif "-" in text:
            low, high = text.split("-", 1)
            first, last = ipaddress.IPv4Address(low.strip()), ipaddress.IPv4Address(high.strip())
        else:
            first = last = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"{entry!r} is not an IPv4 address, range A-B or network") from None
    if first > last:
        raise ValueError(f"{entry!r} is an empty range: {first} comes after {last}")
    if first not in LOOPBACK_NETWORK or last not in LOOPBACK_NETWORK:
        raise ValueError(f"{entry!r} is outside 127.0.0.0/8: such answers are zone errors")
    if first <= ERROR_NETWORK.broadcast_address and last >= ERROR_NETWORK.network_address:
        raise ValueError(f"{entry!r} overlaps 127.255.255.0/24, the error codes")
    return CodeRange(first, last)


# ------------------------------------------------------------------ zones ---

@dataclass(frozen=True)
class Zone:
    """One DNSBL or DNSWL zone.

    name          the DNS zone, lower case, no trailing dot (may hold a key)
    display_name  what replies, logs and counters call it
    weight        added to the score when the zone lists the client;
                  negative for an allowlist
    codes         answer addresses that mean "listed"
    """

    name: str
    display_name: str
    weight: int
    codes: tuple[CodeRange, ...] = DEFAULT_CODES

    @classmethod
    def build(cls, name: str, weight: int = 1, codes: Iterable[str] | None = None,
              display_name: str | None = None) -> "Zone":
        """A zone from config values; raises ValueError saying what is wrong."""
        zone_name = normalise_zone_name(name)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"weight must be an integer, not {weight!r}")
        shown = zone_name if display_name is None else display_name.strip()
        if not shown or not shown.isprintable():
            raise ValueError(f"display_name {display_name!r} must be printable and not empty")
        ranges = DEFAULT_CODES if codes is None else parse_codes(codes)
        return cls(name=zone_name, display_name=shown, weight=weight, codes=ranges)

    def lists(self, address: ipaddress.IPv4Address) -> bool:
        return any(address in code for code in self.codes)


def normalise_zone_name(name: str) -> str:
    """"Zen.Spamhaus.ORG." -> "zen.spamhaus.org"; ValueError if not a DNS name."""
    text = name.strip().rstrip(".").lower()
    if not text:
        raise ValueError("empty zone name")
    try:
        dns.name.from_text(text)
    except dns.exception.DNSException as error:
        raise ValueError(f"{name!r} is not a DNS name: {error}") from None
    if len(text) > MAX_ZONE_NAME_LENGTH:
        raise ValueError(f"{name!r} is too long: with an IPv6 client's 32 nibbles "
                         f"the query name would pass 253 characters")
    return text


# ------------------------------------------------------------ query names ---

def reverse_labels(address: IPAddress) -> str:
    """192.0.2.1 -> "1.2.0.192"; IPv6 -> 32 reversed nibbles. No v4 mapping."""
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def query_name(address: IPAddress | str, zone_name: str) -> str:
    """The name to ask zone_name about a client; v4-mapped IPv6 asks as IPv4."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    return f"{reverse_labels(normalise_ip(address))}.{zone_name}"


# ---------------------------------------------------------------- answers ---

class Status(enum.Enum):
    """What one zone's answer means for one client."""

    LISTED = "listed"
    NOT_LISTED = "not-listed"
    ZONE_ERROR = "zone-error"
    TIMEOUT = "timeout"
    DNS_FAILURE = "dns-failure"
    DISABLED = "disabled"


PROBLEMS = frozenset({Status.ZONE_ERROR, Status.TIMEOUT, Status.DNS_FAILURE})


def is_error_code(address: ipaddress.IPv4Address) -> bool:
    """Outside 127.0.0.0/8 or inside 127.255.255.0/24: a zone error."""
    return address not in LOOPBACK_NETWORK or address in ERROR_NETWORK


def classify(zone: Zone, addresses: Sequence[str]) -> Status:
    """LISTED, NOT_LISTED or ZONE_ERROR for one zone's A answer.

    One error code (or a record that is no IPv4 address) makes the whole
    answer a ZONE_ERROR: an answer that says "something is wrong" is no
    evidence either way.
    """
    parsed = []
    for text in addresses:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            return Status.ZONE_ERROR
        if is_error_code(address):
            return Status.ZONE_ERROR
        parsed.append(address)
    return Status.LISTED if any(zone.lists(address) for address in parsed) else Status.NOT_LISTED


def clean_txt(text: str) -> str:
    """Printable ASCII only, at most MAX_TXT_LENGTH: it goes into an SMTP reply."""
    cleaned = "".join(char if " " <= char <= "~" else "?" for char in text).strip()
    return cleaned[:MAX_TXT_LENGTH]


# --------------------------------------------------------------- resolver ---

class DnsError(Exception):
    """No usable answer; the message never holds the query name."""


class DnsTimeout(DnsError):
    """No answer within the lifetime."""


class DnsFailure(DnsError):
    """SERVFAIL, REFUSED, no usable nameserver, a malformed answer."""


@dataclass(frozen=True)
class DnsAnswer:
    """One query's answer: records as text, and how long it may be kept.

    An empty records tuple is NXDOMAIN (nxdomain=True) or NODATA; its ttl
    is then the negative TTL from the SOA in the authority section.
    """

    records: tuple[str, ...]
    ttl: int
    nxdomain: bool = False


class Resolver(Protocol):
    """Answers one question; raises DnsTimeout or DnsFailure, nothing else."""

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> DnsAnswer: ...


def split_nameserver(text: str) -> tuple[str, int]:
    """"192.0.2.1" / "127.0.0.1:5353" / "::1" / "[::1]:5353" -> (ip, port)."""
    entry = text.strip()
    port = 53
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        if rest:
            port = _port(rest[1:], text)
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
        port = _port(port_text, text)
    else:
        host = entry
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host, port


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: port {text!r} is not 1-65535")
    return int(text)


def negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) from the authority section, else 0."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return min(rrset.ttl, rrset[0].minimum)
    return 0


class DnsResolver:
    """The real resolver (dnspython).

    nameservers [] reads /etc/resolv.conf; otherwise "ip", "ip:port" or
    "[ipv6]:port". timeout is each query's default lifetime, shared by at
    least two tries. dnspython's own cache is off: cache.py does the
    caching, TTL-clamped and shared between threads.
    """

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 2.0) -> None:
        if nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            servers = [split_nameserver(text) for text in nameservers]
            if Do53Nameserver is not None:
                resolver.nameservers = [Do53Nameserver(ip, port) for ip, port in servers]
            else:                   # dnspython 2.3: addresses, and their ports apart
                resolver.nameservers = [ip for ip, _ in servers]
                resolver.nameserver_ports = {ip: port for ip, port in servers}
        else:
            resolver = dns.resolver.Resolver()
        resolver.cache = None
        resolver.lifetime = timeout
        # Each try gets a share of the lifetime, so a lost packet is sent
        # again and a dead first nameserver leaves time for the next one.
        resolver.timeout = timeout / max(2, len(resolver.nameservers))
        resolver.retry_servfail = False
        self.timeout = timeout
        self._resolver = resolver

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> DnsAnswer:
        absolute = name if name.endswith(".") else name + "."    # no search list
        try:
            answer = self._resolver.resolve(absolute, rdtype, search=False,
                                            raise_on_no_answer=False,
                                            lifetime=self.timeout if lifetime is None else lifetime)
        except dns.resolver.NXDOMAIN as error:
            responses = list(error.responses().values())
            return DnsAnswer((), negative_ttl(responses[0] if responses else None), nxdomain=True)
        except dns.exception.Timeout:
            raise DnsTimeout("no answer within the lifetime") from None
        except dns.resolver.NoNameservers:
            raise DnsFailure("no nameserver answered (SERVFAIL, REFUSED or unreachable)") from None
        except (dns.exception.DNSException, OSError) as error:
            raise DnsFailure(type(error).__name__) from None
        if answer.rrset is None:
            return DnsAnswer((), negative_ttl(answer.response))
        ttl = min(rrset.ttl for rrset in answer.response.answer)
        return DnsAnswer(tuple(_record_text(rdata) for rdata in answer.rrset), ttl)


def _record_text(rdata: object) -> str:
    strings = getattr(rdata, "strings", None)
    if strings is not None:     # TXT: the character-strings, joined
        return b"".join(strings).decode("utf-8", "replace")
    return rdata.to_text()      # A: dotted quad


# ---------------------------------------------------------------- results ---

@dataclass(frozen=True)
class ZoneLookup:
    """The DNS side of one zone's A answer about one client, as cached.

    It does not depend on the zone's codes, so a reload that changes them
    can keep the cache.
    """

    addresses: tuple[str, ...]
    ttl: int
    nxdomain: bool


@dataclass(frozen=True)
class TxtLookup:
    """A zone's TXT answer about one client, cleaned, as cached."""

    txt: str | None
    ttl: int


@dataclass(frozen=True)
class ZoneAnswer:
    """One zone's answer about one client, classified."""

    zone: Zone
    status: Status
    addresses: tuple[str, ...] = ()
    ttl: int | None = None
    nxdomain: bool = False
    txt: str | None = None          # only when LISTED
    source: FetchSource | None = None

    @property
    def from_cache(self) -> bool:
        return self.source is FetchSource.CACHE

    @property
    def contribution(self) -> int:
        return self.zone.weight if self.status is Status.LISTED else 0


@dataclass(frozen=True)
class ListingResult:
    """The verdict on one client: listed when score >= threshold.

    reply_zone and txt come from the listing zone with the highest positive
    weight (the first in config order on a tie); both are None when the
    client is not listed.
    """

    client: IPAddress
    answers: tuple[ZoneAnswer, ...]
    score: int
    threshold: int
    listed: bool
    reply_zone: str | None
    txt: str | None


def summarise(client: IPAddress, answers: Sequence[ZoneAnswer], threshold: int) -> ListingResult:
    """Weights of the listing zones -> score -> verdict and reply zone."""
    score = sum(answer.contribution for answer in answers)
    listed = score >= threshold
    reply = None
    if listed:
        blocking = [answer for answer in answers
                    if answer.status is Status.LISTED and answer.zone.weight > 0]
        reply = max(blocking, key=lambda answer: answer.zone.weight, default=None)
    return ListingResult(client=client, answers=tuple(answers), score=score, threshold=threshold,
                         listed=listed, reply_zone=reply.zone.display_name if reply else None,
                         txt=reply.txt if reply else None)


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
        self._resolver = resolver
        self._cache = cache
        self._timer = timer
        self._metrics = metrics
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers or default_workers(len(self.zones)),
            thread_name_prefix="dnsbl")
        self._problems = RateLimiter(log_interval, timer)
        self._counts_lock = threading.Lock()
        self._counts: Counter = Counter()
        self._health_lock = threading.Lock()     # one health round at a time
        self._disabled: frozenset[str] = frozenset()    # swapped, never mutated
        self._warned_test_point: set[str] = set()

    @property
    def cache(self) -> LookupCache:
        return self._cache

    # -- lookups -----------------------------------------------------------
    def start(self, client: IPAddress | str) -> "PendingListing":
        """Ask every enabled zone about client now; collect with result()."""
        address = parse_ip(client) if isinstance(client, str) else normalise_ip(client)
        deadline = self._timer() + self.timeout
        disabled = self._disabled     # one read: a health round may swap it
        lookups: list[tuple[Zone, Fetch | None]] = []
        client_key = str(address)
        for zone in self.zones:
            if zone.name in disabled:
                lookups.append((zone, None))
                continue
            # The query name is built only for a lookup that runs: a cache hit,
            # most connections, never needs it.
            fetch = self._cache.fetch((zone.name, client_key),
                                      functools.partial(self._look_up_zone, address, zone),
                                      self._executor)
            if zone.weight > 0 and fetch.source is not FetchSource.CACHE:
                fetch.future.add_done_callback(
                    functools.partial(self._txt_when_listed, zone, address))
            lookups.append((zone, fetch))
        return PendingListing(self, address, tuple(lookups), deadline)

    def lookup(self, client: IPAddress | str) -> ListingResult:
        """start() and result() in one (the `lookup` command)."""
        return self.start(client).result()

    def _look_up_zone(self, address: IPAddress, zone: Zone) -> ZoneLookup:
        """Runs in the pool: a zone's A query, timed for the metrics."""
        started = self._timer()
        try:
            return self._look_up(query_name(address, zone.name))
        finally:
            self._metrics.dns_query(zone.display_name, self._timer() - started)

    def _look_up(self, name: str) -> ZoneLookup:
        """Runs in the pool: the A query."""
        answer = self._resolver.query(name, "A", self.timeout)
        return ZoneLookup(answer.records, answer.ttl, answer.nxdomain)

    def _look_up_txt(self, name: str) -> TxtLookup:
        """Runs in the pool: the TXT query of a listing."""
        answer = self._resolver.query(name, "TXT", self.timeout)
        texts = dict.fromkeys(answer.records)
        return TxtLookup(clean_txt(" / ".join(texts)) if texts else None, answer.ttl)

    def _fetch_txt(self, zone: Zone, address: IPAddress) -> Fetch:
        return self._cache.fetch((zone.name, str(address), "TXT"),
                                 functools.partial(self._look_up_txt, query_name(address, zone.name)),
                                 self._executor)

    def _txt_when_listed(self, zone: Zone, address: IPAddress, done: concurrent.futures.Future) -> None:
        """A-answer callback: ask TXT at once when the zone lists the client."""
        try:
            if done.cancelled() or done.exception() is not None:
                return
            if classify(zone, done.result().addresses) is Status.LISTED:
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
        found: ZoneLookup = future.result()
        status = classify(zone, found.addresses)
        return ZoneAnswer(zone, status, found.addresses, found.ttl, found.nxdomain,
                          source=fetch.source)

    def _with_txt(self, address: IPAddress, answers: list[ZoneAnswer],
                  deadline: float) -> list[ZoneAnswer]:
        """Add TXT to the blocklists' listings, waiting until the deadline at most."""
        wanted = {index: answer for index, answer in enumerate(answers)
                  if answer.status is Status.LISTED and answer.zone.weight > 0}
        if not wanted:
            return answers
        fetches = {}
        for index, answer in wanted.items():
            try:
                fetches[index] = self._fetch_txt(answer.zone, address)
            except RuntimeError:
                pass    # the pool is shut down: no TXT
        remaining = deadline - self._timer()
        if remaining > 0:
            concurrent.futures.wait([fetch.future for fetch in fetches.values()],
                                    timeout=remaining)
        answers = list(answers)
        for index, fetch in fetches.items():
            future = fetch.future
            if future.done() and not future.cancelled() and future.exception() is None:
                answers[index] = dataclasses.replace(answers[index], txt=future.result().txt)
        return answers

    def _record(self, result: ListingResult) -> None:
        """Count every zone's status; log problems, rate-limited."""
        with self._counts_lock:
            for answer in result.answers:
                self._counts[(answer.zone.display_name, answer.status.value)] += 1
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

    def counters(self) -> dict[tuple[str, str], int]:
        """(zone display_name, status value) -> answers so classified."""
        with self._counts_lock:
            return dict(self._counts)

    @property
    def disabled_zones(self) -> frozenset[str]:
        """Display names of the zones the last health checks disabled."""
        disabled = self._disabled
        return frozenset(zone.display_name for zone in self.zones if zone.name in disabled)

    # -- health ------------------------------------------------------------
    def check_health(self) -> tuple["HealthReport", ...]:
        """One RFC 5782 test-point round for every zone; see the docstring."""
        with self._health_lock:
            futures = {(zone.name, point): self._executor.submit(
                           self._resolver.query, probe_name(point, zone.name), "A", self.timeout)
                       for zone in self.zones for point in TEST_POINTS}
            # Each query ends within the resolver's lifetime; the margin
            # covers its overshoot. Anything later counts as a timeout.
            concurrent.futures.wait(futures.values(), timeout=self.timeout + 1.0)
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
        """End the pool; lookups still running finish on their own.

        Lookups still queued are cancelled and read as DNS_FAILURE (fail
        open); start() on a closed checker raises RuntimeError, so a reload
        swaps the reference to the new checker before closing the old one.
        """
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "DnsblChecker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PendingListing:
    """A client's lookups in flight; result() collects them by the deadline."""

    def __init__(self, checker: DnsblChecker, client: IPAddress,
                 lookups: tuple[tuple[Zone, Fetch | None], ...], deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self._checker = checker
        self._lookups = lookups
        self._lock = threading.Lock()
        self._result: ListingResult | None = None

    def result(self) -> ListingResult:
        """The verdict; blocks at most until the deadline set by start().

        Computed once: later calls (one per recipient) return the same
        result without logging or counting again.
        """
        with self._lock:
            if self._result is None:
                self._result = self._collect()
            return self._result

    def _collect(self) -> ListingResult:
        checker = self._checker
        futures = [fetch.future for _, fetch in self._lookups if fetch is not None]
        if not all(future.done() for future in futures):
            remaining = self.deadline - checker._timer()
            if remaining > 0:
                concurrent.futures.wait(futures, timeout=remaining)
        answers = [checker._zone_answer(zone, fetch) for zone, fetch in self._lookups]
        answers = checker._with_txt(self.client, answers, self.deadline)
        result = summarise(self.client, answers, checker.threshold)
        checker._record(result)
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


def _point_outcome(future: concurrent.futures.Future) -> DnsAnswer | DnsError:
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
