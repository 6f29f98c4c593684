"""dnsclient - the stub resolver: every DNS query of the process on one event loop.

NAME
    dnsclient - DnsResolver: non-blocking queries to the configured name servers

SYNOPSIS
    resolver = DnsResolver(["127.0.0.1:5353"], timeout=2.0)   # [] = /etc/resolv.conf
    future = resolver.submit("2.0.0.127.zen.example", "A")    # from any thread
    answer = future.result()        # DnsAnswer, or raises DnsTimeout / DnsFailure
    answer = resolver.query(name, "TXT")                       # the same, blocking
    resolver.close()

DESCRIPTION
    A query is a message on the process's I/O loop (ioloop.py), not a
    thread: submit() hands it over and returns a promise.Promise at once, so a client's zones are all asked at the same moment and a
    thousand new clients cost no thousand threads. The wire format is
    dnswire.py's; everything below is owned by the loop thread.

    Name servers. The configured ones, or those of /etc/resolv.conf (read
    with dnspython). A query goes to the first server that is not suspect;
    each try waits timeout / max(2, servers) seconds, then the query goes
    to the next server with a new ID, until its lifetime (timeout) is
    over: DnsTimeout. An answer to any of its tries ends it. A server that
    misses SUSPECT_AFTER tries in a row is asked last for SUSPECT_SECONDS,
    so a dead first server costs one try's wait for a few queries, not for
    every one. SERVFAIL or REFUSED moves the query to a server it has not
    asked yet; when none is left, DnsFailure.

    Spoofing. Each query gets a random 16-bit ID from os.urandom, drawn
    ID_BATCH at a time (one system call per batch, not per query). Each server
    has a pool of POOL_SIZE UDP sockets, each connect()ed to the server,
    so that the kernel delivers only the server's packets, and each on an
    ephemeral port of the kernel's random choosing; a query takes a random
    socket of the pool. A socket is replaced after SOCKET_QUERIES queries
    or SOCKET_SECONDS (closed once its last query has ended), so source
    ports keep changing. An answer is taken only if dnswire matches it to
    the query (ID, name, type, class); anything else is dropped and
    counted (stray_answers), and the query waits on for the genuine one.

    Truncation. An answer with TC set is asked again over TCP, of the same
    server, within what is left of the lifetime; a TCP failure moves the
    query on to the next server.

    Late answers. A query ends at its lifetime; an answer after that finds
    no query and is dropped. The callers' own deadline (the checker's) is
    the same lifetime, counted from the same moment.
"""

from __future__ import annotations

import array
import asyncio
import functools
import logging
import os
import random
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dns.resolver

from relaymilter import dnswire, ioloop
from relaymilter.endpoint import DNS_PORT, split_host_port
from relaymilter.promise import Promise

log = logging.getLogger(__name__)

POOL_SIZE = 4               # UDP sockets per name server
SOCKET_QUERIES = 5000       # queries a socket carries before it is replaced
SOCKET_SECONDS = 60.0       # ... or seconds
SUSPECT_AFTER = 3           # tries in a row without an answer
SUSPECT_SECONDS = 30.0
ID_BATCH = 1024
RECEIVE_SIZE = 4096         # we send no EDNS: a UDP answer has at most 512 octets


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


def system_nameservers() -> list[tuple[str, int]]:
    """The name servers of /etc/resolv.conf; raises when there are none."""
    servers = dns.resolver.Resolver().nameservers     # dnspython reads resolv.conf
    if not servers:
        raise DnsFailure("no nameserver in /etc/resolv.conf")
    return [(str(getattr(server, "address", server)), int(getattr(server, "port", DNS_PORT)))
            for server in servers]


