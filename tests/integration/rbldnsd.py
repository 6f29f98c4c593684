"""rbldnsd - a throw-away rbldnsd serving test zones on loopback.

NAME
    rbldnsd - start, query-count, reload and stop a private rbldnsd

SYNOPSIS
    zones = [RbldnsdZone("bl.test", "ip4set", [":127.0.0.2:Listed, see http://example.test/$",
                                               "127.0.0.2", "192.0.2.10"]),
             RbldnsdZone("bl.test", "ip6trie", ["::ffff:7f00:2", "2001:db8::10"])]
    with Rbldnsd(zones, ttl=2) as server:
        resolver = DnsResolver([server.nameserver])       # "127.0.0.1:PORT"
        ...
        server.query_count(name="10.2.0.192.bl.test", qtype="A")

DESCRIPTION
    Each instance lives in its own temporary directory (data files, pid
    file, query log, output) and listens on 127.0.0.1 at a free UDP port.
    It runs in the foreground (-n) as our child, so stop() can always end
    and reap it. One zone may be made of several datasets (an ip4set and an
    ip6trie under one name, as real lists serve both families).

    Every data file starts with a $SOA whose TTL and MINIMUM are the
    instance's ttl, so NXDOMAIN answers carry a negative TTL (RFC 2308).

    rbldnsd facts this module depends on (Debian 12, rbldnsd 1.0pre):
    - `rbldnsd -u rbldns -b 127.0.0.1/PORT -w DIR -t TTL -p PIDFILE
      -l +LOGFILE zone:ip4set:file ...`; it refuses to run as root, so a
      root caller passes -u, and the query log must then be owned by rbldns
      (rbldnsd opens it after dropping privileges). "+" = unbuffered.
    - The query log has one line per question, version.bind included:
      "TIME CLIENT QNAME QTYPE QCLASS: RCODE/ANSWERS/SIZE".
    - rbldnsd is single-threaded: once it has answered a question, every
      earlier question is in the log. query_count() sends a version.bind
      question first for that reason, and leaves version.bind out of counts.
    - ip6trie wants ::ffff:7f00:2, not ::ffff:127.0.0.2; ip4set refuses
      0.0.0.0/0 (use ip4trie to list the world).
    - A zone made of an IPv4 and an ip6trie dataset answers a v4-mapped
      nibble name (the IPv6 test point ::ffff:7f00:2) from the IPv4 dataset:
      the ip6trie entry is only seen in a zone with no IPv4 dataset.
    - Without -q, zones load before the socket answers: answering = ready.
      SIGHUP reloads changed files (by mtime, in whole seconds) and prints
      "zones reloaded" again.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import dns.exception
import dns.message
import dns.query
import dns.rdataclass

RBLDNSD = shutil.which("rbldnsd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
RBLDNSD_USER = "rbldns"
SYNC_NAME = "version.bind"
KEEP_DIRECTORY_ENV = "RELAYMILTER_KEEP_RBLDNSD"  # =1 keeps instance directories for debugging


@dataclass(frozen=True)
class RbldnsdZone:
    """One dataset of one zone: rbldnsd's "zone:dataset:file" and the file's lines."""

    name: str
    dataset: str                    # ip4set, ip4trie, ip6trie, ...
    lines: Sequence[str] = field(default_factory=tuple)


class RbldnsdError(RuntimeError):
    """rbldnsd would not start or stop; the message holds its output."""


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Rbldnsd:
    """A private rbldnsd; see the module docstring."""

    def __init__(self, zones: Iterable[RbldnsdZone], ttl: int = 2) -> None:
        self.zones = list(zones)
        self.ttl = ttl
        self.port = 0
        self.directory: Path | None = None
        self._process: subprocess.Popen | None = None
        self._reloads_seen = 0

    # -- paths and addresses ------------------------------------------------
    @property
    def nameserver(self) -> str:
        """The "ip:port" form DnsResolver takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def query_log(self) -> Path:
        return self._dir / "queries.log"

    @property
    def output(self) -> str:
        try:
            return (self._dir / "output.txt").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def _dir(self) -> Path:
        if self.directory is None:
            raise RbldnsdError("rbldnsd not started")
        return self.directory

    # -- life cycle -----------------------------------------------------------
    def start(self, timeout: float = 10.0, attempts: int = 3) -> None:
        """Write the zones, start rbldnsd and wait until it answers."""
        if RBLDNSD is None:
            raise RbldnsdError("rbldnsd is not installed (Debian: apt-get install rbldnsd)")
        if self.directory is not None:
            raise RbldnsdError("rbldnsd already started")
        self.directory = Path(tempfile.mkdtemp(prefix="relaymilter-rbldnsd-"))
        self.directory.chmod(0o755)    # rbldnsd reads it as the rbldns user
        try:
            specs = self._write_zones()
            for attempt in range(attempts):
                self.port = free_udp_port()
                if self._run(specs, timeout):
                    return
            raise RbldnsdError(f"rbldnsd could not bind a port in {attempts} attempts:\n"
                               f"{self.output}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after timeout; reap; remove the directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self.directory is not None and not os.environ.get(KEEP_DIRECTORY_ENV):
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Rbldnsd":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_zones(self) -> list[str]:
        specs = []
        for index, zone in enumerate(self.zones):
            path = self._dir / f"{index}-{zone.name}.{zone.dataset}"
            self._write_data(path, zone)
            specs.append(f"{zone.name}:{zone.dataset}:{path.name}")
        log = self.query_log
        log.touch()
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RBLDNSD_USER)
            os.chown(log, entry.pw_uid, entry.pw_gid)
        return specs

    def _write_data(self, path: Path, zone: RbldnsdZone) -> None:
        soa = (f"$SOA {self.ttl} ns.{zone.name} hostmaster.{zone.name} 1 600 300 86400 "
               f"{self.ttl}")
        path.write_text("\n".join([soa, *zone.lines]) + "\n", encoding="ascii")
        path.chmod(0o644)

    def _run(self, specs: list[str], timeout: float) -> bool:
        """Start once; True when it answers, False when the port was taken."""
        command = [RBLDNSD, "-n"]
        if os.geteuid() == 0:
            command += ["-u", RBLDNSD_USER]
        command += ["-b", f"127.0.0.1/{self.port}", "-w", str(self._dir), "-t", str(self.ttl),
                    "-p", str(self._dir / "rbldnsd.pid"), "-l", f"+{self.query_log}", *specs]
        with open(self._dir / "output.txt", "wb") as output:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if "bind" in self.output.lower() or "address already in use" in self.output.lower():
                    return False
                raise RbldnsdError(f"rbldnsd exited with {self._process.returncode}: "
                                   f"{' '.join(command)}\n{self.output}")
            if self._answers(timeout=0.05):
                self._reloads_seen = self.output.count("zones reloaded")
                return True
            time.sleep(0.01)
        raise RbldnsdError(f"rbldnsd did not answer within {timeout}s:\n{self.output}")

    def _answers(self, timeout: float = 0.2) -> bool:
        query = dns.message.make_query(SYNC_NAME, "TXT", rdclass=dns.rdataclass.CH)
        try:
            dns.query.udp(query, "127.0.0.1", port=self.port, timeout=timeout)
        except (dns.exception.Timeout, OSError):
            return False
        return True

    # -- data -------------------------------------------------------------------
    def rewrite(self, name: str, dataset: str, lines: Sequence[str], timeout: float = 5.0) -> None:
        """Replace one dataset's lines and make rbldnsd reload them."""
        index = next(i for i, zone in enumerate(self.zones)
                     if (zone.name, zone.dataset) == (name, dataset))
        self.zones[index] = RbldnsdZone(name, dataset, tuple(lines))
        path = self._dir / f"{index}-{name}.{dataset}"
        self._write_data(path, self.zones[index])
        # rbldnsd compares mtimes in whole seconds: make the change visible.
        stamp = time.time() + 2 + self._reloads_seen
        os.utime(path, (stamp, stamp))
        os.kill(self._process.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.output.count("zones reloaded") <= self._reloads_seen:
            if time.monotonic() > deadline:
                raise RbldnsdError(f"rbldnsd did not reload {path.name}:\n{self.output}")
            time.sleep(0.01)
        self._reloads_seen = self.output.count("zones reloaded")

    # -- the query log -------------------------------------------------------------
    def queries(self) -> list[tuple[str, str]]:
        """(qname, qtype) of every question so far, oldest first."""
        if not self._answers(timeout=2.0):     # see the module docstring
            raise RbldnsdError(f"rbldnsd stopped answering:\n{self.output}")
        found = []
        for line in self.query_log.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[2].lower() != SYNC_NAME:
                found.append((fields[2].lower(), fields[3]))
        return found

    def query_count(self, name: str | None = None, qtype: str | None = None,
                    zone: str | None = None) -> int:
        """Questions so far, optionally for one name, one type, or one zone."""
        suffix = f".{zone.lower()}" if zone else None
        return sum(1 for qname, rdtype in self.queries()
                   if (name is None or qname == name.lower().rstrip("."))
                   and (qtype is None or rdtype == qtype)
                   and (suffix is None or qname.endswith(suffix)))
