"""dnsbl_storm - DNSBL lookups at wire speed: the policy service in a botnet storm.

NAME
    dnsbl_storm - CPU per request, requests per second, TXT latency and memory of
    `relaymilter policyd` with two DNSBL zones, each next to a baseline of the same run

SYNOPSIS
    .venv/bin/python bench/dnsbl_storm.py [--quick] [--rounds R] [--requests N]
                                          [--connections C] [--floor-queries Q]
                                          [--samples S] [--delay D]
                                          [--zone-txt listed|with-a|off]
                                          [--storm N] [--storm-cache E]
                                          [--skip-postfix] [--postfix-messages M]
                                          [--no-pin]

    PYTHONPATH=/other/worktree .venv/bin/python bench/dnsbl_storm.py
        measures the relaymilter of another worktree: the services are started
        as `python -P -m relaymilter`, so PYTHONPATH decides, and the path used
        is printed first.

DESCRIPTION
    Everything runs on loopback: every server listens on 127.0.0.1, and every
    client address, in requests and in DNS query names, lies in 127.0.0.0/8
    (127.1.0.0 and up; 127.0.0.1 is the only trusted network, so these
    clients are all untrusted and looked up). A private rbldnsd
    (tests/integration/rbldnsd.py, TTL 3600 s) serves two zones, as in
    bench/dnsbl_verdicts.py: bl.bench (weight 1, listings carry a TXT record)
    and wl.bench (weight -2). relaymilter policyd gets threshold 1, timeout
    2.0 s, [cache] max_entries 100000 and min_ttl = max_ttl = 3600 s (nothing
    expires during a run), health_interval 86400 s (one health round, at
    start), no store, local_domains ["local.test"], dry_run false. Its log
    (INFO: one line per reject) goes to a file.

    The load generator is this process: --connections unix-socket connections
    (default 20, as many smtpd processes) driven by one selectors loop, each
    sending one RCPT-stage request as Postfix 3.7 writes it (recipient
    user@local.test, a local domain: relaying never refuses, the DNSBL
    decides; a new `instance` per request, so no lookup is reused for a
    second recipient), waiting for its answer, then sending the next; no
    pipelining. Every answer must be the exact action line expected: action=
    DUNNO, or action=554 5.7.1 ... with the zone and its TXT for a client
    bl.bench lists and wl.bench does not.

    Part 1 - CPU per request, and Part 2 - requests per second. Each round
    (--rounds, default 3; the order rotated by one per round so that drift
    hits all alike) measures, CPU as utime + stime of the server process (all
    its threads, /proc/PID/stat) over the run, divided by the requests:
      (noop)  bench/dunno_policyd.py, answering action=DUNNO unread: the
              price of the protocol, and of this load generator;
      (hot)   relaymilter policyd, 200 clients cycled, the cache warmed by one
              untimed pass (checked: 2 A per client and 1 TXT per bl.bench
              listing reached rbldnsd) - no question may reach rbldnsd during
              the run; 20 % of requests are rejected (and logged);
      (cold)  a fresh relaymilter policyd per round, a few hundred untimed
              requests to settle, then a never-seen client for every request:
              every request misses the cache for both zones. Every 100th
              address is listed in bl.bench (a TXT query more); rbldnsd must
              see exactly 2 A questions per request plus 1 TXT per listing;
      (floor) in this process, without relaymilter: one A query built by hand
              (struct; random 16-bit ID from secrets, as a resolver must;
              RD=0; a distinct reversed-octet name under bl.bench), sent on
              a connected UDP socket to rbldnsd, its reply received and its
              header read (ID, QR, RCODE: all must be NXDOMAIN), one after
              another, --floor-queries of them, time.process_time() per query.
    Printed per round and as medians: CPU per request; hot / noop (target
    <= 1.5); cold / (noop + 2 x floor) (target <= 3.0: a storm request may
    cost three times the protocol plus two minimal DNS queries). Part 2 reads
    the same runs' wall time: cold requests per second (target >= 4000), next
    to the no-op's, the ceiling of the load generator itself on this machine.

    Part 3 - latency of a listed client with TXT. A policyd whose two zones
    (bl.bench and bl2.bench, weight 1 each, so the client is listed) are
    served by tests/integration/slow_dns.py's SlowDnsServer, which answers
    every question --delay seconds late (default 0.2), side by side: A
    127.0.0.2, TXT "Listed by the slow bench server". (The RFC 5782 test
    point 127.0.0.1 gets NXDOMAIN, or the start-up health check would find
    the zones "list the world" and disable them.) --samples fresh clients
    (default 5, after one untimed), one request each: the time from sending
    it to the answer, which must be the 554 with the TXT; the server must
    have seen 2 A and 2 TXT questions per client. 1 x delay would mean A and
    TXT overlap; 2 x delay means TXT is asked once A has answered.

    --zone-txt MODE writes txt = MODE into the blocklists' [[dnsbl.zone]]
    tables (parts 1 to 4): "listed" (TXT after an A answer that lists),
    "with-a" (TXT asked together with A, for every new client), "off".
    Without it no txt key is written, so a relaymilter that has no such key
    can be measured, and the service's default ("listed") applies. The
    exact question counts and the expected answers follow the mode: with-a
    asks 1 TXT per new client instead of per listing; off asks none, and
    the 554 carries no TXT.

    Part 4 - memory in a storm (--storm N; 0, the default, skips it). A
    policyd with [cache] max_entries = --storm-cache (default 10000) gets N
    never-seen clients (127.128.0.0 and up, none listed); its VmRSS
    (/proc/PID/status) before (after 200 requests), after N/2 and at the end.
    With the cache bounded, the RSS should level off. rbldnsd's query log
    grows by about 70 bytes per question (2 per client) in the temporary
    directory.

    Part 5 - the milter through Postfix (--skip-postfix leaves it out):
    bench/postfix_throughput.py's pieces, imported, for three of its
    configurations on a unix socket: (a) Postfix alone, (b) the baseline
    milter, (c) `relaymilter run` with its --dnsbl zones (rbldnsd; smtp-source
    connects from 127.0.0.1, untrusted there, so both zones are asked and
    answered from the warm cache). --postfix-messages per run (default 1000),
    --rounds rounds, rotated; c/a and c/b are ratios of the median rates
    (target c/b >= 1.0, postfix_throughput's).

    CPU placement (parts 1 to 4). On a machine of two CPUs or more, this
    process (the load generator) runs on the first CPU it may use; each
    measured service, rbldnsd and the floor's queries on the last. Left to
    the scheduler, the no-op's CPU per request varied threefold between
    back-to-back runs on a 2-CPU virtual machine (its threads and the load
    generator swapping CPUs); pinned, by a few percent. DNS stays on one
    CPU for the service and the floor alike: there, one query answered
    across CPUs cost the floor ~100 us more CPU than on one (wake-ups
    between virtual CPUs), so the floor would measure the hypervisor, not
    a query. --no-pin leaves placement to the scheduler. Part 5 is never
    pinned.

    Any check that fails aborts the benchmark with exit status 1 (a figure
    that does not measure what it says is worse than none); targets that are
    not met are printed, not fatal. Every subprocess and temporary directory
    is removed on the way out, on failure, Ctrl-C and SIGTERM too.

    --quick: 3000 requests per run, 1 round, 2000 floor queries, 3 samples,
    no storm, 200 Postfix messages: under a minute. The default run takes a
    few minutes.

READING THE FIGURES
    CPU figures are in steps of one clock tick (10 ms) per run: over 20000
    requests, 0.5 us per request. The machine's other load inflates CPU time
    less than wall time, but it does inflate it (cold caches, migrations):
    compare the ratios, which are taken within one round, and look at the
    spread of the rounds. An event-loop service spends less CPU per request
    the more requests one wake-up finds waiting, so its CPU per request
    depends on the load too; 20 connections keep it busy.

    Pinned, the service has a CPU to itself: a rate close to 1 / its CPU
    per request means that CPU is saturated and the service, not the load
    generator (whose ceiling is the no-op's rate), is the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import ipaddress
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.rcode  # noqa: E402

from rbldnsd import RBLDNSD, Rbldnsd, RbldnsdZone  # noqa: E402
from relaymilter_process import toml_document  # noqa: E402
from slow_dns import SlowDnsServer  # noqa: E402

# -P: no current directory in front of sys.path, so PYTHONPATH (else the
# virtualenv's editable install) decides which relaymilter runs.
PYTHON = [sys.executable, "-P"]
CACHE_TTL = 3600
LOCAL_RECIPIENT = "user@local.test"
SENDER = "sender@remote.test"
TRUSTED = "127.0.0.1/32"
HOT_CLIENTS = 200
HOT_BASE = int(ipaddress.IPv4Address("127.1.0.0"))      # + 1 + index, as dnsbl_verdicts.py
SLOW_BASE = int(ipaddress.IPv4Address("127.32.0.0"))
COLD_BASE = int(ipaddress.IPv4Address("127.64.0.0"))    # + offset; offset % 100 == 0 listed
FLOOR_BASE = int(ipaddress.IPv4Address("127.96.0.0"))   # never listed
STORM_BASE = int(ipaddress.IPv4Address("127.128.0.0"))  # never listed
STORM_MAX = int(ipaddress.IPv4Address("127.255.255.255")) - STORM_BASE
COLD_LISTED_EVERY = 100
TXT_TEMPLATE = ":127.0.0.2:Listed, see http://example.test/$"
SLOW_TXT = "Listed by the slow bench server"
ANSWER_TIMEOUT = 10.0           # seconds without any answer: the service is stuck
DUNNO = b"action=DUNNO\n\n"
ANSWER = re.compile(rb"action=[^\n]+\n\n\Z")


class BenchmarkError(Exception):
    """A check failed: the figures would not mean what they say."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BenchmarkError(message)


