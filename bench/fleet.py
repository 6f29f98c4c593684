"""fleet - what sharing costs: Redis counters per decision, and a hold's trip across hosts.

NAME
    fleet - latency and CPU that [counters] url adds to a limited recipient, and the
    propagation delay of a hold from one relaymilter to another through PostgreSQL

SYNOPSIS
    .venv/bin/python bench/fleet.py [--charges N] [--rounds R] [--holds H]

DESCRIPTION
    Part 1 - the counter. In this process, --charges recipients (default
    20,000) of 1,000 senders charged one after another to (local) the
    in-process RecipientCounter, the baseline; (unix) a RedisCounter on a
    private redis-server's unix socket; (tcp) the same Redis over TCP on
    127.0.0.1. Every charge is timed (perf_counter); printed per kind: the
    median and 99th percentile latency, CPU per charge of this process
    (process_time), each the median of --rounds rounds (default 5, the
    order rotated), and the latency added per decision against local.
    Target: p99 under 1 ms on loopback.

    Part 2 - a hold across hosts. A private PostgreSQL and two `relaymilter
    policyd` processes on it ([store] url), as two hosts. --holds times
    (default 10): `relaymilter hold add --user U` through host one's config,
    then host two is asked over its policy socket every 10 ms until it
    refuses U; the delay runs from the CLI's exit to that refusal (the CLI's
    own start-up is not counted). Printed: median and maximum. The promise:
    under 2 s (the watcher polls the store every second).

    Everything runs on loopback and unix sockets, started and stopped here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration")]

from policy_client import PolicyClient, request  # noqa: E402
from postgres_instance import PostgresInstance  # noqa: E402
from redis_instance import RedisInstance  # noqa: E402
from relaymilter.limits import RecipientCounter  # noqa: E402
from relaymilter.rediscounter import RedisCounter  # noqa: E402
from relaymilter_process import (RELAYMILTER, RelaymilterProcess, _free_port,  # noqa: E402
                                 public_subdirectory)

HELD = b"action=550 5.7.1 Relaying suspended for this sender"


def time_charges(counter, charges: int) -> tuple[list[float], float]:
    """Per-charge latencies (s) and CPU per charge (s)."""
    latencies = []
    clock = time.perf_counter
    cpu = time.process_time()
    for number in range(charges):
        key = ("user", f"sender{number % 1000}")
        started = clock()
        counter.charge(key, 1_000_000, f"bench.{number}", "rcpt@example.org")
        latencies.append(clock() - started)
    return latencies, (time.process_time() - cpu) / charges


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def counters_part(args: argparse.Namespace) -> None:
    print(f"Part 1: one limited recipient charged, {args.charges:,} per run, "
          f"{args.rounds} rounds, 1,000 senders")
    with RedisInstance(tcp_port=_free_port()) as server:
        kinds = {"local": lambda: RecipientCounter(window=3600),
                 "unix": lambda: RedisCounter(server.url(), window=3600, timeout=1.0),
                 "tcp": lambda: RedisCounter(server.tcp_url(), window=3600, timeout=1.0)}
        figures: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
        names = list(kinds)
        for round_number in range(args.rounds):
            order = names[round_number % len(names):] + names[:round_number % len(names)]
            for kind in order:
                server.client().flushall()
                counter = kinds[kind]()
                counter.charge(("user", "warm"), 1)         # connected before timing
                latencies, cpu = time_charges(counter, args.charges)
                figures[kind].append((statistics.median(latencies),
                                      percentile(latencies, 0.99), cpu))
    base = statistics.median(p50 for p50, _, _ in figures["local"])
    print(f"  {'counter':<8}{'p50':>10}{'p99':>10}{'CPU':>10}{'added p50':>12}   p99 < 1 ms")
    for kind, runs in figures.items():
        p50 = statistics.median(run[0] for run in runs)
        p99 = statistics.median(run[1] for run in runs)
        cpu = statistics.median(run[2] for run in runs)
        verdict = "" if kind == "local" else ("met" if p99 < 0.001 else "NOT met")
        print(f"  {kind:<8}{p50 * 1e6:>8.1f}us{p99 * 1e6:>8.1f}us{cpu * 1e6:>8.1f}us"
              f"{(p50 - base) * 1e6:>10.1f}us   {verdict}")


def propagation_part(args: argparse.Namespace) -> None:
    print(f"\nPart 2: a hold added on one host, refused by the other ({args.holds} holds)")
    tree = Path(tempfile.mkdtemp(prefix="relaymilter-fleet-bench-"))
    tree.chmod(0o755)
    with PostgresInstance() as database:
        url = database.create_database("mail")
        hosts = [RelaymilterProcess(public_subdirectory(tree, name), front_end="policyd",
                                    relay={"local_domains": ["local.test"]},
                                    store={"url": url}) for name in ("one", "two")]
        for host in hosts:
            host.start()
        try:
            delays = []
            for number in range(args.holds):
                user = f"bench{number}"
                done = subprocess.run([RELAYMILTER, "hold", "add", "--user", user, "-c",
                                       str(hosts[0].config_path)], capture_output=True,
                                      text=True, timeout=60)
                if done.returncode:
                    raise SystemExit(f"hold add failed: {done.stderr}")
                added = time.monotonic()
                client = PolicyClient(str(hosts[1].socket_path))
                try:
                    while client.ask(request("x@remote.test", sasl_username=user))[0] != HELD:
                        if time.monotonic() - added > 10:
                            raise SystemExit(f"hold on {user} not applied after 10 s")
                        time.sleep(0.01)
                finally:
                    client.close()
                delays.append(time.monotonic() - added)
        finally:
            for host in hosts:
                host.kill()
    print(f"  delay: median {statistics.median(delays) * 1000:.0f} ms, max "
          f"{max(delays) * 1000:.0f} ms   (promise < 2000 ms: "
          f"{'met' if max(delays) < 2 else 'NOT met'})")
    print("  " + " ".join(f"{delay * 1000:.0f}" for delay in delays))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--charges", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--holds", type=int, default=10)
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    counters_part(args)
    propagation_part(args)


if __name__ == "__main__":
    main()
