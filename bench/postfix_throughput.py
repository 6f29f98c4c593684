"""postfix_throughput - messages per second through a real Postfix, with and without a milter.

NAME
    postfix_throughput - what relaymilter costs Postfix, next to a do-nothing milter

SYNOPSIS
    python bench/postfix_throughput.py [--messages N] [--rounds R] [--sessions S] [--quick]

DESCRIPTION
    Postfix's own load generator, smtp-source(1), sends N messages to a private
    Postfix on loopback (tests/integration/postfix_instance.py): S sessions in
    parallel, one message per SMTP connection (smtp-source's default small
    message), MAIL FROM:<sender@remote.test>, RCPT TO:<user@local.test>. Rates
    are N divided by the wall time of one smtp-source run, so they cover the
    whole SMTP conversation up to "250 queued" and the milter's work for it.
    Delivery (discard(8)) is not timed: after each run the script waits until
    Postfix has logged every message as delivered, so runs do not compete with
    the previous run's queue.

    Configurations, each a Postfix instance of its own (all started at the
    beginning, measured one at a time):
      (a) none         Postfix without a milter
      (b) baseline     bench/baseline_milter.py: connect, MAIL, RCPT, end of
                       message, CONTINUE each (ACCEPT at the end), the rest
                       negotiated away
      (c) relaymilter  `relaymilter run` with local_domains = ["local.test"] and
                       trusted_networks not containing 127.0.0.1: every message
                       is an untrusted client sending to a local recipient, the
                       real decision, permitted
    (b) and (c) are measured over a unix socket and over TCP (inet on
    127.0.0.1); milter_protocol = 6, milter_default_action = tempfail.

    Before measuring, every configuration gets one warm-up run, and a relay
    attempt (RCPT TO:<user@remote.test>) must get 250 from (a) and (b), which
    are open relays, and 554 from (c): proof that relaymilter is on the path.
    A run that smtp-source reports an error for, or whose messages Postfix does
    not deliver, aborts the benchmark rather than count as fast.

    Runs are interleaved: each round measures all five configurations, in an
    order rotated by one per round, so drift (CPU frequency, other load) hits
    them alike. The table shows the median rate per configuration, with the
    lowest and highest round; c/a and c/b are ratios of medians.

READING THE FIGURES
    c/a is what relaymilter costs compared with no milter at all: below 1.0,
    since any milter adds round trips to every SMTP session. c/b compares
    relaymilter with the cheapest milter one could write in pymilter; the
    target is c/b >= 1.0 (relaymilter costs Postfix no more than a milter that
    decides nothing). Ratios within a few percent of each other are noise on a
    small machine: compare them with the min-max spread of the rounds and with
    the c/b of each round, which compares runs made close together.

    The milter CPU time per message (user + system, from /proc) is less noisy
    than the rates: it shows what each milter process spends, though other load
    on the machine inflates it too (cold caches). It is not what limits the rate
    by itself: Postfix waits for the milter's replies, so round trips and
    stalls count as well.

    inet rates far below the unix ones, for (b) and (c) alike, are the
    Nagle/delayed-ACK stall: Postfix sends the DATA-stage macros without
    expecting a reply, then the end-of-message packets wait up to 40 ms for
    the TCP acknowledgement. A milter that replies at DATA does not have it.
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


class BenchError(RuntimeError):
    """The benchmark cannot produce trustworthy figures."""


class MilterProcess:
    """A milter subprocess listening on a socket given in libmilter syntax."""

    def __init__(self, name: str, command: list[str], libmilter_socket: str, directory: Path):
        self.name = name
        self.socket = libmilter_socket
        self.log_path = directory / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def postfix_socket(self) -> str:
        """The same socket in smtpd_milters syntax."""
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
            # smtpd connects as the postfix user; libmilter leaves the socket
            # at 0777 & ~umask, which needs write permission for others.
            Path(self.socket[5:]).chmod(0o666)

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
        """User plus system CPU time the milter process has used so far."""
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
    label: str  # "a", "b" or "c"
    name: str
    transport: str  # "-", "unix" or "inet"
    postfix: PostfixInstance
    milter: MilterProcess | None
    expected_relay_reply: int
    rates: list[float] = field(default_factory=list)
    cpu_per_message: list[float] = field(default_factory=list)  # milter CPU seconds
    delivered: int = 0  # messages Postfix has logged as delivered so far
    warnings: list[str] = field(default_factory=list)  # Postfix log lines
    _log_offset: int = 0

    @property
    def title(self) -> str:
        suffix = "" if self.transport == "-" else f" {self.transport}"
        return f"({self.label}) {self.name}{suffix}"

    def measure(self, messages: int, sessions: int) -> float:
        """One recorded run; returns messages per second."""
        rate, cpu = self.send(messages, sessions)
        self.rates.append(rate)
        if self.milter:
            self.cpu_per_message.append(cpu)
        return rate

    def send(self, messages: int, sessions: int) -> tuple[float, float]:
        """One smtp-source run: messages per second, milter CPU seconds per message."""
        command = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-f", SENDER,
                   "-t", LOCAL_RECIPIENT, "%s:%d" % self.postfix.address]
        cpu = self.milter.cpu_seconds() if self.milter else 0.0
        started = time.perf_counter()
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=600)
        elapsed = time.perf_counter() - started
        cpu = (self.milter.cpu_seconds() - cpu) / messages if self.milter else 0.0
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


def milter_processes(directory: Path, dnsbl: str = "") -> dict[tuple[str, str], MilterProcess]:
    """Start baseline and relaymilter on a unix socket and on TCP.

    dnsbl: TOML for relaymilter's [dnsbl] section, "" for none.
    """
    milters = {}
    for transport in ("unix", "inet"):
        for name in ("baseline", "relaymilter"):
            if transport == "unix":
                where = f"unix:{directory}/{name}.sock"
            else:
                where = f"inet:{free_loopback_port()}@127.0.0.1"
            if name == "baseline":
                command = [sys.executable, str(ROOT / "bench" / "baseline_milter.py"), where]
            else:
                config = directory / f"relaymilter-{transport}.toml"
                config.write_text(
                    "[milter]\n"
                    f'socket = "{where}"\n'
                    "[relay]\n"
                    'local_domains = ["local.test"]\n'
                    '# not 127.0.0.1, where smtp-source connects from\n'
                    'trusted_networks = ["192.0.2.0/24"]\n'
                    "[store]\n"
                    f'path = "{directory}/policy-{transport}.sqlite3"\n' + dnsbl)
                command = [sys.executable, "-m", "relaymilter", "run", "-c", str(config)]
            milters[transport, name] = MilterProcess(f"{name}-{transport}", command, where,
                                                     directory)
    try:
        for milter in milters.values():
            milter.wait_until_listening()
    except BaseException:
        for milter in milters.values():
            milter.stop()
        raise
    return milters


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
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-bench-"))
    directory.chmod(0o755)  # smtpd, as the postfix user, must reach the unix sockets
    milters: dict[tuple[str, str], MilterProcess] = {}
    configurations: list[Configuration] = []
    lists = None
    try:
        dnsbl = ""
        if args.dnsbl:
            lists, dnsbl = start_dnsbl_zones()
        milters = milter_processes(directory, dnsbl)

        def add(label: str, name: str, transport: str, milter: MilterProcess | None) -> None:
            postfix = PostfixInstance(milter.postfix_socket if milter else None,
                                      milter_default_action="tempfail", milter_protocol=6,
                                      extra_main_cf=POSTFIX_SETTINGS)
            configurations.append(Configuration(label, name, transport, postfix, milter,
                                                 554 if label == "c" else 250))
            postfix.start()

        add("a", "none", "-", None)
        for transport in ("unix", "inet"):
            add("b", "baseline", transport, milters[transport, "baseline"])
            add("c", "relaymilter", transport, milters[transport, "relaymilter"])

        print(f"relaymilter at {relaymilter_revision()}, Postfix {postfix_version()}")
        if args.dnsbl:
            print("relaymilter with 2 DNSBL zones (bl.bench, wl.bench) on rbldnsd, TTL 1 h")
        print(f"smtp-source -s {args.sessions}, one message per connection, "
              f"{args.messages} messages per run, {args.rounds} rounds")
        for configuration in configurations:
            configuration.check_relay()
            configuration.send(min(args.messages, 200), args.sessions)  # warm-up
        print("warm-up done; relay attempt refused (554) by relaymilter only")

        for round_number in range(args.rounds):
            shift = round_number % len(configurations)
            order = configurations[shift:] + configurations[:shift]
            figures = []
            for configuration in order:
                rate = configuration.measure(args.messages, args.sessions)
                figures.append(f"{configuration.label}/{configuration.transport} {rate:6.0f}")
            print(f"round {round_number + 1}: " + "  ".join(figures) + "  msg/s")

        report(configurations, args)
        for configuration in configurations:
            if configuration.warnings:
                print(f"\nPostfix {configuration.title} logged {len(configuration.warnings)} "
                      "warnings, first ones:\n" + "\n".join(configuration.warnings[:5]))
        for milter in milters.values():
            chatter = [line for line in milter.log().splitlines()
                       if ": warning: " in line or ": error: " in line or "Traceback" in line]
            if chatter:
                print(f"\n{milter.name} logged:\n" + "\n".join(chatter[:10]))
    finally:
        for configuration in configurations:
            configuration.postfix.stop()
        for milter in milters.values():
            milter.stop()
        if lists is not None:
            lists.stop()
        shutil.rmtree(directory, ignore_errors=True)


def report(configurations: list[Configuration], args: argparse.Namespace) -> None:
    def spread(configuration: Configuration) -> str:
        rates = configuration.rates
        return f"{statistics.median(rates):6.0f} ({min(rates):.0f}-{max(rates):.0f})"

    by_key = {(c.label, c.transport): c for c in configurations}
    none = by_key["a", "-"]
    print(f"\nmessages/s, median of {args.rounds} rounds (lowest-highest)")
    header = (f"{'socket':6}  {'(a) no milter':>19}  {'(b) baseline':>19}  "
              f"{'(c) relaymilter':>19}  {'c/a':>5}  {'c/b':>5}")
    print(header)
    print("-" * len(header))
    verdicts = []
    for transport in ("unix", "inet"):
        baseline, relay = by_key["b", transport], by_key["c", transport]
        median = {c.label: statistics.median(c.rates) for c in (none, baseline, relay)}
        c_a, c_b = median["c"] / median["a"], median["c"] / median["b"]
        print(f"{transport:6}  {spread(none):>19}  {spread(baseline):>19}  {spread(relay):>19}  "
              f"{c_a:5.2f}  {c_b:5.2f}")
        verdicts.append(f"{transport} {'met' if c_b >= 1.0 else 'NOT met'}")
    print(f"\ntarget c/b >= 1.0: {', '.join(verdicts)}")

    print("\nc/b within each round (b and c run close together, so load drift cancels more)")
    for transport in ("unix", "inet"):
        pairs = zip(by_key["c", transport].rates, by_key["b", transport].rates)
        ratios = [c / b for c, b in pairs]
        print(f"{transport:6}  " + " ".join(f"{ratio:5.2f}" for ratio in ratios)
              + f"   median {statistics.median(ratios):.2f}")

    print("\nmilter CPU time per message (user + system, median), microseconds")
    for transport in ("unix", "inet"):
        cpu = [statistics.median(by_key[label, transport].cpu_per_message) * 1e6 for label in "bc"]
        print(f"{transport:6}  (b) baseline {cpu[0]:5.0f}   (c) relaymilter {cpu[1]:5.0f}")


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