# --------------------------------------------------------------- helpers ---

def dotted(number: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", number))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


@contextlib.contextmanager
def running_on(cpus: set[int] | None) -> Iterator[None]:
    """This thread, and every process or thread it starts meanwhile, on cpus.

    None changes nothing (--no-pin, or a single CPU).
    """
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def policy_request(client: str, instance: str) -> bytes:
    """An RCPT-stage request with the attributes Postfix 3.7 sends, in its order."""
    return ("request=smtpd_access_policy\n"
            "protocol_state=RCPT\n"
            "protocol_name=ESMTP\n"
            f"helo_name=host-{client.replace('.', '-')}.remote.test\n"
            "queue_id=\n"
            f"sender={SENDER}\n"
            f"recipient={LOCAL_RECIPIENT}\n"
            "recipient_count=0\n"
            f"client_address={client}\n"
            "client_name=unknown\n"
            "reverse_client_name=unknown\n"
            f"instance={instance}\n"
            "sasl_method=\n"
            "sasl_username=\n"
            "sasl_sender=\n"
            "size=0\n"
            "ccert_subject=\n"
            "ccert_issuer=\n"
            "ccert_fingerprint=\n"
            "ccert_pubkey_fingerprint=\n"
            "encryption_protocol=\n"
            "encryption_cipher=\n"
            "encryption_keysize=0\n"
            "etrn_domain=\n"
            "stress=\n"
            "policy_context=\n"
            "server_address=127.0.0.1\n"
            "server_port=25\n"
            "compatibility_level=3.6\n"
            "mail_version=3.7.11\n"
            "client_port=40000\n"
            "\n").encode()


def reject_answer(client: str, zone: str, txt: str | None) -> bytes:
    """What policyd answers for a listed client (decision.client_listed)."""
    shown = f"; {txt}" if txt else ""
    return (f"action=554 5.7.1 Service unavailable; Client host [{client}] blocked using "
            f"{zone}{shown}\n\n").encode()


def bl_txt(client: str) -> str:
    return f"Listed, see http://example.test/{client}"   # TXT_TEMPLATE's "$"


# hot client index -> lists; as dnsbl_verdicts.py
def hot_bl(index: int) -> bool:
    return index % 4 == 0


def hot_wl(index: int) -> bool:
    return index % 10 == 0


def hot_client(index: int) -> str:
    return dotted(HOT_BASE + 1 + index)


def hot_expected(index: int, txt_mode: str) -> bytes:
    client = hot_client(index)
    if hot_bl(index) and not hot_wl(index):
        return reject_answer(client, "bl.bench", bl_txt(client) if txt_mode != "off" else None)
    return DUNNO


def cold_listed(offset: int) -> bool:
    return offset % COLD_LISTED_EVERY == 0


def cold_expected(offset: int, txt_mode: str) -> bytes:
    client = dotted(COLD_BASE + offset)
    if not cold_listed(offset):
        return DUNNO
    return reject_answer(client, "bl.bench", bl_txt(client) if txt_mode != "off" else None)


def txt_questions(txt_mode: str, new_clients: int, listings: int) -> int:
    """The TXT questions one blocklist costs for new clients, listings of them among."""
    return {"listed": listings, "with-a": new_clients, "off": 0}[txt_mode]


def with_txt_mode(zones: list[dict], txt_mode: str | None) -> list[dict]:
    """The blocklists' tables with txt = txt_mode; None writes no key at all."""
    if txt_mode is None:
        return zones
    return [{**zone, "txt": txt_mode} if zone["weight"] > 0 else zone for zone in zones]


# -------------------------------------------------------------- services ---

class Service:
    """A policy service subprocess on a unix socket, its log in a file."""

    def __init__(self, name: str, command: list[str], socket_path: Path, directory: Path,
                 cpus: set[int] | None):
        self.name = name
        self.socket_path = socket_path
        self.log_path = directory / f"{name}.log"
        # The environment passes through: the same PYTHONPATH as ours.
        with self.log_path.open("ab") as log, running_on(cpus):
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=directory)
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BenchmarkError(f"{self.name} exited with {self.process.returncode}:\n"
                                     f"{self.log()}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.socket_path))
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{self.name} not listening on {self.socket_path} after "
                                     f"{timeout:.0f} s:\n{self.log()}")
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        """utime + stime of the process, all its threads, so far."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise BenchmarkError(f"{self.name}: no VmRSS in /proc/{self.process.pid}/status")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def chatter(self) -> list[str]:
        """Warnings, errors and tracebacks in the log, first ones."""
        return [line for line in self.log().splitlines()
                if ": warning: " in line or ": error: " in line or "Traceback" in line][:10]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def relaymilter_command(verb: str, config: Path) -> list[str]:
    return [*PYTHON, "-m", "relaymilter", verb, "-c", str(config)]


def start_policyd(directory: Path, name: str, nameserver: str, zones: list[dict],
                  cpus: set[int] | None, max_entries: int = 100000) -> Service:
    socket_path = directory / f"{name}.sock"
    config = directory / f"{name}.toml"
    config.write_text(toml_document({
        "policyd": {"socket": f"unix:{socket_path}", "socket_mode": "0666"},
        "decisions": {"dry_run": False},
        "relay": {"local_domains": ["local.test"], "trusted_networks": [TRUSTED]},
        "store": {"path": ""},
        "dnsbl": {"nameservers": [nameserver], "timeout": 2.0, "threshold": 1,
                  "health_interval": 86400, "zone": zones},
        "cache": {"max_entries": max_entries, "min_ttl": CACHE_TTL, "max_ttl": CACHE_TTL},
    }), encoding="utf-8")
    return Service(name, relaymilter_command("policyd", config), socket_path, directory, cpus)


def start_noop(directory: Path, cpus: set[int] | None) -> Service:
    socket_path = directory / "dunno.sock"
    return Service("dunno-policyd", [*PYTHON, str(ROOT / "bench" / "dunno_policyd.py"),
                                     f"unix:{socket_path}"], socket_path, directory, cpus)


BENCH_ZONES = [{"name": "bl.bench", "weight": 1, "codes": ["127.0.0.2-127.0.0.11"]},
               {"name": "wl.bench", "weight": -2}]


def start_lists(cold_offsets: int) -> Rbldnsd:
    """rbldnsd with bl.bench and wl.bench: the hot clients' listings as dnsbl_verdicts.py,
    every 100th cold offset in bl.bench, and the RFC 5782 test point 127.0.0.2 in both."""
    bl = [TXT_TEMPLATE, "127.0.0.2"]
    bl += [hot_client(index) for index in range(HOT_CLIENTS) if hot_bl(index)]
    bl += [dotted(COLD_BASE + offset) for offset in range(0, cold_offsets, COLD_LISTED_EVERY)]
    wl = [":127.0.0.2:", "127.0.0.2"]
    wl += [hot_client(index) for index in range(HOT_CLIENTS) if hot_wl(index)]
    lists = Rbldnsd([RbldnsdZone("bl.bench", "ip4set", bl),
                     RbldnsdZone("wl.bench", "ip4set", wl)], ttl=CACHE_TTL)
    lists.start()
    return lists


def measured_relaymilter() -> str:
    """The relaymilter package this run measures; the services must import the same."""
    spec = importlib.util.find_spec("relaymilter")
    require(spec is not None and spec.origin is not None, "relaymilter is not importable")
    ours = str(Path(spec.origin).parent)
    # Run from ROOT, the worst case: -P must keep the checkout from winning over PYTHONPATH.
    child = subprocess.run([*PYTHON, "-c", "import relaymilter; print(relaymilter.__file__)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    theirs = str(Path(child.stdout.strip()).parent)
    require(child.returncode == 0 and theirs == ours,
            f"subprocesses import relaymilter from {theirs!r}, this process from {ours!r}:\n"
            f"{child.stderr}")
    verb = subprocess.run([*PYTHON, "-m", "relaymilter", "policyd", "--help"],
                          capture_output=True, timeout=60)
    require(verb.returncode == 0, f"{ours} has no `relaymilter policyd` verb")
    return ours


# -------------------------------------------------------- load generator ---

@dataclass
class Run:
    """One load generator run against one service."""

    requests: int
    wall: float                 # seconds, first request sent to last answer read
    cpu: float                  # the service's CPU seconds over the run
    own_cpu: float              # this process's
    latencies: list[float]      # seconds, per request

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.requests * 1e6

    @property
    def rate(self) -> float:
        return self.requests / self.wall


def drive(service: Service, count: int, request: Callable[[int], bytes],
          expected: Callable[[int], bytes], connections: int, label: str) -> Run:
    """count requests, one at a time on each of `connections` connections.

    request(n) and expected(n) give request number n and its exact answer;
    a wrong answer aborts after the run, naming the first ones.
    """
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    latencies = [0.0] * count
    wrong: list[tuple[int, bytes]] = []
    wrong_count = 0
    try:
        for _ in range(min(connections, count)):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(str(service.socket_path))
            sock.setblocking(False)
        clock = time.perf_counter
        cpu_before, own_before = service.cpu_seconds(), time.process_time()
        began = clock()
        issued = 0
        for sock in sockets:
            state = [issued, clock(), b""]      # request number, sent at, answer so far
            sock.sendall(request(issued))
            issued += 1
            selector.register(sock, selectors.EVENT_READ, state)
        answered = 0
        while answered < count:
            events = selector.select(ANSWER_TIMEOUT)
            # Messages are built only on failure: the log grows with every reject.
            if not events:
                raise BenchmarkError(f"{label}: no answer for {ANSWER_TIMEOUT:.0f} s after "
                                     f"{answered} of {count}:\n{service.log()[-2000:]}")
            for key, _ in events:
                sock, state = key.fileobj, key.data
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchmarkError(f"{label}: {service.name} closed a connection after "
                                         f"{answered} answers:\n{service.log()[-2000:]}")
                data = state[2] + chunk
                if not data.endswith(b"\n\n"):     # the rest of the answer is on its way
                    state[2] = data
                    continue
                number = state[0]
                latencies[number] = clock() - state[1]
                if data != expected(number):
                    wrong_count += 1
                    if len(wrong) < 3:
                        wrong.append((number, data))
                answered += 1
                if issued < count:
                    state[0], state[1], state[2] = issued, clock(), b""
                    sock.sendall(request(issued))
                    issued += 1
                else:
                    selector.unregister(sock)
        wall = clock() - began
        cpu = service.cpu_seconds() - cpu_before
        own = time.process_time() - own_before
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    if wrong_count:
        shown = "\n".join(
            f"  request {number}: {'malformed ' if not ANSWER.match(data) else ''}answer "
            f"{data!r}, expected {expected(number)!r}" for number, data in wrong)
        raise BenchmarkError(f"{label}: {wrong_count} of {count} answers wrong:\n{shown}")
    return Run(count, wall, cpu, own, latencies)


# --------------------------------------------------- part 1: CPU, part 2 ---

def dns_floor(port: int, count: int, first: int) -> float:
    """CPU seconds per hand-built A query to rbldnsd, reply received and header read.

    Deliberately without relaymilter: the baseline must not import what it measures.
    """
    header = struct.Struct("!6H")
    zone = b"\x02bl\x05bench\x00"
    tail = struct.pack("!HH", 1, 1)                 # QTYPE A, QCLASS IN
    rcodes = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))         # only rbldnsd's packets come back
        sock.settimeout(2.0)
        cpu = time.process_time()
        for number in range(FLOOR_BASE + first, FLOOR_BASE + first + count):
            labels = [str(number & 0xFF), str(number >> 8 & 0xFF), str(number >> 16 & 0xFF),
                      str(number >> 24)]
            name = b"".join(bytes((len(label),)) + label.encode() for label in labels) + zone
            ident = secrets.randbits(16)
            sock.send(header.pack(ident, 0, 1, 0, 0, 0) + name + tail)     # flags 0: RD=0
            reply = sock.recv(512)
            got, flags = struct.unpack_from("!HH", reply)
            if got != ident or not flags & 0x8000:      # no message built in the timed loop
                raise BenchmarkError(f"floor: reply {reply[:12]!r} does not answer query "
                                     f"ID {ident}")
            rcodes[flags & 0xF] = rcodes.get(flags & 0xF, 0) + 1
        cpu = time.process_time() - cpu
    require(rcodes == {3: count}, f"floor: RCODEs {rcodes}, expected NXDOMAIN (3) for all")
    return cpu / count


@dataclass
class Rounds:
    noop: list[Run]
    hot: list[Run]
    cold: list[Run]
    floor: list[float]          # CPU seconds per query
    cold_listed: list[int]      # listed clients per cold run


def warm_hot(service: Service, lists: Rbldnsd, connections: int, txt_mode: str) -> None:
    """One pass over the hot clients; the questions rbldnsd saw must be one A per zone
    and client and bl.bench's TXT questions (one per listing, by default)."""
    asked = lists.query_count()
    drive(service, HOT_CLIENTS, lambda n: policy_request(hot_client(n), f"w{n:x}.0"),
          lambda n: hot_expected(n, txt_mode), connections, "hot warm-up")
    txt = txt_questions(txt_mode, HOT_CLIENTS, sum(hot_bl(n) for n in range(HOT_CLIENTS)))
    want = 2 * HOT_CLIENTS + txt
    seen = lists.query_count() - asked
    require(seen == want, f"hot warm-up: rbldnsd saw {seen} questions, expected {want} "
                          f"({2 * HOT_CLIENTS} A + {txt} TXT)")