class DnsResolver:
    """See the module docstring. submit() and query() are thread-safe."""

    def __init__(self, nameservers: Sequence[str] = (), timeout: float = 2.0,
                 loop: ioloop.IoLoop | None = None) -> None:
        addresses = [split_host_port(text, default_port=DNS_PORT) for text in nameservers] \
            or system_nameservers()
        self.timeout = timeout
        self._io = loop or ioloop.shared()
        self._servers = [_Server(host, port) for host, port in addresses]
        self._try_timeout = timeout / max(2, len(self._servers))
        self._pending: dict[tuple[_Channel, int], _Query] = {}
        self._closed = False
        self._ids = iter(())         # random query IDs, drawn ID_BATCH at a time
        self.stray_answers = 0      # packets that answered no query of ours

    # -- any thread ----------------------------------------------------------
    def submit(self, name: str, rdtype: str, lifetime: float | None = None,
               convert: Callable[[DnsAnswer], Any] | None = None) -> Promise:
        """Ask now; the future gets convert(answer) (the answer without it).

        Raises RuntimeError once closed, ValueError for a name DNS cannot
        carry.
        """
        if self._closed:
            raise RuntimeError("the resolver is closed")
        future = Promise()
        asked = dnswire.question(name, dnswire.TYPE_NAMES[rdtype])
        lifetime = self.timeout if lifetime is None else lifetime
        self._io.call(self._start, _Query(asked, future, convert, time.monotonic() + lifetime))
        return future

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> DnsAnswer:
        """submit() and wait; never on the loop thread (it would wait for itself)."""
        if self._io.on_loop:
            raise RuntimeError("a blocking query on the I/O loop")
        return self.submit(name, rdtype, lifetime).result()

    def close(self) -> None:
        """No new queries; those in flight end as usual, then the sockets close."""
        self._closed = True
        self._io.call(self._retire_all)

    # -- the loop thread -----------------------------------------------------
    def _start(self, query: "_Query") -> None:
        now = time.monotonic()
        first = 0
        for index, server in enumerate(self._servers):
            if server.suspect_until <= now:
                first = index
                break
        query.server = first
        self._send(query, now)

    def _send(self, query: "_Query", now: float) -> None:
        remaining = query.deadline - now
        if remaining <= 0:
            self._finish(query, error=DnsTimeout("no answer within the lifetime"))
            return
        server = self._servers[query.server]
        channel = server.channel(self, now)
        query_id = self._random_id()
        while (channel, query_id) in self._pending:
            query_id = self._random_id()
        key = (channel, query_id)
        self._pending[key] = query
        query.keys.append(key)
        query.tries += 1
        channel.in_flight += 1
        channel.sent += 1
        try:
            channel.sock.send(dnswire.query(query_id, query.asked))
        except OSError:
            pass        # as good as lost: the try's timer moves the query on
        self._io.at(now + min(remaining, self._try_timeout),
                    functools.partial(self._try_expired, query, query.tries))

    def _random_id(self) -> int:
        """A query ID from os.urandom; the loop thread's."""
        try:
            return next(self._ids)
        except StopIteration:
            self._ids = iter(array.array("H", os.urandom(2 * ID_BATCH)))
            return next(self._ids)

    def _try_expired(self, query: "_Query", tries: int) -> None:
        if query.done or query.tries != tries:     # answered, or moved on since
            return
        self._servers[query.server].missed(time.monotonic())
        self._next_server(query)

    def _next_server(self, query: "_Query") -> None:
        query.server = (query.server + 1) % len(self._servers)
        self._send(query, time.monotonic())

    def _readable(self, channel: "_Channel") -> None:
        while True:
            try:
                packet = channel.sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError:         # ICMP unreachable and the like: the tries time out
                return
            if len(packet) < 2:
                self.stray_answers += 1
                continue
            query_id = (packet[0] << 8) | packet[1]
            query = self._pending.get((channel, query_id))
            if query is None:
                self.stray_answers += 1
                continue
            self._answered(query, packet, query_id, channel)

    def _answered(self, query: "_Query", packet: bytes, query_id: int,
                  channel: "_Channel | None") -> None:
        try:
            answer = dnswire.read_answer(packet, query_id, query.asked)
        except dnswire.MalformedAnswer:
            answer = None
        if answer is None:
            self.stray_answers += 1
            return
        server = self._servers[query.server]
        server.answered()
        if answer.truncated and channel is not None:
            query.tries += 1            # the try's timer no longer applies
            self._io.loop.create_task(self._over_tcp(query, server))
            return
        if answer.rcode in (dnswire.NOERROR, dnswire.NXDOMAIN) and not answer.truncated:
            self._finish(query, DnsAnswer(answer.records, answer.ttl,
                                          answer.rcode == dnswire.NXDOMAIN))
            return
        query.failures += 1
        if query.failures < len(self._servers):
            self._next_server(query)
        else:
            self._finish(query, error=DnsFailure(
                "no nameserver answered (SERVFAIL, REFUSED or unreachable)"))

    async def _over_tcp(self, query: "_Query", server: "_Server") -> None:
        query_id = self._random_id()
        remaining = query.deadline - time.monotonic()
        writer = None
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            async with asyncio.timeout(remaining):
                reader, writer = await asyncio.open_connection(server.host, server.port)
                packet = dnswire.query(query_id, query.asked)
                writer.write(struct.pack("!H", len(packet)) + packet)
                length = struct.unpack("!H", await reader.readexactly(2))[0]
                reply = await reader.readexactly(length)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            if not query.done:
                self._next_server(query)
            return
        finally:
            if writer is not None:
                writer.close()
        if not query.done:
            self._answered(query, reply, query_id, None)
            if not query.done:      # not the answer to our question: try elsewhere
                self._next_server(query)

    def _finish(self, query: "_Query", answer: DnsAnswer | None = None,
                error: DnsError | None = None) -> None:
        if query.done:
            return
        query.done = True
        for key in query.keys:
            if self._pending.pop(key, None) is not None:
                channel = key[0]
                channel.in_flight -= 1
                if channel.retired and channel.in_flight == 0:
                    channel.close(self._io.loop)
        future, convert = query.future, query.convert
        # The try's timer holds the query until it is due: let go of the rest.
        query.future = query.convert = None
        query.keys.clear()
        if error is not None:
            future.set_exception(error)
            return
        try:
            future.set_result(answer if convert is None else convert(answer))
        except Exception as failure:       # a convert() bug: the caller sees it
            future.set_exception(failure)

    def _retire_all(self) -> None:
        for server in self._servers:
            for channel in server.pool:
                channel.retire(self._io.loop)
            server.pool = []


