"""dnsbl_verdicts - how fast the DNSBL engine answers: cache hits, and parallel zones.

NAME
    dnsbl_verdicts - verdicts per second from the cache; latency of 4 slow zones

SYNOPSIS
    .venv/bin/python bench/dnsbl_verdicts.py [--quick] [--clients N] [--verdicts N]
                                             [--threads T] [--seconds S] [--samples N]
                                             [--delay D]

DESCRIPTION
    A "verdict" is what the milter does for each SMTP connection:
    checker.start(ip).result() (relaymilter/dnsbl.py), start() at connect,
    result() when the verdict is needed. Here result() follows start() at
    once, so every figure is the whole cost of one verdict. Client addresses
    are ipaddress objects, as the milter passes them, and all come from
    127.0.0.0/8 (127.1.0.0/16 and up), so nothing but loopback is named,
    even inside a query name. Every server listens on 127.0.0.1.

    Part 1 - cache hits. A private rbldnsd (tests/integration/rbldnsd.py)
    serves two zones: bl.bench (weight 1; every 4th client listed, with a
    TXT record) and wl.bench (weight -2; every 10th client). A real
    DnsResolver asks it about --clients distinct clients (default 1000), so
    the cache (LookupCache, min_ttl = max_ttl = 3600 s: nothing expires during
    the run) holds real answers: one A entry per zone and client, and one
    TXT entry (its own key) per bl.bench listing. An allowlist's TXT is never
    asked (dnsbl.py, "TXT."). The script checks that rbldnsd saw exactly the
    expected questions (one A per zone and client, one TXT per bl.bench
    listing, none for wl.bench), that the cache counters match (a miss per
    entry; each listing's TXT key is fetched twice, by the A answer's
    done-callback and by result(), and the second fetch is a hit or a
    coalesced lookup depending on timing, so their sum is checked: one per
    listing), and that every verdict came out right, TXT included. Then, timed:
      (1a) one thread runs --verdicts verdicts, cycling over the clients;
      (1b) --threads threads (default 8) run verdicts at once for --seconds,
           each cycling over the clients from its own offset.
    After each run the cache counters (cache.stats()) must show exactly 2 A
    hits per verdict plus 1 TXT hit per verdict on a bl.bench-listed client
    (every 4th client; counted from the clients each thread went through),
    no miss and no coalesced lookup; rbldnsd's query log must show no new
    question, and every client's verdict is checked again; any failure
    aborts the benchmark (exit status 1).

    Part 2 - parallel zones. One SlowDnsServer (tests/integration/slow_dns.py)
    answers every question --delay seconds (default 0.2) after it arrives,
    questions side by side. Four zones, all served by it, DnsResolver and
    checker timeout as given below, a fresh client for every verdict (so
    the cache is cold). One untimed verdict first starts the pool's threads.
    Once a verdict's lookups have ended (cache in_flight 0), the cache
    counters must show exactly, per verdict:
      (2a) NXDOMAIN, timeout 2.0: one round trip per zone, all 4 at once.
           Cache: 4 A misses, 0 hits, 0 coalesced, 4 new entries.
      (2b) 127.0.0.2 with TXT, timeout 2.0: a listing, so each zone's A
           answer starts that zone's TXT lookup at once (dnsbl.py, "TXT."):
           two round trips per zone, zones still side by side. Cache: 4 A
           + 4 TXT misses, 0 hits, 4 coalesced, 8 new entries: each TXT key
           is fetched by the done-callback and by result(), milliseconds
           apart, so the second fetch always joins the first, which waits
           for the slow server.
      (2c) 127.0.0.2, timeout 0.1 < delay: no answer by the deadline; the
           verdict must come back at about the timeout, not listed (TIMEOUT
           for all 4 zones: fail open). Cache: 4 A misses, 0 hits, 0
           coalesced, no new entry (a failure is not cached, and no A
           answer means no TXT lookup). Before the next verdict the script
           waits until the abandoned lookups have ended.
    Each scenario prints min/median/max wall time of start(ip).result(),
    the time the zones would take one after another, and the questions the
    server saw per verdict. Wrong statuses, wrong cache counters or a
    median that looks serial abort the benchmark (exit status 1).

    The checker's own WARNING logs (the timeouts of 2c, on purpose) are
    silenced. --quick: 200 clients, 20000 verdicts, 1 s of threads, 5
    samples per scenario (a few seconds). A normal run takes about 30 s.

READING THE FIGURES
    Part 1: "verdicts/s" is verdicts divided by wall time; mean/p50/p99 are
    per-verdict times in microseconds, timed one by one with
    time.perf_counter_ns (about 0.1 us of the figure is the timer itself).
    A cache-hit verdict is pure Python under the GIL plus a few short locks
    (the cache's, taken once more for a listing's TXT; the pending result's;
    the checker's counters), so threads
    cannot add throughput: expect the T-thread total to be at or somewhat
    below the 1-thread rate, and the T-thread p99 to show waits for the GIL
    (sys.getswitchinterval(), 5 ms by default) rather than work. What
    matters is the per-verdict cost next to an SMTP session's: tens of
    microseconds against milliseconds.

    Part 2: the median should be about one delay per round trip (2a: 1 x
    delay, 2b: 2 x delay, 2c: the timeout), plus a millisecond or two, and
    far below "one after another". A median near the serial figure means
    the zones are asked one after another.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import dns.version  # noqa: E402

from rbldnsd import RBLDNSD, Rbldnsd, RbldnsdZone  # noqa: E402
from relaymilter.cache import LookupCache  # noqa: E402
from relaymilter.dnsbl import DnsblChecker, DnsResolver  # noqa: E402
from relaymilter.zones import Status, Zone  # noqa: E402
from slow_dns import SlowDnsServer  # noqa: E402

CACHE_TTL = 3600                        # min_ttl = max_ttl: nothing expires during a run
HIT_CLIENT_BASE = ipaddress.IPv4Address("127.1.0.0")
COLD_CLIENT_BASE = ipaddress.IPv4Address("127.64.0.0")
TXT_TEMPLATE = ":127.0.0.2:Listed, see http://example.test/$"

BL = Zone.build("bl.bench", weight=1, codes=["127.0.0.2-127.0.0.11"])
WL = Zone.build("wl.bench", weight=-2, display_name="allowlist")
SLOW_ZONES = [Zone.build(f"z{number}.bench", weight=1) for number in range(1, 5)]


class BenchmarkError(Exception):
    """A check failed: the figures would not mean what they say."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchmarkError(message)