def policy_service_runs(args: argparse.Namespace, directory: Path, lists: Rbldnsd,
                        noop: Service, hot: Service) -> Rounds:
    """Part 1 and 2's runs: noop, hot, cold, floor per round, in rotated order."""
    count, connections, txt_mode = args.requests, args.connections, args.txt_mode
    zones = with_txt_mode(BENCH_ZONES, args.zone_txt)
    hot_requests = [policy_request(hot_client(n % HOT_CLIENTS), f"{n:x}.1a2b3c.0")
                    for n in range(count)]
    hot_answers = [hot_expected(n % HOT_CLIENTS, txt_mode) for n in range(count)]
    results = Rounds([], [], [], [], [])
    next_cold = 0

    def run_noop() -> None:
        results.noop.append(drive(noop, count, hot_requests.__getitem__,
                                  lambda n: DUNNO, connections, "noop"))

    def run_hot() -> None:
        asked = lists.query_count()
        results.hot.append(drive(hot, count, hot_requests.__getitem__,
                                 hot_answers.__getitem__, connections, "hot"))
        seen = lists.query_count() - asked
        require(seen == 0, f"hot: rbldnsd saw {seen} questions during a run from the cache")

    def run_cold() -> None:
        nonlocal next_cold
        with start_policyd(directory, f"cold-{len(results.cold) + 1}", lists.nameserver,
                           zones, args.service_cpus) as cold:
            # Settle: imports, sockets, the health round, the first of everything.
            first, next_cold = next_cold, next_cold + args.cold_warmup
            drive(cold, args.cold_warmup,
                  lambda n: policy_request(dotted(COLD_BASE + first + n), f"w{n:x}.0"),
                  lambda n: cold_expected(first + n, txt_mode), connections, "cold warm-up")
            first, next_cold = next_cold, next_cold + count
            requests = [policy_request(dotted(COLD_BASE + first + n), f"{n:x}.3c4d5e.0")
                        for n in range(count)]
            answers = [cold_expected(first + n, txt_mode) for n in range(count)]
            listed = sum(cold_listed(first + n) for n in range(count))
            txt = txt_questions(txt_mode, count, listed)
            asked = lists.query_count()
            results.cold.append(drive(cold, count, requests.__getitem__,
                                      answers.__getitem__, connections, "cold"))
            seen = lists.query_count() - asked
            require(seen == 2 * count + txt,
                    f"cold: rbldnsd saw {seen} questions, expected {2 * count + txt} "
                    f"(2 A per request + {txt} TXT): not every request a miss, or retries")
            results.cold_listed.append(listed)
            report_chatter(cold)

    def run_floor() -> None:
        with running_on(args.service_cpus):     # next to rbldnsd, as the services are
            results.floor.append(dns_floor(lists.port, args.floor_queries,
                                           len(results.floor) * args.floor_queries))

    steps = [("noop", run_noop), ("hot", run_hot), ("cold", run_cold), ("floor", run_floor)]
    for number in range(args.rounds):
        shift = number % len(steps)
        for _, step in steps[shift:] + steps[:shift]:
            step()
        print(f"  round {number + 1}: noop {results.noop[-1].cpu_us:7.1f}  "
              f"hot {results.hot[-1].cpu_us:7.1f}  cold {results.cold[-1].cpu_us:7.1f}  "
              f"floor {results.floor[-1] * 1e6:6.1f}  us CPU per request   (order: "
              f"{', '.join(name for name, _ in steps[shift:] + steps[:shift])})", flush=True)
    return results


