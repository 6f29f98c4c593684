"""fleet - what sharing costs: Redis counters per decision, and a hold's trip across hosts.

NAME
    fleet - latency and CPU that [counters] url adds to a limited recipient, and the
    propagation delay of a hold from one relaymilter to another through PostgreSQL

SYNOPSIS
    .venv/bin/python bench/fleet.py [--charges N] [--rounds R] [--holds H]
                                    [--decisions D] [--workers 2[,4...]]

DESCRIPTION
    Part 1 - the counter. In this process, --charges recipients (default
    20,000) of 1,000 senders, 3 recipients a message, each sender held to
    three rates (recipients per hour and per day, messages per hour), all
    checked and counted, charged one after another to (local) the
    in-process LimitCounter, the baseline; (unix) a RedisCounter on a
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

    Part 3 - workers. `relaymilter policyd` with [counters] url on a private
    Redis and a default user limit far from reach, so that every recipient
    is charged in Redis and answered OK: --decisions requests (default
    20,000) of 1,000 SASL users, each a new message, driven by
    bench/dnsbl_storm.py's load generator (20 connections, closed loop,
    every answer checked), with workers = 1 and each of --workers, the
    order rotated per round. Printed: decisions/s, median of --rounds, and
    the ratio to one process.

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
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "integration"), str(ROOT / "bench")]

from policy_client import PolicyClient, request  # noqa: E402
from postgres_instance import PostgresInstance  # noqa: E402
from procs import children  # noqa: E402
from redis_instance import RedisInstance  # noqa: E402
from relaymilter.limits import Limit, LimitCounter  # noqa: E402
from relaymilter.rediscounter import RedisCounter  # noqa: E402
from relaymilter_process import (RELAYMILTER, RelaymilterProcess, _free_port,  # noqa: E402
                                 public_subdirectory)

HELD = b"action=550 5.7.1 Relaying suspended for this sender"
# Three rates in force, all far from reach: every one is checked and counted.
LIMIT = Limit(per_hour=1_000_000, per_day=10_000_000, messages_per_hour=1_000_000)


def time_charges(counter, charges: int) -> tuple[list[float], float]:
    """Per-charge latencies (s) and CPU per charge (s)."""
    latencies = []
    clock = time.perf_counter
    cpu = time.process_time()
    for number in range(charges):
        key = ("user", f"sender{number % 1000}")
        started = clock()
        counter.charge(key, LIMIT, f"bench.{number // 3}", f"rcpt{number % 3}@example.org")
        latencies.append(clock() - started)
    return latencies, (time.process_time() - cpu) / charges


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def counters_part(args: argparse.Namespace) -> None:
    print(f"Part 1: one limited recipient charged, {args.charges:,} per run, "
          f"{args.rounds} rounds, 1,000 senders, 3 recipients a message, 3 rates "
          f"({LIMIT.describe()})")
    with RedisInstance(tcp_port=_free_port()) as server:
        kinds = {"local": lambda: LimitCounter(hour=3600),
                 "unix": lambda: RedisCounter(server.url(), hour=3600, timeout=1.0),
                 "tcp": lambda: RedisCounter(server.tcp_url(), hour=3600, timeout=1.0)}
        figures: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
        names = list(kinds)
        for round_number in range(args.rounds):
            order = names[round_number % len(names):] + names[:round_number % len(names)]
            for kind in order:
                server.client().flushall()
                counter = kinds[kind]()
                counter.charge(("user", "warm"), Limit(1))  # connected before timing
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


class _Workers:
    """What dnsbl_storm.drive() needs of a service: its socket, its CPU, its log."""

    def __init__(self, process: RelaymilterProcess) -> None:
        self.process, self.name = process, process.name
        self.socket_path = process.socket_path

    def cpu_seconds(self) -> float:
        """The supervisor and its live workers, utime + stime."""
        supervisor = self.process.process.pid
        total = 0.0
        for pid in [supervisor, *children(supervisor)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def log(self) -> str:
        return self.process.log_text()


def workers_part(args: argparse.Namespace) -> None:
    import dnsbl_storm
    counts = sorted({1, *args.workers})
    print(f"\nPart 3: decisions/s of the policy service, {args.decisions:,} authenticated "
          f"outbound recipients per run (1,000 users, each limited, counted in Redis), "
          f"20 connections, {args.rounds} rounds; workers: {', '.join(map(str, counts))}")
    tree = Path(tempfile.mkdtemp(prefix="relaymilter-workers-bench-"))
    tree.chmod(0o755)
    store = tree / "policy.sqlite3"
    subprocess.run([RELAYMILTER, "limit", "add", "--default", "user", "1000000", "--store",
                    str(store)], check=True, capture_output=True)
    expected = b"action=OK\n\n"
    rates: dict[int, list[float]] = {count: [] for count in counts}
    with RedisInstance() as redis_server:
        for round_number in range(args.rounds):
            order = counts[round_number % len(counts):] + counts[:round_number % len(counts)]
            for count in order:
                redis_server.client().flushall()
                service = RelaymilterProcess(
                    public_subdirectory(tree, f"w{count}r{round_number}"), front_end="policyd",
                    policyd={"workers": count}, relay={"local_domains": ["local.test"]},
                    store={"path": str(store)}, counters={"url": redis_server.url()})
                service.start()
                try:
                    time.sleep(1.5)         # every worker up and its store read
                    run = dnsbl_storm.drive(
                        _Workers(service), args.decisions,
                        lambda n: request("x@remote.test", sasl_username=f"user{n % 1000}",
                                          instance=f"b{round_number}.{n}"),
                        lambda n: expected, 20, f"workers={count}")
                finally:
                    service.stop()
                rates[count].append(args.decisions / run.wall)
    base = statistics.median(rates[1])
    for count in counts:
        median = statistics.median(rates[count])
        print(f"  workers {count}: {median:8,.0f} decisions/s  ({median / base:.2f} x one "
              f"process)   rounds: {' '.join(f'{rate:,.0f}' for rate in rates[count])}")
    print(f"  ({os.cpu_count()} CPUs here, shared by the workers, Redis and this load "
          "generator)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--charges", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--holds", type=int, default=10)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")],
                        default=[2], help="worker counts to set against one process (2)")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    counters_part(args)
    propagation_part(args)
    workers_part(args)


if __name__ == "__main__":
    main()