# ------------------------------------------------------------- statistics ---

def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def latency_line(nanoseconds: list[int]) -> str:
    ordered = sorted(nanoseconds)
    mean = sum(ordered) / len(ordered) / 1000
    return (f"mean {mean:7.1f} us   p50 {percentile(ordered, 0.50) / 1000:7.1f} us   "
            f"p99 {percentile(ordered, 0.99) / 1000:8.1f} us   "
            f"max {ordered[-1] / 1000:9.1f} us")


# ------------------------------------------------------ part 1: cache hits ---

def hit_clients(count: int) -> list[ipaddress.IPv4Address]:
    return [HIT_CLIENT_BASE + 1 + index for index in range(count)]


def bl_listed(index: int) -> bool:
    return index % 4 == 0


def wl_listed(index: int) -> bool:
    return index % 10 == 0


def expected_listed(index: int) -> bool:
    score = (1 if bl_listed(index) else 0) + (-2 if wl_listed(index) else 0)
    return score >= 1


def bl_listed_verdicts(size: int, first: int, count: int) -> int:
    """How many of count verdicts, cycling over size clients from first, are on bl.bench listings.

    Each such verdict costs one TXT cache hit on top of its two A hits.
    """
    rounds, rest = divmod(count, size)
    return (rounds * sum(bl_listed(index) for index in range(size))
            + sum(bl_listed((first + step) % size) for step in range(rest)))


def check_verdicts(checker: DnsblChecker, clients: list[ipaddress.IPv4Address]) -> None:
    """Every client's verdict, from the cache, against the zone data.

    Only a bl.bench listing carries TXT; the allowlist's is never asked.
    """
    for index, client in enumerate(clients):
        result = checker.start(client).result()
        txt = f"Listed, see http://example.test/{client}"
        want = {"bl.bench": (Status.LISTED, txt) if bl_listed(index) else (Status.NOT_LISTED, None),
                "allowlist": (Status.LISTED if wl_listed(index) else Status.NOT_LISTED, None)}
        got = {answer.zone.display_name: (answer.status, answer.txt) for answer in result.answers}
        require(got == want, f"{client}: zone statuses and TXT {got}, expected {want}")
        require(result.listed == expected_listed(index),
                f"{client}: listed={result.listed}, expected {expected_listed(index)}")
        require(result.txt == (txt if result.listed else None), f"{client}: TXT {result.txt!r}")


