"""postfix_throughput - messages per second through a real Postfix, with and without relaymilter.

NAME
    postfix_throughput - what relaymilter costs Postfix, as a milter and as a
    policy service, next to a do-nothing milter and a do-nothing policy service

SYNOPSIS
    python bench/postfix_throughput.py [--messages N] [--rounds R] [--sessions S] [--quick]
                                       [--dnsbl]

DESCRIPTION
    Postfix's own load generator, smtp-source(1), sends N messages to a private
    Postfix on loopback (tests/integration/postfix_instance.py): S sessions in
    parallel, one message per SMTP connection (smtp-source's default small
    message), MAIL FROM:<sender@remote.test>, RCPT TO:<user@local.test>. Rates
    are N divided by the wall time of one smtp-source run, so they cover the
    whole SMTP conversation up to "250 queued" and the milter's or policy
    service's work for it. Delivery (discard(8)) is not timed: after each run
    the script waits until Postfix has logged every message as delivered, so
    runs do not compete with the previous run's queue.

    Configurations, each a Postfix instance of its own (all started at the
    beginning, measured one at a time):
      (a) none                 Postfix alone: no milter, no policy service
      (b) baseline             bench/baseline_milter.py: connect, MAIL, RCPT,
                               end of message, CONTINUE each (ACCEPT at the
                               end), the rest negotiated away
      (c) relaymilter          `relaymilter run` with local_domains =
                               ["local.test"] and trusted_networks not
                               containing 127.0.0.1: every message is an
                               untrusted client sending to a local recipient,
                               the real decision, permitted
      (d) relaymilter policyd  `relaymilter policyd` with the [relay] settings
                               of (c) (and a store of its own): the same
                               decision, asked by Postfix as a policy service
                               (action=DUNNO)
      (e) dunno policyd        bench/dunno_policyd.py: reads each request,
                               answers action=DUNNO
    Every service is measured over a unix socket and over TCP (inet on
    127.0.0.1). Milters: milter_protocol = 6, milter_default_action =
    tempfail. Policy services: no milter, and
        smtpd_relay_restrictions = check_policy_service SOCKET,
            check_client_access static:OK, reject_unauth_destination
    (the last two are the test instance's open relay), so the service is the
    only gate. The smtpd_policy_service_* parameters keep their defaults: each
    smtpd process opens one connection to the service and reuses it for
    every SMTP session it serves (max_idle 300 s, max_ttl 1000 s, no request
    limit), answers it waits for up to 100 s, and a failed service means
    "451 4.3.5" (default_action), a tempfail like the milters'. smtpd
    processes end after max_use = 100 sessions, so new processes, and new
    policy connections, come and go during a run as they would in
    production. policy_time_limit only bounds services that spawn(8) runs
    from master.cf; these run on their own.

    Before measuring, every configuration gets one warm-up run, and a relay
    attempt (RCPT TO:<user@remote.test>) must get 250 from (a), (b) and (e),
    which are open relays, and 554 from (c) and (d): proof that relaymilter
    is on the path. A run that smtp-source reports an error for, or whose
    messages Postfix does not deliver, aborts the benchmark rather than count
    as fast. Without a `relaymilter policyd` verb (an older commit), (d) is
    left out and says so.

    Runs are interleaved: each round measures all nine configurations, in an
    order rotated by one per round, so drift (CPU frequency, other load) hits
    them alike; (b) and (c), and (d) and (e), of one socket type run next to
    each other. The table shows the median rate per configuration, with the
    lowest and highest round; c/a, c/b, d/a and d/e are ratios of medians.

READING THE FIGURES
    c/a and d/a are what relaymilter costs compared with Postfix alone: below
    1.0, since any milter or policy service adds round trips to every SMTP
    session. c/b and d/e compare relaymilter with the cheapest milter and
    policy service one could write in Python. Targets: c/b >= 1.0 (the milter
    costs Postfix no more than a milter that decides nothing); d/a >= 0.85
    and d/e >= 0.95 (the policy service costs at most 15 % of Postfix's rate,
    and at most 5 % more than one that decides nothing). Ratios within a few
    percent of each other are noise on a small machine: compare them with the
    min-max spread of the rounds and with the per-round c/b and d/e, which
    compare runs made close together.

    The service CPU time per message (user + system of the process and its
    threads, from /proc) is less noisy than the rates: it shows what each
    service process spends, though other load on the machine inflates it too
    (cold caches). It is not what limits the rate by itself: Postfix waits
    for the replies, so round trips and stalls count as well.

    A policy service costs one round trip per recipient on a connection smtpd
    already holds; a milter costs a connection per SMTP session and a round
    trip per stage. So (d) and (e) should stay close to (a), where (b) and
    (c) cannot.

    Milter inet rates far below the unix ones, for (b) and (c) alike, are the
    Nagle/delayed-ACK stall: Postfix sends the DATA-stage macros without
    expecting a reply, then the end-of-message packets wait up to 40 ms for
    the TCP acknowledgement. A milter that replies at DATA does not have it;
    the policy protocol, one request and one answer, does not either.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from postfix_instance import POSTFIX, PostfixInstance, free_loopback_port  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source",
                            path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
SENDER = "sender@remote.test"
LOCAL_RECIPIENT = "user@local.test"
REMOTE_RECIPIENT = "user@remote.test"

# 20 parallel sessions from one address: lift anvil(8) limits and make room
# for enough smtpd processes (defaults would mostly do; be explicit).
POSTFIX_SETTINGS = {
    "default_process_limit": "100",
    "smtpd_client_connection_count_limit": "0",
    "smtpd_client_connection_rate_limit": "0",
    "smtpd_client_message_rate_limit": "0",
}
# PostfixInstance's default smtpd_relay_restrictions: an open relay Postfix accepts.
OPEN_RELAY = "check_client_access static:OK, reject_unauth_destination"

# label -> (name, kind of service, reply to a relay attempt)
CONFIGURATIONS = {
    "a": ("Postfix alone", None, 250),
    "b": ("baseline milter", "milter", 250),
    "c": ("relaymilter milter", "milter", 554),
    "d": ("relaymilter policyd", "policy", 554),
    "e": ("DUNNO policyd", "policy", 250),
}
SERVICES = "bcde"
TRANSPORTS = ("unix", "inet")


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy figures."""