def report_cpu(args: argparse.Namespace, results: Rounds) -> None:
    noop = median([run.cpu_us for run in results.noop])
    hot = median([run.cpu_us for run in results.hot])
    cold = median([run.cpu_us for run in results.cold])
    floor = median(results.floor) * 1e6
    tick = 1e6 / os.sysconf("SC_CLK_TCK") / args.requests

    def values(runs: list[float]) -> str:
        return " ".join(f"{value:.1f}" for value in runs)

    print(f"\n  CPU per request, us: median (rounds); a clock tick is {tick:.2f} us here")
    for label, middle, rounds in (
            ("(noop)  dunno_policyd.py", noop, [run.cpu_us for run in results.noop]),
            ("(hot)   policyd, cache hits", hot, [run.cpu_us for run in results.hot]),
            ("(cold)  policyd, 2 misses each", cold, [run.cpu_us for run in results.cold]),
            ("(floor) one A query by hand", floor, [value * 1e6 for value in results.floor])):
        print(f"    {label:32} {middle:7.1f}   ({values(rounds)})")
    hot_ratio = hot / noop
    cold_ratio = cold / (noop + 2 * floor)
    per_round_hot = [h.cpu_us / n.cpu_us for h, n in zip(results.hot, results.noop)]
    per_round_cold = [c.cpu_us / (n.cpu_us + 2 * f * 1e6)
                      for c, n, f in zip(results.cold, results.noop, results.floor)]
    print(f"  hot / noop                  = {hot_ratio:5.2f}   target <= 1.5: "
          f"{verdict(hot_ratio <= 1.5)}   (per round {values(per_round_hot)})")
    print(f"  cold / (noop + 2 x floor)   = {cold_ratio:5.2f}   target <= 3.0: "
          f"{verdict(cold_ratio <= 3.0)}   (per round {values(per_round_cold)})")
    print(f"  cold, beyond the protocol: {cold - noop:.1f} us per request for 2 lookups "
          f"= {(cold - noop) / (2 * floor):.1f} x the hand-built query")


