"""store_scale - the policy store at hosting-provider scale.

NAME
    store_scale - import time, snapshot load time, memory and lookup cost of a big store

SYNOPSIS
    .venv/bin/python bench/store_scale.py [--quick] [--domains N] [--networks N]
                                          [--probes N] [--repeat N] [--batch N]
                                          [--rounds N] [--keep PATH]
                                          [--backends sqlite,postgresql]

DESCRIPTION
    Builds a domain policy store in each of --backends: SQLite
    (relaymilter/sqlitestore.py) in a temporary directory, and PostgreSQL
    (relaymilter/pgstore.py) in a private server of this run on a unix
    socket (tests/integration/postgres_instance.py), the same document in
    both, measured the same way:
    --domains hosted domains (default 100,000; 10,000 with --quick), each a
    domain entry (1 in 10 with DNSBL off, 1 in 10 with a threshold of its
    own) owned by a SASL user (one user per 10 domains), and --networks
    allowlist networks (default 1,000,000; 100,000 with --quick), 95 %
    scoped to one hosted domain, 5 % global, anywhere in 1.0.0.0 -
    223.255.255.255 and 2000::/3, in this mix of prefix lengths:
        IPv4 80 %: /32 45, /31 2, /30 2, /29 3, /28 4, /27 2, /26 2, /25 1,
                   /24 15, /23 1, /22 1, /20 1, /16 1;
        IPv6 20 %: /128 8, /64 7, /56 1, /48 3, /32 1.
    Spread out like this, the networks cover as many address blocks as
    they can, so netindex.py's bitmaps spare fewer lookups than with real
    allowlists, which cluster in providers' ranges: lookups cost what they
    would, or more. Around them, the small tables a provider
    has: 1,000 relay clients (a third restricted to sender domains), 1,000
    client and 1,000 user holds, a default limit per kind, 1,000 user and
    100 client overrides. Everything is random with a fixed seed: two runs
    build the same store. Nothing is sent anywhere.

    1. Import. The whole document goes in through Storage.import_policy
       (validation of every row, then one transaction): time, database size.
    2. Load. A fresh Python process (so that the builder's memory does not
       count) opens the store and calls load_policy(): wall time, then
       resident memory (VmRSS from /proc/self/status) before and after,
       and the peak (VmHWM). A second load, the old snapshot still held as
       during a reload: time and RSS. A third under tracemalloc gives the
       bytes a snapshot keeps and the peak of Python allocations during a
       load. data_version(), the reload watcher's test, is timed too.
    3. Lookups. The same process times the snapshot calls a decision makes,
       on the big snapshot and on EMPTY_POLICY, with two sets of --probes
       (client address, recipient domain, SASL user) triples: unlisted
       clients, random addresses from the same ranges (80 % IPv4, 20 %
       IPv6; almost none in an entry), as most clients are; and listed
       ones, each in an allowlist entry for that domain or a global one.
       Addresses are ipaddress objects, as the milter has them. Best of
       --repeat runs of each.
         allowlisted    allowlisted(client, domain)
         held           held(client, user)
         relay_client   relay_client(client)
         limit user     limit("user", user)
         limit client   limit("client", str(client)), as policy._outbound asks
    4. Decisions. Whole decisions, policy.decide_recipient(facts, snapshot,
       counter), per second, on one live.Snapshot (build_snapshot() of a
       config whose local domains are the hosted ones and whose trusted
       networks add 10.0.0.0/8) with the big policy and with EMPTY_POLICY:
       the same facts for both (--probes of each case), in five cases:
         inbound unlisted   untrusted client, not on the DNSBL, recipient in
                            a hosted domain
         inbound allowed    listed client (a weight-2 zone: listed at the
                            domains' own threshold too) in a scoped
                            allowlist entry of the recipient's domain:
                            "allowlisted" on the big store, rejected
                            ("dnsbl") on the empty one
         inbound rejected   listed client in no allowlist entry: rejected
         outbound user      SMTP AUTH as the owner of the sender domain,
                            remote recipient: held(), owned_domains(),
                            limit() and a RecipientCounter
         outbound trusted   a client in 10.0.0.0/8, remote recipient
       Inbound recipients are in domains with the DNSBL on (one in ten has
       it off, which on the big store would skip the verdict and flatter
       it). The DNSBL verdict is given (an object whose result() returns a
       dnsbl.ListingResult): no DNS. The empty store has no limits, so its
       outbound decisions never charge the counter; the big one's limits
       (500 per hour and up) are never reached, as the check afterwards
       (every decision the expected one) shows. After a warm-up pass over
       all facts, each of --rounds rounds times, for every case, a pass of
       --batch decisions (the next slice of the facts) on both stores, in
       alternating order: short passes, paired, so that what else the
       machine does (2 cores, shared) hits both alike, timed in CPU time
       of the thread (time.thread_time). Printed: median decisions per
       second of each store, the median of the per-round differences of
       the rate (big over empty), and their interquartile range.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relaymilter.address import parse_recipient  # noqa: E402
from relaymilter.config import parse_config  # noqa: E402
from relaymilter.zones import Status, Zone, ZoneAnswer, summarise  # noqa: E402
from relaymilter.limits import RecipientCounter  # noqa: E402
from relaymilter.reload import build_snapshot  # noqa: E402
from relaymilter.decision import ClientFacts, RecipientFacts  # noqa: E402
from relaymilter.engine import decide_recipient  # noqa: E402
from relaymilter.domainpolicy import EMPTY_POLICY  # noqa: E402
from relaymilter.openstore import open_store  # noqa: E402
from relaymilter.store import FORMAT  # noqa: E402
from relaymilter.storelocation import display_location, is_url  # noqa: E402

SEED = 4
# (percent of the networks, version, prefix length)
NETWORK_MIX = [
    (45, 4, 32), (2, 4, 31), (2, 4, 30), (3, 4, 29), (4, 4, 28), (2, 4, 27), (2, 4, 26),
    (1, 4, 25), (15, 4, 24), (1, 4, 23), (1, 4, 22), (1, 4, 20), (1, 4, 16),
    (8, 6, 128), (7, 6, 64), (1, 6, 56), (3, 6, 48), (1, 6, 32),
]
# Where addresses are drawn from: (first, last + 1) as ints.
SPACE = {4: (int(ipaddress.IPv4Address("1.0.0.0")), int(ipaddress.IPv4Address("224.0.0.0"))),
         6: (int(ipaddress.IPv6Address("2000::")), int(ipaddress.IPv6Address("4000::")))}
GLOBAL_SHARE = 0.05


def hosted_domain(number: int) -> str:
    return f"d{number}.hosting.example"


def owner_of(number: int) -> str:
    return f"user{number // 10}"


def make_document(domains: int, networks: int) -> tuple[dict, list[tuple[str, int, str]]]:
    """The store's content, and (address text, prefix length, domain) per network."""
    rng = random.Random(SEED)
    stamp = {"created": 1700000000.0, "added_by": "bench"}
    document: dict = {"format": FORMAT, "version": 1}
    document["domains"] = [
        {"domain": hosted_domain(n), "dnsbl": "off" if n % 10 == 3 else "on",
         "threshold": 2 if n % 10 == 5 else None, "owners": [owner_of(n)], **stamp}
        for n in range(domains)]
    allowlist, placed, seen = [], [], set()
    for number, (percent, version, prefixlen) in enumerate(NETWORK_MIX):
        wanted = networks * percent // 100 if number < len(NETWORK_MIX) - 1 else \
            networks - len(allowlist)
        host_bits = (32 if version == 4 else 128) - prefixlen
        first, end = (value >> host_bits for value in SPACE[version])
        made = 0
        while made < wanted:
            index = rng.randrange(first, end)
            domain_number = -1 if rng.random() < GLOBAL_SHARE else rng.randrange(domains)
            key = (version, prefixlen, index, domain_number)
            if key in seen:
                continue
            seen.add(key)
            address = ipaddress.ip_address(index << host_bits)
            domain = "" if domain_number < 0 else hosted_domain(domain_number)
            allowlist.append({"network": f"{address}/{prefixlen}", "domain": domain, **stamp})
            placed.append((str(address), prefixlen, domain))
            made += 1
    del seen
    document["allowlist"] = allowlist
    document["relay_clients"] = [
        {"network": f"198.18.{n // 16}.{(n % 16) * 16}/28",
         "sender_domains": [hosted_domain(n)] if n % 3 == 0 else [], **stamp}
        for n in range(1000)]
    document["holds"] = (
        [{"kind": "client", "value": f"198.19.{n // 256}.{n % 256}", "reason": "bench",
          **stamp} for n in range(1000)]
        + [{"kind": "user", "value": f"held{n}", "reason": "bench", **stamp}
           for n in range(1000)])
    document["limits"] = (
        [{"kind": "user", "value": "", "per_hour": 500, **stamp},
         {"kind": "client", "value": "", "per_hour": 5000, **stamp}]
        + [{"kind": "user", "value": owner_of(n * 10), "per_hour": 1000 + n, **stamp}
           for n in range(1000)]
        + [{"kind": "client", "value": f"198.18.{n // 16}.{(n % 16) * 16}/28",
            "per_hour": 100 + n, **stamp} for n in range(100)])
    return document, placed