class ServiceProcess:
    """A milter or policy service subprocess on a socket given as unix:PATH or inet:PORT@HOST."""

    def __init__(self, name: str, kind: str, command: list[str], where: str, directory: Path):
        self.name = name
        self.kind = kind  # "milter" or "policy"
        self.socket = where
        self.log_path = directory / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def postfix_socket(self) -> str:
        """The same socket as smtpd_milters and check_policy_service write it."""
        if self.socket.startswith("unix:"):
            return self.socket
        port, host = re.fullmatch(r"inet:(\d+)@(.+)", self.socket).groups()
        return f"inet:{host}:{port}"

    def wait_until_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._connectable():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{self.name} is not listening on {self.socket}:\n{self.log()}")
            time.sleep(0.05)
        if self.socket.startswith("unix:"):
            path = Path(self.socket[5:])
            if self.kind == "milter":
                # smtpd connects as the postfix user; libmilter leaves the socket
                # at 0777 & ~umask, which needs write permission for others.
                path.chmod(0o666)
            elif not path.stat().st_mode & 0o002:
                # The policy services set the mode themselves ([policyd] socket_mode).
                raise BenchError(f"{self.name}: {path} has mode "
                                 f"{path.stat().st_mode & 0o777:04o}; smtpd, as the postfix "
                                 "user, cannot connect")

    def _connectable(self) -> bool:
        try:
            if self.socket.startswith("unix:"):
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.socket[5:])
            else:
                port, host = re.fullmatch(r"inet:(\d+)@(.+)", self.socket).groups()
                socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process (all its threads) has used so far."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        # libmilter takes ~5 s to notice SIGTERM (POSTFIX_FACTS.md); nothing to save here.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@dataclass