def report_rates(results: Rounds) -> None:
    print("Part 2: requests per second of one service process (wall time of the same runs)")
    for name, runs in (("noop", results.noop), ("hot", results.hot), ("cold", results.cold)):
        rates = [run.rate for run in runs]
        latencies = [value for run in runs for value in run.latencies]
        own = median([run.own_cpu / run.requests * 1e6 for run in runs])
        print(f"  ({name:4}) {median(rates):7.0f}/s  ("
              + " ".join(f"{rate:.0f}" for rate in rates)
              + f")   latency p50 {percentile(latencies, 0.5) * 1000:5.2f} ms, "
                f"p99 {percentile(latencies, 0.99) * 1000:5.2f} ms; "
                f"load generator {own:.0f} us CPU per request")
    cold = median([run.rate for run in results.cold])
    noop = median([run.rate for run in results.noop])
    print(f"  cold requests/s = {cold:.0f}   target >= 4000: {verdict(cold >= 4000)}   "
          f"(the no-op's {noop:.0f}/s is the load generator's ceiling here)")


def report_chatter(service: Service) -> None:
    lines = service.chatter()
    if lines:
        print(f"  {service.name} logged:\n    " + "\n    ".join(lines))


def policy_service(args: argparse.Namespace, directory: Path, lists: Rbldnsd) -> None:
    listed = sum(hot_bl(i) and not hot_wl(i) for i in range(HOT_CLIENTS))
    both = sum(hot_bl(i) and hot_wl(i) for i in range(HOT_CLIENTS))
    wl_only = sum(hot_wl(i) and not hot_bl(i) for i in range(HOT_CLIENTS))
    print(f"Part 1: CPU per request of the policy service, unix socket, {args.connections} "
          f"connections, {args.requests} requests per run, rounds: {args.rounds}")
    print(f"  (hot)  {HOT_CLIENTS} clients cycled, cache warm: {listed} rejected (bl.bench with "
          f"TXT), {both} on both lists (allowlisted), {wl_only} on wl.bench only, "
          f"{HOT_CLIENTS - listed - both - wl_only} on neither")
    print(f"  (cold) a fresh policyd per round, {args.cold_warmup} requests to settle, then "
          f"a never-seen client per request")
    print(f"  (floor) {args.floor_queries} hand-built A queries per round, this process")
    print(f"  bl.bench txt: {args.zone_txt or 'not set (the default, listed)'}")
    with start_noop(directory, args.service_cpus) as noop, \
            start_policyd(directory, "hot", lists.nameserver,
                          with_txt_mode(BENCH_ZONES, args.zone_txt), args.service_cpus) as hot:
        warm_hot(hot, lists, args.connections, args.txt_mode)
        results = policy_service_runs(args, directory, lists, noop, hot)
        report_chatter(hot)
    listed_fraction = sum(results.cold_listed) / (args.requests * args.rounds)
    txt = {"listed": "+ 1 TXT per listing", "with-a": "+ 1 TXT", "off": "and no TXT"}
    print(f"  cold clients listed: {listed_fraction:.1%} (every {COLD_LISTED_EVERY}th); rbldnsd "
          f"saw exactly 2 A per cold request {txt[args.txt_mode]}, none during hot runs")
    report_cpu(args, results)
    print()
    report_rates(results)