def make_probes(placed: list[tuple[str, int, str]], domains: int, count: int, listed: bool
                ) -> list[tuple[object, str, str]]:
    """(client, recipient domain, SASL user): allowlisted for that domain, or
    a random address (almost never in an entry)."""
    rng = random.Random(SEED + 1 + listed)    # not the document's sequence
    probes = []
    for _ in range(count):
        domain_number = rng.randrange(domains)
        domain = hosted_domain(domain_number)
        if listed:
            text, prefixlen, scoped = rng.choice(placed)
            network = ipaddress.ip_network(f"{text}/{prefixlen}")
            host = rng.randrange(network.num_addresses)
            client = network.network_address + host
            domain = scoped or domain
        else:
            client = ipaddress.ip_address(rng.randrange(*SPACE[4 if rng.random() < 0.8 else 6]))
        probes.append((client, domain, owner_of(domain_number)))
    return probes


# ------------------------------------------------------------------ timing ---

def best_time(run, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def store_calls(policy, probes):
    def allowlisted():
        for client, domain, _ in probes:
            policy.allowlisted(client, domain)

    def held():
        for client, _, user in probes:
            policy.held(client, user)

    def relay_client():
        for client, _, _ in probes:
            policy.relay_client(client)

    def limit_user():
        for _, _, user in probes:
            policy.limit("user", user)

    def limit_client():
        for client, _, _ in probes:
            policy.limit("client", str(client))

    return {"allowlisted": allowlisted, "held": held, "relay_client": relay_client,
            "limit user": limit_user, "limit client": limit_client}


# (call, probes) timed, in the order shown
TIMED = [("allowlisted", "unlisted"), ("allowlisted", "listed"), ("held", "unlisted"),
         ("relay_client", "unlisted"), ("limit user", "unlisted"),
         ("limit client", "unlisted")]

# ---------------------------------------------------------------- decisions ---

BL = Zone.build("bl.test", weight=2, display_name="BL")
TRUSTED = "10.0.0.0/8"
TRUSTED_NETWORKS = ["127.0.0.0/8", "::1/128", TRUSTED]
# case -> the decision's reason on the big store, on the empty one
CASES = {
    "inbound unlisted": ("local-domain", "local-domain"),
    "inbound allowed": ("allowlisted", "dnsbl"),
    "inbound rejected": ("dnsbl", "dnsbl"),
    "outbound user": ("authenticated", "authenticated"),
    "outbound trusted": ("trusted-network", "trusted-network"),
}


class Given:
    """Stands for dnsbl.PendingListing: the verdict is already there."""

    __slots__ = ("_result",)

    def __init__(self, result) -> None:
        self._result = result

    def result(self):
        return self._result


def domain_number(domain: str) -> int:
    return int(domain.split(".", 1)[0][1:])


def dnsbl_on(number: int) -> bool:
    return number % 10 != 3     # make_document(): 1 in 10 has the DNSBL off


def decision_facts(policy, placed, domains: int, count: int) -> dict[str, list]:
    """The facts of every case (see the module docstring), count of each."""
    rng = random.Random(SEED + 3)

    def listing(client, listed: bool) -> Given:
        answer = ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",), txt="bench") if listed \
            else ZoneAnswer(BL, Status.NOT_LISTED)
        return Given(summarise(client, (answer,), 1))

    def random_client():
        return ipaddress.ip_address(rng.randrange(*SPACE[4 if rng.random() < 0.8 else 6]))

    def hosted_on() -> int:
        while True:
            number = rng.randrange(domains)
            if dnsbl_on(number):
                return number

    trusted_networks = [ipaddress.ip_network(text) for text in TRUSTED_NETWORKS]

    def untrusted(client) -> bool:
        return not any(client in network for network in trusted_networks)

    def untouched(client) -> bool:
        """Untrusted, in no global allowlist, relay client or hold entry."""
        return (untrusted(client) and not policy.allowlisted(client, "")
                and policy.relay_client(client) is None and policy.held(client, None) is None)

    def inbound(client, number: int, listed: bool) -> RecipientFacts:
        return RecipientFacts(client=ClientFacts(client, "client.example", "client.example"),
                              sender=f"<s{rng.randrange(10**6)}@sender.example>",
                              recipient=f"<u{rng.randrange(1000)}@{hosted_domain(number)}>",
                              listing=listing(client, listed))

    def outbound(client, number: int, user: str | None) -> RecipientFacts:
        return RecipientFacts(client=ClientFacts(client, "client.example", "client.example",
                                                 auth_user=user),
                              sender=f"<s{rng.randrange(1000)}@{hosted_domain(number)}>",
                              recipient=f"<r{rng.randrange(1000)}@remote"
                                        f"{rng.randrange(1000)}.example>")

    scoped = [(ipaddress.ip_network(f"{text}/{prefixlen}"), domain_number(domain))
              for text, prefixlen, domain in placed if domain
              and dnsbl_on(domain_number(domain))]
    cases: dict[str, list] = {case: [] for case in CASES}
    while len(cases["inbound unlisted"]) < count:
        client = random_client()
        if untouched(client):
            cases["inbound unlisted"].append(inbound(client, hosted_on(), False))
    while len(cases["inbound allowed"]) < count:
        network, number = rng.choice(scoped)
        client = network.network_address + rng.randrange(network.num_addresses)
        if untrusted(client) and policy.relay_client(client) is None:
            cases["inbound allowed"].append(inbound(client, number, True))
    while len(cases["inbound rejected"]) < count:
        client, number = random_client(), hosted_on()
        if untouched(client) and not policy.allowlisted(client, hosted_domain(number)):
            cases["inbound rejected"].append(inbound(client, number, True))
    while len(cases["outbound user"]) < count:
        client, number = random_client(), rng.randrange(domains)
        if untouched(client):
            cases["outbound user"].append(outbound(client, number, owner_of(number)))
    trusted = ipaddress.ip_network(TRUSTED)
    for _ in range(count):
        client = trusted.network_address + rng.randrange(trusted.num_addresses)
        cases["outbound trusted"].append(outbound(client, rng.randrange(domains), None))
    return cases


def decide_all(facts: list, snapshot, counter) -> float:
    """One pass: the CPU seconds it took (of this thread: not the time it
    waited for a core)."""
    # Both stores start from the same, empty recipient parse cache
    # (address.parse_recipient is memoised): otherwise the second pass of a
    # round would ride on the first one's parses.
    parse_recipient.cache_clear()
    started = time.thread_time()
    for one in facts:
        decide_recipient(one, snapshot, counter)
    return time.thread_time() - started


def time_decisions(policy, placed, domains: int, count: int, batch: int, rounds: int) -> dict:
    config = parse_config({"relay": {
        "local_domains": [hosted_domain(n) for n in range(domains)],
        "trusted_networks": TRUSTED_NETWORKS}})
    base = build_snapshot(config)
    snapshots = {"big": dataclasses.replace(base, domain_policy=policy),
                 "empty": dataclasses.replace(base, domain_policy=EMPTY_POLICY)}
    cases = decision_facts(policy, placed, domains, count)
    counters = {(case, label): RecipientCounter() for case in CASES for label in snapshots}
    seconds: dict = {(case, label): [] for case in CASES for label in snapshots}
    for case, facts in cases.items():           # warm-up
        for label, snapshot in snapshots.items():
            decide_all(facts, snapshot, counters[case, label])
    gc.collect()
    gc.freeze()     # as the milter does after loading a store (storewatch.py)
    for number in range(rounds):
        start = number * batch % count
        for case, facts in cases.items():
            chunk = facts[start:start + batch]
            order = ("big", "empty") if number % 2 == 0 else ("empty", "big")
            for label in order:
                seconds[case, label].append(
                    decide_all(chunk, snapshots[label], counters[case, label]))
    results = {}
    for case, facts in cases.items():
        reasons = {}
        for label, snapshot in snapshots.items():
            # After the rounds: a limit reached would show here.
            seen = {decide_recipient(one, snapshot, counters[case, label]).reason.word
                    for one in facts}
            expected = CASES[case][label == "empty"]
            if seen != {expected}:
                raise SystemExit(f"{case}, {label} store: {sorted(seen)}, not {expected}")
            reasons[label] = expected
        big, empty = seconds[case, "big"], seconds[case, "empty"]
        results[case] = {
            "big": batch / statistics.median(big), "empty": batch / statistics.median(empty),
            "paired": [(e / b - 1) * 100 for b, e in zip(big, empty)],
            "reasons": reasons}
    return results


def proc_status(field: str) -> int:
    """A /proc/self/status figure in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(path: str, domains: int, probe_count: int, repeat: int, batch: int,
            rounds: int) -> dict:
    """Runs in a fresh process: load, memory, lookups. Returns the figures."""
    gc.collect()
    results: dict = {"rss_before": proc_status("VmRSS")}
    with open_store(path, create=False) as store:
        started = time.perf_counter()
        policy = store.load_policy()
        results["load_seconds"] = time.perf_counter() - started
        results["rss_after"] = proc_status("VmRSS")
        results["rss_peak"] = proc_status("VmHWM")
        results["counts"] = policy.counts
        version_calls = 10000
        started = time.perf_counter()
        for _ in range(version_calls):
            store.data_version()
        results["data_version_us"] = (time.perf_counter() - started) / version_calls * 1e6
        # A reload builds the new snapshot while the old one is in force.
        started = time.perf_counter()
        second = store.load_policy()
        results["reload_seconds"] = time.perf_counter() - started
        results["rss_two"] = proc_status("VmRSS")
        del second
        gc.collect()
        tracemalloc.start()
        third = store.load_policy()
        gc.collect()
        results["traced_kept"], results["traced_peak"] = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del third
        placed = [(row["network"].split("/")[0], int(row["network"].split("/")[1]),
                   row["domain"]) for row in store.list_allowlist()[::97]]
    gc.collect()
    probes = {kind: make_probes(placed, domains, probe_count, kind == "listed")
              for kind in ("unlisted", "listed")}
    timings = {}
    for label, snapshot in (("big", policy), ("empty", EMPTY_POLICY)):
        for call, kind in TIMED:
            run = store_calls(snapshot, probes[kind])[call]
            timings[f"{call}/{kind}/{label}"] = best_time(run, repeat) / probe_count
    results["per_call_seconds"] = timings
    batch = min(batch, probe_count)
    results["decisions"] = time_decisions(policy, placed, domains, probe_count, batch, rounds)
    results["decisions_per_pass"] = batch
    results["hits"] = {kind: sum(policy.allowlisted(client, domain)
                                 for client, domain, _ in probes[kind]) for kind in probes}
    results["probes"] = probe_count
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--quick", action="store_true", help="a tenth of the size")
    parser.add_argument("--domains", type=int)
    parser.add_argument("--networks", type=int)
    parser.add_argument("--probes", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5, help="runs per lookup timing")
    parser.add_argument("--batch", type=int, default=2000, help="decisions a timed pass")
    parser.add_argument("--rounds", type=int, default=60, help="rounds of decision timing")
    parser.add_argument("--keep", metavar="PATH", help="build the SQLite store at PATH and keep it")
    parser.add_argument("--backends", default="sqlite,postgresql",
                        type=lambda text: text.split(","),
                        help="sqlite, postgresql (a private server of this run) or both, "
                             "in this order (default: sqlite,postgresql)")
    parser.add_argument("--measure", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    domains = args.domains or (10000 if args.quick else 100000)
    networks = args.networks or (100000 if args.quick else 1000000)
    if args.measure:
        json.dump(measure(args.measure, domains, args.probes, args.repeat, args.batch,
                          args.rounds),
                  sys.stdout)
        return

    print(f"store_scale: {domains:,} hosted domains, {networks:,} allowlist networks; "
          f"backends: {', '.join(args.backends)}")
    started = time.perf_counter()
    document, _ = make_document(domains, networks)
    print(f"  document made in {time.perf_counter() - started:.1f} s")
    with tempfile.TemporaryDirectory(prefix="store_scale.") as directory, \
            contextlib.ExitStack() as cleanup:
        for backend in args.backends:
            if backend == "postgresql":
                server = cleanup.enter_context(private_postgresql())
                location = server.create_database("store_scale")
            else:
                location = args.keep or os.path.join(directory, "policy.sqlite3")
            print(f"\n[{backend}] {display_location(location)}")
            with open_store(location) as store:
                started = time.perf_counter()
                counts = store.import_policy(document, replace=True)
                elapsed = time.perf_counter() - started
            rows = sum(counts.values())
            print(f"1. import: {rows:,} entries in {elapsed:.1f} s ({rows / elapsed:,.0f}/s), "
                  f"one transaction; database {database_size(location) / 2**20:.0f} MiB")
            print("   " + ", ".join(f"{count:,} {kind}" for kind, count in counts.items()))
            output = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--measure", str(location),
                 "--domains", str(domains), "--probes", str(args.probes),
                 "--repeat", str(args.repeat), "--batch", str(args.batch),
                 "--rounds", str(args.rounds)],
                check=True, capture_output=True, text=True).stdout
            report(json.loads(output))
        if args.keep:
            print(f"store kept: {args.keep}")


@contextlib.contextmanager
def private_postgresql():
    """A PostgreSQL of this run's own (tests/integration/postgres_instance.py)."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
    from postgres_instance import PostgresInstance
    with PostgresInstance() as server:
        yield server


def database_size(location: str) -> int:
    if is_url(location):
        import psycopg
        with psycopg.connect(location) as connection:
            return connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return sum(os.path.getsize(location + suffix) for suffix in ("", "-wal")
               if os.path.exists(location + suffix))


def report(results: dict) -> None:
    mib = 2**20
    print(f"2. load_policy(): {results['load_seconds']:.2f} s, again "
          f"{results['reload_seconds']:.2f} s; data_version(): "
          f"{results['data_version_us']:.1f} us")
    print(f"   RSS {results['rss_before'] / mib:.0f} MiB before, "
          f"{results['rss_after'] / mib:.0f} MiB after "
          f"(+{(results['rss_after'] - results['rss_before']) / mib:.0f} MiB), "
          f"peak {results['rss_peak'] / mib:.0f} MiB; "
          f"{results['rss_two'] / mib:.0f} MiB while a reload holds two snapshots")
    print(f"   tracemalloc: the snapshot keeps {results['traced_kept'] / mib:.1f} MiB; "
          f"a load peaks at {results['traced_peak'] / mib:.1f} MiB")
    timings = results["per_call_seconds"]
    hits = results["hits"]
    print(f"3. lookups: {results['probes']:,} unlisted clients ({hits['unlisted']:,} "
          f"allowlisted after all) and {results['probes']:,} listed ones "
          f"({hits['listed']:,} allowlisted); best per call:")
    print(f"   {'call':<26}{'big store':>12}{'empty store':>14}{'big/empty':>11}")
    for call, kind in TIMED:
        big, empty = timings[f"{call}/{kind}/big"], timings[f"{call}/{kind}/empty"]
        print(f"   {call + ', ' + kind:<26}{big * 1e6:>9.2f} us{empty * 1e6:>11.2f} us"
              f"{big / empty:>10.1f}x   ({1 / big:,.0f}/s)")
    decisions = results["decisions"]
    rounds = len(next(iter(decisions.values()))["paired"])
    print(f"4. decide_recipient(): {results['decisions_per_pass']:,} decisions a pass, "
          f"{rounds} rounds; decisions per second (CPU), medians:")
    print(f"   {'case':<18}{'big store':>12}{'empty store':>13}{'big vs empty':>14}"
          f"{'IQR':>19}   reason (big / empty)")
    for case, figures in decisions.items():
        low, median, high = statistics.quantiles(figures["paired"], n=4)
        print(f"   {case:<18}{figures['big']:>10,.0f}/s{figures['empty']:>11,.0f}/s"
              f"{median:>+12.1f} %   {low:+6.1f} .. {high:+5.1f} %   "
              f"{figures['reasons']['big']} / {figures['reasons']['empty']}")


if __name__ == "__main__":
    main()