class Configuration:
    label: str  # "a" to "e", see CONFIGURATIONS
    transport: str  # "-", "unix" or "inet"
    postfix: PostfixInstance
    service: ServiceProcess | None
    rates: list[float] = field(default_factory=list)
    cpu_per_message: list[float] = field(default_factory=list)  # service CPU seconds
    delivered: int = 0  # messages Postfix has logged as delivered so far
    warnings: list[str] = field(default_factory=list)  # Postfix log lines
    _log_offset: int = 0

    @property
    def name(self) -> str:
        return CONFIGURATIONS[self.label][0]

    @property
    def expected_relay_reply(self) -> int:
        return CONFIGURATIONS[self.label][2]

    @property
    def key(self) -> str:
        """Short name for round lines: "a", "b/unix", ..."""
        return self.label if self.transport == "-" else f"{self.label}/{self.transport}"

    @property
    def title(self) -> str:
        suffix = "" if self.transport == "-" else f" {self.transport}"
        return f"({self.label}) {self.name}{suffix}"

    def measure(self, messages: int, sessions: int) -> float:
        """One recorded run; returns messages per second."""
        rate, cpu = self.send(messages, sessions)
        self.rates.append(rate)
        if self.service:
            self.cpu_per_message.append(cpu)
        return rate

    def send(self, messages: int, sessions: int) -> tuple[float, float]:
        """One smtp-source run: messages per second, service CPU seconds per message."""
        command = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-f", SENDER,
                   "-t", LOCAL_RECIPIENT, "%s:%d" % self.postfix.address]
        cpu = self.service.cpu_seconds() if self.service else 0.0
        started = time.perf_counter()
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=600)
        elapsed = time.perf_counter() - started
        cpu = (self.service.cpu_seconds() - cpu) / messages if self.service else 0.0
        if result.returncode != 0 or result.stderr.strip():
            raise BenchError(f"{self.title}: smtp-source exited {result.returncode}:\n"
                             f"{result.stderr.strip()}\n{self._new_log_lines(' warning: ')}")
        self._wait_for_delivery(messages)
        return messages / elapsed, cpu

    def check_relay(self) -> None:
        """A relay attempt must be refused by relaymilter and only by it."""
        with smtplib.SMTP(*self.postfix.address, timeout=30) as client:
            client.ehlo("bench.remote.test")
            client.mail(SENDER)
            code, reply = client.rcpt(REMOTE_RECIPIENT)
            client.rset()
        if code != self.expected_relay_reply:
            raise BenchError(f"{self.title}: RCPT TO:<{REMOTE_RECIPIENT}> got {code} "
                             f"{reply.decode(errors='replace')}, "
                             f"expected {self.expected_relay_reply}")

    def _wait_for_delivery(self, messages: int, timeout: float = 120.0) -> None:
        target = self.delivered + messages
        deadline = time.monotonic() + timeout
        while True:
            lines = self._new_log_lines()
            self.warnings += [line for line in lines if " warning: " in line]
            self.delivered += sum(f"to=<{LOCAL_RECIPIENT}>" in line and "status=sent" in line
                                  for line in lines)
            if self.delivered >= target:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.title}: {self.delivered}/{target} messages delivered "
                                 f"after {timeout:.0f} s; Postfix log:\n"
                                 f"{self.postfix.log_text()[-3000:]}")
            time.sleep(0.05)

    def _new_log_lines(self, containing: str = "") -> list[str]:
        """Complete log lines written since the last call."""
        with self.postfix.maillog.open("rb") as log:
            log.seek(self._log_offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        lines = complete.decode(errors="replace").splitlines()
        return [line for line in lines if containing in line]


def policyd_available() -> bool:
    """Whether this checkout's relaymilter has the policyd verb."""
    result = subprocess.run([sys.executable, "-P", "-m", "relaymilter", "policyd", "--help"],
                            stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, timeout=60)
    return result.returncode == 0


def relaymilter_config(path: Path, listener: str, store: Path, dnsbl: str) -> Path:
    """Write relaymilter's config for (c) and (d); listener is its [milter] or [policyd] TOML."""
    path.write_text(
        listener +
        "[relay]\n"
        'local_domains = ["local.test"]\n'
        '# not 127.0.0.1, where smtp-source connects from\n'
        'trusted_networks = ["192.0.2.0/24"]\n'
        "[store]\n"
        f'path = "{store}"\n' + dnsbl)
    return path


def start_services(directory: Path, labels: str,
                   dnsbl: str = "") -> dict[tuple[str, str], ServiceProcess]:
    """Start the services of the given labels (of "bcde") on a unix socket and on TCP.

    dnsbl: TOML for relaymilter's [dnsbl] section, "" for none.
    """
    python = sys.executable
    services = {}
    try:
        for transport in TRANSPORTS:
            for label in labels:
                name = CONFIGURATIONS[label][0].replace(" ", "-").lower() + f"-{transport}"
                if transport == "unix":
                    where = f"unix:{directory}/{name}.sock"
                else:
                    where = f"inet:{free_loopback_port()}@127.0.0.1"
                store = directory / f"policy-{name}.sqlite3"
                if label == "b":
                    command = [python, str(ROOT / "bench" / "baseline_milter.py"), where]
                elif label == "c":
                    config = relaymilter_config(directory / f"{name}.toml",
                                                f'[milter]\nsocket = "{where}"\n', store, dnsbl)
                    command = [python, "-P", "-m", "relaymilter", "run", "-c", str(config)]
                elif label == "d":
                    config = relaymilter_config(
                        directory / f"{name}.toml",
                        f'[policyd]\nsocket = "{where}"\nsocket_mode = "0666"\n', store, dnsbl)
                    command = [python, "-P", "-m", "relaymilter", "policyd", "-c", str(config)]
                else:
                    command = [python, str(ROOT / "bench" / "dunno_policyd.py"), where]
                kind = CONFIGURATIONS[label][1]
                services[label, transport] = ServiceProcess(name, kind, command, where, directory)
        for service in services.values():
            service.wait_until_listening()
    except BaseException:
        for service in services.values():
            service.stop()
        raise
    return services


def postfix_for(service: ServiceProcess | None) -> PostfixInstance:
    """A Postfix instance (not started) with the service as milter or policy service."""
    if service is None or service.kind == "milter":
        return PostfixInstance(service.postfix_socket if service else None,
                               milter_default_action="tempfail", milter_protocol=6,
                               extra_main_cf=POSTFIX_SETTINGS)
    restrictions = f"check_policy_service {service.postfix_socket}, {OPEN_RELAY}"
    return PostfixInstance(None, extra_main_cf={**POSTFIX_SETTINGS,
                                                "smtpd_relay_restrictions": restrictions})


def start_dnsbl_zones():
    """rbldnsd with two zones (a blocklist and an allowlist); returns it and [dnsbl] TOML.

    smtp-source connects from 127.0.0.1, which RFC 5782 says no list lists:
    every message costs a lookup in both zones, answered NXDOMAIN, cached
    for the hour the zones' TTL says (the warm-up run fills the cache).
    """
    from rbldnsd import Rbldnsd, RbldnsdZone
    server = Rbldnsd([RbldnsdZone("bl.bench", "ip4set", [":127.0.0.2:Listed", "127.0.0.2"]),
                      RbldnsdZone("wl.bench", "ip4set", [":127.0.10.2:", "127.0.0.2"])],
                     ttl=3600)
    server.start()
    toml = ("[dnsbl]\n"
            f'nameservers = ["{server.nameserver}"]\n'
            '[[dnsbl.zone]]\nname = "bl.bench"\nweight = 1\n'
            '[[dnsbl.zone]]\nname = "wl.bench"\nweight = -2\n')
    return server, toml


def postfix_version() -> str:
    result = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"],
                            capture_output=True, text=True)
    return result.stdout.strip() or "?"