# ---------------------------------------------------- part 3: TXT latency ---

def nibbles(address: str) -> str:
    return ".".join(reversed(ipaddress.IPv6Address(address).exploded.replace(":", "")))


class RfcSlowDnsServer(SlowDnsServer):
    """SlowDnsServer that does not list RFC 5782's "never listed" test points.

    relaymilter's start-up health check asks 127.0.0.1 and ::ffff:7f00:1; a
    server that lists them "lists the world", and its zones would be disabled.
    """

    NEVER_LISTED = ("1.0.0.127.", nibbles("::ffff:7f00:1") + ".")

    def _reply(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.question and \
                query.question[0].name.to_text().lower().startswith(self.NEVER_LISTED):
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        return super()._reply(wire)


def ask(sock: socket.socket, request: bytes) -> tuple[bytes, float]:
    """One request on a blocking connection: the answer and the seconds it took."""
    began = time.perf_counter()
    sock.sendall(request)
    answer = b""
    while not answer.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        require(bool(chunk), "the policy service closed the connection")
        answer += chunk
    return answer, time.perf_counter() - began


def txt_latency(args: argparse.Namespace, directory: Path) -> None:
    delay = args.delay
    zones = with_txt_mode([{"name": "bl.bench", "weight": 1},
                           {"name": "bl2.bench", "weight": 1}], args.zone_txt)
    shown = args.txt_mode != "off"
    print(f"Part 3: latency of a listed client with TXT, 2 zones on a server answering "
          f"{delay * 1000:.0f} ms late, timeout 2.0 s, txt: {args.zone_txt or 'not set'}")
    with RfcSlowDnsServer(delay=delay, address="127.0.0.2", txt=SLOW_TXT,
                          ttl=CACHE_TTL) as server, \
            start_policyd(directory, "slow", server.nameserver, zones,
                          args.service_cpus) as service, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(service.socket_path))
        times = []
        for sample in range(args.samples + 1):     # sample 0: the first of everything
            client = dotted(SLOW_BASE + 1 + sample)
            answer, seconds = ask(sock, policy_request(client, f"{sample:x}.5e6f.0"))
            want = reject_answer(client, "bl.bench", SLOW_TXT if shown else None)
            require(answer == want, f"slow: {client}: answer {answer!r}, expected {want!r}")
            if sample:
                times.append(seconds)
                name = ".".join(reversed(client.split(".")))
                asked = sorted(question for question in list(server.questions)
                               if question[0].startswith(name + "."))
                expected = sorted((f"{name}.{zone}", qtype)
                                  for zone in ("bl.bench", "bl2.bench")
                                  for qtype in (("A", "TXT") if shown else ("A",)))
                require(asked == expected,
                        f"slow: {client}: questions {asked}, expected {expected}")
        report_chatter(service)
    middle = median(times)
    ratio = middle / delay
    if not shown:
        shape = "one round trip, no TXT asked" if ratio < 1.5 else "more than one round trip"
    else:
        shape = ("A and TXT overlapped" if ratio < 1.5 else
                 "A, then TXT: in series" if ratio < 2.5 else "more than two round trips")
    print(f"  median {middle * 1000:.0f} ms (" + " ".join(f"{t * 1000:.0f}" for t in times)
          + f") over {len(times)} fresh clients, every answer the 554 expected; "
            f"delay {delay * 1000:.0f} ms")
    print(f"  = {ratio:.2f} x delay: {shape} (1 x delay: A and TXT overlapped; "
          f"2 x delay: in series)")
    require(middle >= 0.9 * delay, f"slow: median {middle * 1000:.0f} ms is faster than the "
                                   f"server answers")