def warm(checker: DnsblChecker, clients: list[ipaddress.IPv4Address], batch: int = 50) -> None:
    """Fill the cache with real answers, a batch of clients at a time."""
    for first in range(0, len(clients), batch):
        pending = [checker.start(client) for client in clients[first:first + batch]]
        for listing in pending:
            result = listing.result()
            bad = [answer for answer in result.answers
                   if answer.status not in (Status.LISTED, Status.NOT_LISTED)]
            require(not bad, f"warm-up: {result.client}: {[a.status.value for a in bad]}")


def stats_delta(before, after) -> tuple[int, int, int]:
    return (after.hits - before.hits, after.misses - before.misses,
            after.coalesced - before.coalesced)


def wait_idle(cache: LookupCache, limit: float = 5.0) -> None:
    """Until no lookup is in flight (abandoned ones end by the resolver's lifetime)."""
    deadline = time.monotonic() + limit
    while cache.stats().in_flight:
        require(time.monotonic() < deadline, "lookups still in flight after 5 s")
        time.sleep(0.005)


# Per thread of a run: (index of its first client, its verdicts' latencies in
# ns); it went through clients[first], clients[first + 1], ..., cycling.
Runs = list[tuple[int, list[int]]]


def run_one_thread(checker, clients, count: int) -> tuple[float, Runs]:
    start = checker.start
    clock = time.perf_counter_ns
    latencies = []
    record = latencies.append
    size = len(clients)
    began = time.perf_counter()
    for number in range(count):
        client = clients[number % size]
        t0 = clock()
        start(client).result()
        record(clock() - t0)
    return time.perf_counter() - began, [(0, latencies)]