def relaymilter_revision() -> str:
    """The commit measured, and whether relaymilter/ has uncommitted changes."""
    def git(*arguments: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *arguments], capture_output=True,
                                text=True)
        return result.stdout.strip() if result.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "relaymilter")
    return commit + (" + uncommitted changes in relaymilter/" if dirty else "")


def run(args: argparse.Namespace) -> None:
    if POSTFIX is None or SMTP_SOURCE is None:
        raise BenchError("postfix or smtp-source not found (Debian package postfix); "
                         "run `scripts/install-debian-deps test`")
    labels = SERVICES if policyd_available() else SERVICES.replace("d", "")
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-bench-"))
    directory.chmod(0o755)  # smtpd, as the postfix user, must reach the unix sockets
    services: dict[tuple[str, str], ServiceProcess] = {}
    configurations: list[Configuration] = []
    lists = None
    try:
        dnsbl = ""
        if args.dnsbl:
            lists, dnsbl = start_dnsbl_zones()
        services = start_services(directory, labels, dnsbl)

        def add(label: str, transport: str) -> None:
            service = services.get((label, transport))
            postfix = postfix_for(service)
            configurations.append(Configuration(label, transport, postfix, service))
            postfix.start()

        add("a", "-")
        for transport in TRANSPORTS:
            for label in labels:
                add(label, transport)

        load_before = os.getloadavg()[0]
        print(f"relaymilter at {relaymilter_revision()}, Postfix {postfix_version()}")
        if "d" not in labels:
            print("relaymilter has no policyd verb here: (d) relaymilter policyd left out")
        if args.dnsbl:
            print("relaymilter with 2 DNSBL zones (bl.bench, wl.bench) on rbldnsd, TTL 1 h")
        print(f"smtp-source -s {args.sessions}, one message per connection, "
              f"{args.messages} messages per run, {args.rounds} rounds")
        for configuration in configurations:
            configuration.check_relay()
            configuration.send(min(args.messages, 200), args.sessions)  # warm-up
        refusers = " and ".join(f"({label})" for label in labels
                                if CONFIGURATIONS[label][2] == 554)
        print(f"warm-up done; relay attempt refused (554) by {refusers} only")

        print("\nmessages/s per run (measured in an order rotated by one per round)")
        print("round " + "".join(f"{c.key:>8}" for c in configurations))
        for round_number in range(args.rounds):
            shift = round_number % len(configurations)
            for configuration in configurations[shift:] + configurations[:shift]:
                configuration.measure(args.messages, args.sessions)
            print(f"{round_number + 1:5} "
                  + "".join(f"{c.rates[-1]:8.0f}" for c in configurations), flush=True)

        report(configurations, args)
        print(f"\nload average (1 min) on {os.cpu_count()} CPUs: {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after (the benchmark's own load included)")
        for configuration in configurations:
            if configuration.warnings:
                print(f"\nPostfix {configuration.title} logged {len(configuration.warnings)} "
                      "warnings, first ones:\n" + "\n".join(configuration.warnings[:5]))
        for service in services.values():
            chatter = [line for line in service.log().splitlines()
                       if ": warning: " in line or ": error: " in line or "Traceback" in line
                       or "Exception" in line]
            if chatter:
                print(f"\n{service.name} logged:\n" + "\n".join(chatter[:10]))
    finally:
        for configuration in configurations:
            configuration.postfix.stop()
        for service in services.values():
            service.stop()
        if lists is not None:
            lists.stop()
        shutil.rmtree(directory, ignore_errors=True)