# ------------------------------------------------------ part 4: memory ---

def storm_memory(args: argparse.Namespace, directory: Path, lists: Rbldnsd) -> None:
    total = args.storm
    print(f"Part 4: memory in a storm of {total} never-seen clients, [cache] max_entries "
          f"{args.storm_cache}")
    with start_policyd(directory, "storm", lists.nameserver,
                       with_txt_mode(BENCH_ZONES, args.zone_txt), args.service_cpus,
                       max_entries=args.storm_cache) as service:
        def request(offset: int) -> Callable[[int], bytes]:
            return lambda n: policy_request(dotted(STORM_BASE + offset + n), f"{n:x}.7a8b.0")

        warm = 200
        drive(service, warm, request(0), lambda n: DUNNO, args.connections, "storm warm-up")
        before = service.rss_mib()
        half = total // 2
        first = drive(service, half, request(warm), lambda n: DUNNO, args.connections,
                      "storm, first half")
        middle = service.rss_mib()
        second = drive(service, total - half, request(warm + half), lambda n: DUNNO,
                       args.connections, "storm, second half")
        end = service.rss_mib()
        report_chatter(service)
    print(f"  VmRSS: {before:.1f} MiB before (after {warm} requests), {middle:.1f} MiB after "
          f"{half}, {end:.1f} MiB after {total}")
    print(f"  {first.rate:.0f}/s in the first half, {second.rate:.0f}/s in the second; "
          f"{(end - middle) / max(1, total - half) * 1024 * 1024:.0f} bytes per client in "
          f"the second half")


# ------------------------------------------------- part 5: through Postfix ---

def milter_through_postfix(args: argparse.Namespace, directory: Path) -> None:
    import postfix_throughput as pt      # bench/, next to this file

    require(pt.POSTFIX is not None and pt.SMTP_SOURCE is not None,
            "postfix or smtp-source not found (Debian package postfix): use --skip-postfix")
    messages, rounds, sessions = args.postfix_messages, args.postfix_rounds, 20
    print(f"Part 5: the milter through Postfix, unix socket, smtp-source -s {sessions}, "
          f"{messages} messages per run, rounds: {rounds} (bench/postfix_throughput.py's "
          f"(a), (b), (c) with its --dnsbl zones)")
    try:
        with contextlib.ExitStack() as stack:
            lists, dnsbl = pt.start_dnsbl_zones()
            stack.callback(lists.stop)
            baseline_socket = f"unix:{directory}/baseline-milter.sock"
            milter_socket = f"unix:{directory}/relaymilter-milter.sock"
            config = pt.relaymilter_config(directory / "milter.toml",
                                           f'[milter]\nsocket = "{milter_socket}"\n',
                                           directory / "milter-store.sqlite3", dnsbl)
            services = []
            for name, command, where in (
                    ("baseline-milter-unix",
                     [*PYTHON, str(ROOT / "bench" / "baseline_milter.py"), baseline_socket],
                     baseline_socket),
                    ("relaymilter-unix", relaymilter_command("run", config), milter_socket)):
                service = pt.ServiceProcess(name, "milter", command, where, directory)
                stack.callback(service.stop)
                services.append(service)
            for service in services:
                service.wait_until_listening()
            configurations = []
            for label, service in (("a", None), ("b", services[0]), ("c", services[1])):
                postfix = pt.postfix_for(service)
                stack.callback(postfix.stop)
                postfix.start()
                configurations.append(pt.Configuration(label, "unix" if service else "-",
                                                       postfix, service))
            for configuration in configurations:
                configuration.check_relay()
                configuration.send(min(messages, 200), sessions)       # warm-up
            for number in range(rounds):
                shift = number % len(configurations)
                for configuration in configurations[shift:] + configurations[:shift]:
                    configuration.measure(messages, sessions)
                print(f"  round {number + 1}: " + "  ".join(
                    f"{c.key} {c.rates[-1]:5.0f}/s" for c in configurations), flush=True)
            for service in services:
                chatter = [line for line in service.log().splitlines()
                           if ": warning: " in line or ": error: " in line
                           or "Traceback" in line][:10]
                if chatter:
                    print(f"  {service.name} logged:\n    " + "\n    ".join(chatter))
    except pt.BenchError as error:
        raise BenchmarkError(f"postfix: {error}") from None
    b, c = configurations[1:]
    rate = {conf.label: median(conf.rates) for conf in configurations}
    for conf in configurations:
        print(f"  {conf.title:32} {rate[conf.label]:6.0f}/s  ("
              + " ".join(f"{r:.0f}" for r in conf.rates) + ")"
              + (f"   service CPU {median(conf.cpu_per_message) * 1e6:.0f} us/message"
                 if conf.service else ""))
    per_round = [cr / br for cr, br in zip(c.rates, b.rates)]
    print(f"  c/a = {rate['c'] / rate['a']:.2f}")
    print(f"  c/b = {rate['c'] / rate['b']:.2f}   target >= 1.0: "
          f"{verdict(rate['c'] >= rate['b'])}   (per round "
          + " ".join(f"{r:.2f}" for r in per_round) + ")")