class _Query:
    """One question in flight, with every try it has made."""

    __slots__ = ("asked", "future", "convert", "deadline", "server", "keys", "tries",
                 "failures", "done")

    def __init__(self, asked: bytes, future: Promise,
                 convert: Callable[[DnsAnswer], Any] | None, deadline: float) -> None:
        self.asked, self.future, self.convert, self.deadline = asked, future, convert, deadline
        self.server = 0
        self.keys: list[tuple[_Channel, int]] = []
        self.tries = self.failures = 0
        self.done = False


class _Server:
    """A name server: its socket pool and whether it has been answering."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.pool: list[_Channel] = []
        self.missed_in_a_row = 0
        self.suspect_until = 0.0

    def channel(self, resolver: DnsResolver, now: float) -> "_Channel":
        """A random socket of the pool, replacing a worn one first."""
        if len(self.pool) < POOL_SIZE:
            self.pool.append(_Channel(self, resolver, now))
            return self.pool[-1]
        index = random.randrange(POOL_SIZE)
        channel = self.pool[index]
        if channel.sent >= SOCKET_QUERIES or now - channel.born >= SOCKET_SECONDS:
            channel.retire(resolver._io.loop)
            channel = self.pool[index] = _Channel(self, resolver, now)
        return channel

    def missed(self, now: float) -> None:
        self.missed_in_a_row += 1
        if self.missed_in_a_row >= SUSPECT_AFTER:
            self.suspect_until = now + SUSPECT_SECONDS

    def answered(self) -> None:
        self.missed_in_a_row = 0
        self.suspect_until = 0.0


class _Channel:
    """One connected UDP socket of a server's pool."""

    __slots__ = ("sock", "born", "sent", "in_flight", "retired")

    def __init__(self, server: _Server, resolver: DnsResolver, now: float) -> None:
        self.sock = socket.socket(server.family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect((server.host, server.port))   # the kernel filters other sources
        self.born, self.sent, self.in_flight, self.retired = now, 0, 0, False
        resolver._io.loop.add_reader(self.sock.fileno(), resolver._readable, self)

    def retire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take no new query; close once the last one in flight has ended."""
        self.retired = True
        if self.in_flight == 0:
            self.close(loop)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sock.fileno() >= 0:
            loop.remove_reader(self.sock.fileno())
            self.sock.close()