def report(configurations: list[Configuration], args: argparse.Namespace) -> None:
    by_key = {(c.label, c.transport): c for c in configurations}

    def row(label: str) -> str:
        return f"({label}) {CONFIGURATIONS[label][0]}"

    def spread(configuration: Configuration | None) -> str:
        if configuration is None:
            return "-"
        rates = configuration.rates
        return f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})"

    def ratio(numerator: str, denominator: str, transport: str) -> float | None:
        """Ratio of medians; (a) has no transport."""
        over = [by_key.get((label, "-" if label == "a" else transport))
                for label in (numerator, denominator)]
        if None in over:
            return None
        return statistics.median(over[0].rates) / statistics.median(over[1].rates)

    def figure(value: float | None, template: str) -> str:
        return "-" if value is None else template.format(value)

    print(f"\nmessages/s, median of {args.rounds} rounds (lowest-highest)")
    header = f"{'':24}{'unix socket':>20}{'inet socket':>20}"
    print(header)
    print("-" * len(header))
    print(f"{row('a'):24}{spread(by_key['a', '-']):>20}{'(no socket)':>20}")
    for label in SERVICES:
        print(f"{row(label):24}"
              + "".join(f"{spread(by_key.get((label, t))):>20}" for t in TRANSPORTS))

    print(f"\nratio of medians  {'unix':>6}{'inet':>6}   target")
    for name, target in (("c/a", None), ("c/b", 1.0), ("d/a", 0.85), ("d/e", 0.95)):
        values = [ratio(name[0], name[2], transport) for transport in TRANSPORTS]
        line = f"{name:18}" + "".join(f"{figure(value, '{:.2f}'):>6}" for value in values)
        if target is not None:
            verdicts = [f"{transport} " + ("-" if value is None
                                           else "met" if value >= target else "NOT met")
                        for transport, value in zip(TRANSPORTS, values)]
            line += f"   >= {target:.2f}: " + ", ".join(verdicts)
        print(line)

    print("\nratios within each round (b and c, d and e run next to each other, "
          "so load drift cancels more)")
    for numerator, denominator in ("cb", "de"):
        for transport in TRANSPORTS:
            pair = by_key.get((numerator, transport)), by_key.get((denominator, transport))
            if None in pair:
                continue
            ratios = [n / d for n, d in zip(pair[0].rates, pair[1].rates)]
            print(f"{numerator}/{denominator} {transport:6}"
                  + " ".join(f"{r:5.2f}" for r in ratios)
                  + f"   median {statistics.median(ratios):.2f}")

    tick = 1e6 / os.sysconf("SC_CLK_TCK") / args.messages
    print("\nservice CPU time per message (user + system, median), microseconds, "
          f"in steps of {tick:.0f} (a clock tick per run)")
    print(f"{'':24}{'unix':>6}{'inet':>6}")
    for label in SERVICES:
        cpu = [by_key.get((label, t)) for t in TRANSPORTS]
        print(f"{row(label):24}" + "".join(
            f"{figure(c and statistics.median(c.cpu_per_message) * 1e6, '{:.0f}'):>6}"
            for c in cpu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, help="messages per run (default 2000, quick 300)")
    parser.add_argument("--rounds", type=int,
                        help="rounds of all configurations (default 5, quick 3)")
    parser.add_argument("--sessions", type=int, default=20,
                        help="parallel SMTP sessions (default 20)")
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--dnsbl", action="store_true",
                        help="relaymilter with two DNSBL zones on rbldnsd, cache warm")
    args = parser.parse_args()
    if args.messages is None:
        args.messages = 300 if args.quick else 2000
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if min(args.messages, args.rounds, args.sessions) < 1:
        parser.error("--messages, --rounds and --sessions must be positive")
    try:
        run(args)
    except BenchError as error:
        print(f"postfix_throughput: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