def run_threads(checker, clients, threads: int, seconds: float) -> tuple[float, Runs]:
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    size = len(clients)
    runs: Runs = [(slot * size // threads, []) for slot in range(threads)]

    def work(slot: int) -> None:
        start = checker.start
        clock = time.perf_counter_ns
        position, latencies = runs[slot]
        record = latencies.append
        stopped = stop.is_set
        barrier.wait()
        while not stopped():
            client = clients[position % size]
            position += 1
            t0 = clock()
            start(client).result()
            record(clock() - t0)

    workers = [threading.Thread(target=work, args=(slot,), name=f"bench-{slot}")
               for slot in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began, runs


def cache_hits(args: argparse.Namespace) -> None:
    clients = hit_clients(args.clients)
    bl_lines = [TXT_TEMPLATE] + [str(client) for index, client in enumerate(clients)
                                 if bl_listed(index)]
    wl_lines = [":127.0.0.2:"] + [str(client) for index, client in enumerate(clients)
                                  if wl_listed(index)]
    zones = [RbldnsdZone("bl.bench", "ip4set", bl_lines),
             RbldnsdZone("wl.bench", "ip4set", wl_lines)]
    a_lookups = 2 * len(clients)
    txt_lookups = bl_listed_verdicts(len(clients), 0, len(clients))   # bl.bench listings
    print(f"Part 1: cache-hit verdicts ({len(clients)} clients x 2 zones, rbldnsd on loopback)")
    with Rbldnsd(zones, ttl=CACHE_TTL) as server:
        cache = LookupCache(max_entries=100000, min_ttl=CACHE_TTL, max_ttl=CACHE_TTL)
        checker = DnsblChecker([BL, WL], DnsResolver([server.nameserver], timeout=2.0), cache,
                               timeout=2.0, threshold=1)
        try:
            began = time.perf_counter()
            warm(checker, clients)
            warmed = time.perf_counter() - began
            wait_idle(cache)
            stats = cache.stats()
            # Each TXT key is fetched twice (done-callback and result()): one
            # miss, then a hit or a coalesced lookup, whichever timing gives.
            want = (a_lookups + txt_lookups, txt_lookups, a_lookups + txt_lookups, 0)
            require((stats.misses, stats.hits + stats.coalesced, stats.entries, stats.in_flight)
                    == want,
                    f"warm-up cache counters: {stats}, expected misses {want[0]}, "
                    f"hits + coalesced {want[1]}, entries {want[2]}, in_flight 0")
            seen = {(zone, qtype): server.query_count(qtype=qtype, zone=zone)
                    for zone in ("bl.bench", "wl.bench") for qtype in ("A", "TXT")}
            want_seen = {("bl.bench", "A"): len(clients), ("bl.bench", "TXT"): txt_lookups,
                         ("wl.bench", "A"): len(clients), ("wl.bench", "TXT"): 0}
            questions = server.query_count()
            require(seen == want_seen and questions == sum(want_seen.values()),
                    f"warm-up: rbldnsd saw {questions} questions {seen}, expected {want_seen}")
            print(f"  warm-up: {len(clients)} verdicts from DNS in {warmed:.2f} s, "
                  f"batches of 50; rbldnsd saw {questions} questions "
                  f"({a_lookups} A + {txt_lookups} TXT, none for wl.bench)")
            print(f"           cache {stats.entries} entries ({a_lookups} A + {txt_lookups} TXT); "
                  f"{stats.misses} misses, {stats.hits} hits + {stats.coalesced} coalesced "
                  f"(second TXT fetches)")
            check_verdicts(checker, clients)

            for label, measure in (
                    ("1 thread", lambda: run_one_thread(checker, clients, args.verdicts)),
                    (f"{args.threads} threads",
                     lambda: run_threads(checker, clients, args.threads, args.seconds))):
                before = cache.stats()
                wall, runs = measure()
                after = cache.stats()
                counts = [len(latencies) for _, latencies in runs]
                total = sum(counts)
                require(total > 0, f"{label}: no verdict ran")
                txt_hits = sum(bl_listed_verdicts(len(clients), first, len(latencies))
                               for first, latencies in runs)
                hits, misses, coalesced = stats_delta(before, after)
                require((hits, misses, coalesced) == (2 * total + txt_hits, 0, 0),
                        f"{label}: {total} verdicts ({txt_hits} on bl.bench listings) but cache "
                        f"hits {hits}, misses {misses}, coalesced {coalesced}; expected "
                        f"{2 * total + txt_hits} hits, 0 misses, 0 coalesced")
                require(after.entries == stats.entries and after.in_flight == 0,
                        f"{label}: cache {after}, expected {stats.entries} entries, none in flight")
                require(server.query_count() == questions,
                        f"{label}: rbldnsd saw new questions during the cache-hit run")
                check_verdicts(checker, clients)
                flat = [value for _, latencies in runs for value in latencies]
                spread = (f"; per thread {min(counts)}-{max(counts)} verdicts"
                          if len(runs) > 1 else "")
                print(f"  {label:>10}: {total:8d} verdicts in {wall:5.2f} s = "
                      f"{total / wall:9.0f} verdicts/s{spread}")
                print(f"  {'':>10}  {latency_line(flat)}")
                print(f"  {'':>10}  cache: {hits} hits ({2 * total} A + {txt_hits} TXT), "
                      f"{misses} misses, {coalesced} coalesced; rbldnsd: no new question")
        finally:
            checker.close()


# -------------------------------------------------- part 2: parallel zones ---

def slow_scenario(label: str, samples: int, delay: float, timeout: float, address: str | None,
                  round_trips: int, expect_status: Status, expect_listed: bool,
                  first_client: int) -> int:
    """One scenario; returns the next unused client number."""
    txt = "Listed by the slow bench server" if address else None
    # Cache counters per verdict: an A miss per zone; a listing adds a TXT
    # miss per zone and the second fetch of that TXT key, coalesced (see the
    # docstring). Answers are cached, timeouts are not.
    zones = len(SLOW_ZONES)
    txt_lookups = zones if expect_status is Status.LISTED else 0
    want_misses = zones + txt_lookups
    want = (0, want_misses, txt_lookups)                    # hits, misses, coalesced
    want_entries = 0 if expect_status is Status.TIMEOUT else want_misses
    with SlowDnsServer(delay=delay, address=address, txt=txt, ttl=CACHE_TTL) as server:
        cache = LookupCache(max_entries=100000, min_ttl=CACHE_TTL, max_ttl=CACHE_TTL)
        checker = DnsblChecker(SLOW_ZONES, DnsResolver([server.nameserver], timeout=timeout),
                               cache, timeout=timeout, threshold=1)
        try:
            number = first_client
            times = []
            asked = 0
            for sample in range(samples + 1):       # sample 0 starts the pool's threads
                client = COLD_CLIENT_BASE + number
                number += 1
                before, questions = cache.stats(), server.question_count()
                t0 = time.perf_counter()
                result = checker.start(client).result()
                elapsed = time.perf_counter() - t0
                wait_idle(cache)
                after = cache.stats()
                counters = stats_delta(before, after)
                entries = after.entries - before.entries
                require(counters == want and entries == want_entries,
                        f"{label}: {client}: cache (hits, misses, coalesced) {counters}, "
                        f"{entries} new entries; expected {want}, {want_entries}")
                statuses = [answer.status for answer in result.answers]
                require(statuses == [expect_status] * zones,
                        f"{label}: {client}: statuses {[s.value for s in statuses]}, "
                        f"expected {expect_status.value}")
                require(result.listed == expect_listed,
                        f"{label}: {client}: listed={result.listed}, expected {expect_listed}")
                if expect_listed:
                    require(result.txt == txt, f"{label}: {client}: TXT {result.txt!r}")
                if sample:
                    times.append(elapsed)
                    asked += server.question_count() - questions
        finally:
            checker.close()
    median = statistics.median(times)
    one_round = timeout if expect_status is Status.TIMEOUT else round_trips * delay
    serial = zones * one_round
    verdict = "not listed" if not expect_listed else "listed"
    print(f"  {label}")
    print(f"      wall: min {min(times) * 1000:6.1f}  median {median * 1000:6.1f}  "
          f"max {max(times) * 1000:6.1f} ms over {len(times)} verdicts; expected ~"
          f"{one_round * 1000:.0f} ms, one after another {serial * 1000:.0f} ms")
    print(f"      every verdict {verdict}, all {zones} zones {expect_status.value}; "
          f"server saw {asked / len(times):.1f} questions per verdict")
    print(f"      cache per verdict: {want_misses} misses ({zones} A + {txt_lookups} TXT), "
          f"0 hits, {txt_lookups} coalesced, {want_entries} new entries")
    require(median < one_round * 1.5 + 0.05,
            f"{label}: median {median * 1000:.0f} ms: zones look asked one after another")
    require(median >= one_round * 0.9,
            f"{label}: median {median * 1000:.0f} ms is faster than the server can answer")
    return number


def parallel_zones(args: argparse.Namespace) -> None:
    delay = args.delay
    print(f"Part 2: latency of a cold verdict, 4 zones on one server answering after "
          f"{delay * 1000:.0f} ms")
    number = 1
    number = slow_scenario("(2a) NXDOMAIN, timeout 2.0 s: one round trip per zone",
                           args.samples, delay, 2.0, None, 1, Status.NOT_LISTED, False, number)
    number = slow_scenario("(2b) 127.0.0.2 + TXT, timeout 2.0 s: A then TXT per zone",
                           args.samples, delay, 2.0, "127.0.0.2", 2, Status.LISTED, True, number)
    slow_scenario(f"(2c) 127.0.0.2, timeout {args.short_timeout} s < delay: fail open "
                  f"at the deadline", args.samples, delay, args.short_timeout, "127.0.0.2", 1,
                  Status.TIMEOUT, False, number)


# ------------------------------------------------------------------- main ---

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small run: 200 clients, 20000 verdicts, 1 s threads, 5 samples")
    parser.add_argument("--clients", type=int, help="distinct cached clients (1000)")
    parser.add_argument("--verdicts", type=int, help="verdicts in the 1-thread run (100000)")
    parser.add_argument("--threads", type=int, default=8, help="threads in the second run (8)")
    parser.add_argument("--seconds", type=float, help="duration of the threaded run (3)")
    parser.add_argument("--samples", type=int, help="timed verdicts per slow scenario (20)")
    parser.add_argument("--delay", type=float, default=0.2, help="slow server delay, s (0.2)")
    parser.add_argument("--short-timeout", type=float, default=0.1,
                        help="checker timeout of scenario 2c, below --delay (0.1)")
    args = parser.parse_args(argv)
    defaults = (dict(clients=200, verdicts=20000, seconds=1.0, samples=5) if args.quick
                else dict(clients=1000, verdicts=100000, seconds=3.0, samples=20))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.short_timeout >= args.delay:
        parser.error("--short-timeout must be below --delay")
    if min(args.clients, args.verdicts, args.threads, args.samples) < 1 or args.seconds <= 0:
        parser.error("counts and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if RBLDNSD is None:
        print("rbldnsd is not installed (Debian: apt-get install rbldnsd)", file=sys.stderr)
        return 1
    # 2c times out on purpose; the checker would log a WARNING per zone.
    logging.getLogger("relaymilter").setLevel(logging.ERROR)
    print(f"Python {platform.python_version()} ({sys.implementation.name}), "
          f"{os.cpu_count()} CPUs, GIL, switch interval {sys.getswitchinterval() * 1000:g} ms, "
          f"dnspython {dns.version.version}")
    began = time.perf_counter()
    try:
        cache_hits(args)
        print()
        parallel_zones(args)
    except BenchmarkError as error:
        print(f"ABORTED: {error}", file=sys.stderr)
        return 1
    print(f"\ntotal {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