# ------------------------------------------------------------------- main ---

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3000 requests, 1 round, no storm, 200 Postfix messages")
    parser.add_argument("--rounds", type=int, help="rounds of every measurement (3)")
    parser.add_argument("--requests", type=int, help="requests per noop/hot/cold run (20000)")
    parser.add_argument("--connections", type=int, default=20,
                        help="concurrent policy connections (20)")
    parser.add_argument("--floor-queries", type=int, help="hand-built queries per round (5000)")
    parser.add_argument("--samples", type=int, help="fresh clients timed in part 3 (5)")
    parser.add_argument("--delay", type=float, default=0.2, help="part 3 DNS delay, s (0.2)")
    parser.add_argument("--zone-txt", choices=("listed", "with-a", "off"),
                        help="txt = MODE for the blocklist zones (default: no key written)")
    parser.add_argument("--storm", type=int, help="part 4: clients in the storm (0: skip)")
    parser.add_argument("--storm-cache", type=int, default=10000,
                        help="part 4: [cache] max_entries (10000)")
    parser.add_argument("--skip-postfix", action="store_true", help="leave part 5 out")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave CPU placement to the scheduler (see CPU placement)")
    parser.add_argument("--postfix-messages", type=int, help="part 5: messages per run (1000)")
    args = parser.parse_args(argv)
    defaults = (dict(rounds=1, requests=3000, floor_queries=2000, samples=3, storm=0,
                     postfix_messages=200) if args.quick
                else dict(rounds=3, requests=20000, floor_queries=5000, samples=5, storm=0,
                          postfix_messages=1000))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.postfix_rounds = args.rounds
    args.txt_mode = args.zone_txt or "listed"       # what the service does without the key
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    args.load_cpus = {cpus[0]} if pin else None
    args.service_cpus = {cpus[-1]} if pin else None
    args.cold_warmup = min(500, max(50, args.requests // 20))
    if min(args.rounds, args.requests, args.connections, args.floor_queries, args.samples,
           args.storm_cache, args.postfix_messages) < 1 or args.storm < 0:
        parser.error("counts must be positive (--storm may be 0)")
    if not 0 < args.delay < 2.0:
        parser.error("--delay must be between 0 and the 2.0 s timeout")
    if args.storm > STORM_MAX - 200:
        parser.error(f"--storm: at most {STORM_MAX - 200} clients fit in 127.128.0.0/9")
    return args


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)          # unwinds the clean-up like Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if RBLDNSD is None:
        print("rbldnsd is not installed (Debian: apt-get install rbldnsd)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminated)
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-storm-"))
    try:
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
            directory.chmod(0o755)     # Postfix's smtpd (user postfix) reaches sockets here
            print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
                  f"{load_before:.1f}")
            print(f"relaymilter measured: {measured_relaymilter()}")
            print("  (services run as `python -P -m relaymilter` in this environment: "
                  f"PYTHONPATH={os.environ.get('PYTHONPATH', '')!r} decides)")
            if args.load_cpus is None:
                print("CPU placement: left to the scheduler")
            else:
                print(f"CPU placement: this process (load generator) on CPU "
                      f"{min(args.load_cpus)}; the services, rbldnsd and the floor on CPU "
                      f"{min(args.service_cpus)}")
            with running_on(args.service_cpus):     # DNS on the services' CPU
                lists = start_lists(args.rounds * (args.cold_warmup + args.requests))
            cleanup.callback(lists.stop)
            print(f"rbldnsd {RBLDNSD} on {lists.nameserver}: bl.bench (weight 1, TXT), "
                  f"wl.bench (weight -2), TTL {CACHE_TTL} s\n")
            with running_on(args.load_cpus):
                policy_service(args, directory, lists)
                print()
                txt_latency(args, directory)
                if args.storm:
                    print()
                    storm_memory(args, directory, lists)
            if not args.skip_postfix:
                print()
                milter_through_postfix(args, directory)
    except BenchmarkError as error:
        print(f"ABORTED: {error}", file=sys.stderr)
        return 1
    print(f"\ntotal {time.perf_counter() - began:.0f} s; load average (1 min) {load_before:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
