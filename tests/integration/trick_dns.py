"""trick_dns - a DNS server on loopback that misbehaves on purpose.

NAME
    trick_dns - a UDP and TCP DNS server for tests of a DNS client's defences

SYNOPSIS
    with TrickDnsServer(address=None, spoof=["wrong-id", "wrong-source"]) as server:
        client = SomeDnsClient([server.nameserver])      # "127.0.0.1:PORT"
        ...
        server.questions          # [(transport, qname, qtype, source_address, source_port), ...]
        server.question_count(qname="2.0.0.127.zen.example", transport="tcp")

    with TrickDnsServer(truncate=True, txt_size=2000) as server:
        ...                       # UDP answers carry TC and no records, TCP the full answer
        server.truncate = False   # every behaviour can be changed while the server runs

    port = free_port_pair("127.0.0.1")   # free for both UDP and TCP

DESCRIPTION
    Listens on `listen` (a 127.0.0.0/8 address, default 127.0.0.1) at one
    port, free for both UDP and TCP, in daemon threads. TCP uses the 2-byte
    length framing of RFC 1035 4.2.2; one connection may carry several
    questions, pipelined or not, and each connection has its own thread.
    Every question that parses is recorded, whatever the server then does
    with it, as (transport, qname, qtype, source_address, source_port) with
    transport "udp" or "tcp", qname lowercase without the trailing dot and
    qtype as text ("A", "TXT").

  Answers
    A questions get `address` (an A record with `ttl`), or NXDOMAIN with a
    SOA in the authority section (SOA TTL `ttl`, SOA MINIMUM `negative_ttl`,
    which defaults to ttl) when address is None. TXT questions get `txt`
    (split into 255-byte strings, so it may be long), or "x" * txt_size when
    `txt_size` is set and txt is None, or an empty NOERROR answer. Other
    types get an empty NOERROR answer.

    `answers` maps a qname (lowercase, no trailing dot) to an address or to
    None, and overrides `address` for that name: a name mapped to an address
    gets it for A and `txt` for TXT; a name mapped to None does not exist,
    and gets NXDOMAIN whatever the type. One server can so serve a listed and
    an unlisted name side by side.

    `rcode` (a name such as "SERVFAIL", or a number) other than NOERROR
    answers every question with that rcode and nothing else.

    A UDP answer that does not fit the querier's payload size (512, or its
    EDNS payload) is truncated, as a real server does: TC set, question
    kept, no records. TCP answers are never truncated.

  Behaviours (constructor keywords, all combinable, all settable later)
    truncate=True
        Every UDP answer is truncated, whatever its size; the same question
        over TCP gets the full answer.
    silent=True
        Questions are received and recorded but never answered: a dead name
        server whose port is still open. silent_udp=True does that for UDP
        only, and TCP still answers.
    delay=SECONDS
        Each answer is sent that long after its question arrived. Questions
        are delayed side by side: four that arrive together are answered
        together, one delay later.
    late=SECONDS
        Added to delay, by the same mechanism. Use it to name the intent "the
        answer arrives after the client's deadline", where delay means "the
        answer is slow but in time".
    drop_first=N
        The first N UDP questions (counted since start) are recorded and
        ignored: a server, or a network, that loses packets. TCP is not
        affected.
    spoof=[KIND, ...]
        Tricks sent, in the order given, when the answer is due; the genuine
        answer follows `spoof_gap` seconds later (default 0.05), or never
        when withhold_genuine=True. Every trick that carries an answer
        carries a forged "listed" one, A 127.0.0.2 (TXT "spoofed" for a TXT
        question), so that a client fooled by it gives a visibly wrong
        verdict; serve address=None to tell it from the genuine one. KIND:
          wrong-id             query ID xor 0x5a5a (never the query's ID)
          wrong-question       right ID, question and answer owner name with
                               the first label replaced by "spoofed"
          wrong-type           right ID and name, question type swapped
                               (A <-> TXT, anything else -> A), answer
                               records still those forged for the asked type
          wrong-source         right ID and question, sent from another UDP
                               socket: same address, another port
          wrong-source-address right ID and question, sent from another
                               loopback address (127.0.0.3, or 127.0.0.4 when
                               the server listens on 127.0.0.3); see
                               spoof_source_address, None when it could not
                               be bound, and the trick is then skipped
          garbage              random bytes, 0 to 600 of them, from a
                               generator seeded with `seed` (default 0)
          short                the first 11 bytes of the genuine answer, a
                               header cut short
        Tricks go to UDP questions only: an attacker off the path cannot
        write into a TCP stream. spoof_tcp=True sends them, framed, on TCP
        too (wrong-source and wrong-source-address excepted: a TCP peer has
        only one source).

    Attributes of the same names read and change these settings while the
    server runs; each question is handled with the settings of the moment it
    arrived.

    stop() drops the answers still waiting, closes every socket and joins the
    threads. The server is also a context manager.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

SPOOF_KINDS = ("wrong-id", "wrong-question", "wrong-type", "wrong-source",
               "wrong-source-address", "garbage", "short")
LISTED = "127.0.0.2"          # what every forged answer claims
WRONG_ID_MASK = 0x5A5A        # nonzero, so the forged ID always differs
UDP_PAYLOAD = 512             # RFC 1035 limit for a querier without EDNS
SHORT_LENGTH = 11             # one byte short of a DNS header
GARBAGE_MAX = 600


def free_port_pair(address: str = "127.0.0.1") -> int:
    """A port on `address` free for both UDP and TCP at the time of the call."""
    udp, tcp = _bind_pair(address)
    port = udp.getsockname()[1]
    udp.close()
    tcp.close()
    return port


def _bind_pair(address: str, attempts: int = 50) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same free port on address.

    The kernel picks a UDP port; the TCP bind on it may fail (someone has
    it), and then the next UDP port is tried.
    """
    for _ in range(attempts):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((address, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A listener closed by a previous test may leave TIME_WAIT behind.
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((address, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        return udp, tcp
    raise OSError(f"no port free for both UDP and TCP on {address}")


def _check_loopback(address: str) -> str:
    if not ipaddress.IPv4Address(address).is_loopback:
        raise ValueError(f"{address} is not in 127.0.0.0/8: this server stays on loopback")
    return address


def _check_spoof(kinds: Iterable[str] | None) -> tuple[str, ...]:
    kinds = tuple(kinds or ())
    unknown = [kind for kind in kinds if kind not in SPOOF_KINDS]
    if unknown:
        raise ValueError(f"unknown spoof kinds {unknown}; known: {SPOOF_KINDS}")
    return kinds


def _check_rcode(rcode: str | int) -> str | int:
    dns.rcode.from_text(rcode) if isinstance(rcode, str) else dns.rcode.Rcode.make(rcode)
    return rcode


class _Setting:
    """A behaviour attribute, read and written under the server's lock.

    Tests change behaviours while the server threads read them; the lock
    keeps each read whole (a dict or list being replaced, say).
    """

    def __init__(self, check: Callable[[Any], Any] | None = None) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_setting_" + name

    def __get__(self, server: Any, owner: type | None = None) -> Any:
        if server is None:
            return self
        with server._lock:
            return server.__dict__[self.slot]

    def __set__(self, server: Any, value: Any) -> None:
        if self.check is not None:
            value = self.check(value)
        with server._lock:
            server.__dict__[self.slot] = value


@dataclass
class _Plan:
    """What to send for one question: tricks first, then maybe the answer."""

    wait: float
    tricks: list[tuple[str, bytes]]       # (kind, wire)
    genuine: bytes | None
    gap: float


class TrickDnsServer:
    """See the module docstring."""

    address = _Setting()
    answers = _Setting(lambda value: {k.lower().rstrip("."): v for k, v in (value or {}).items()})
    txt = _Setting()
    txt_size = _Setting()
    ttl = _Setting()
    negative_ttl = _Setting()
    rcode = _Setting(_check_rcode)
    truncate = _Setting(bool)
    silent = _Setting(bool)
    silent_udp = _Setting(bool)
    delay = _Setting(float)
    late = _Setting(float)
    drop_first = _Setting(int)
    spoof = _Setting(_check_spoof)
    spoof_gap = _Setting(float)
    withhold_genuine = _Setting(bool)
    spoof_tcp = _Setting(bool)

    def __init__(self, *, listen: str = "127.0.0.1", address: str | None = LISTED,
                 answers: dict[str, str | None] | None = None, txt: str | None = None,
                 txt_size: int | None = None, ttl: int = 60, negative_ttl: int | None = None,
                 rcode: str | int = "NOERROR", truncate: bool = False, silent: bool = False,
                 silent_udp: bool = False, delay: float = 0.0, late: float = 0.0,
                 drop_first: int = 0, spoof: Iterable[str] | None = None,
                 spoof_gap: float = 0.05, withhold_genuine: bool = False,
                 spoof_tcp: bool = False, seed: int | None = 0) -> None:
        self._lock = threading.RLock()
        self.listen = _check_loopback(listen)
        self.port = 0
        self.address, self.answers, self.txt, self.txt_size = address, answers, txt, txt_size
        self.ttl = ttl
        self.negative_ttl = ttl if negative_ttl is None else negative_ttl
        self.rcode, self.truncate, self.silent, self.silent_udp = rcode, truncate, silent, silent_udp
        self.delay, self.late, self.drop_first = delay, late, drop_first
        self.spoof, self.spoof_gap, self.withhold_genuine = spoof, spoof_gap, withhold_genuine
        self.spoof_tcp = spoof_tcp
        self.spoof_source_address: str | None = None
        self._random = random.Random(seed)
        self._questions: list[tuple[str, str, str, str, int]] = []
        self._udp_seen = 0
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._other_port: socket.socket | None = None
        self._other_address: socket.socket | None = None
        self._due: list[tuple[float, int, Callable[[], None]]] = []   # (when, tiebreak, send)
        self._order = itertools.count()
        self._wake_read, self._wake_write = socket.socketpair()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections: list[tuple[socket.socket, threading.Thread]] = []

    # -- life cycle ---------------------------------------------------------

    @property
    def nameserver(self) -> str:
        return f"{self.listen}:{self.port}"

    def start(self) -> None:
        self._udp, self._tcp = _bind_pair(self.listen)
        self.port = self._udp.getsockname()[1]
        self._tcp.listen(16)
        self._other_port = self._bind_udp(self.listen)
        self.spoof_source_address = "127.0.0.4" if self.listen == "127.0.0.3" else "127.0.0.3"
        self._other_address = self._bind_udp(self.spoof_source_address)
        if self._other_address is None:
            self.spoof_source_address = None
        self._thread = threading.Thread(target=self._serve, name="trick-dns", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            connections = list(self._connections)
        for connection, thread in connections:
            thread.join(5)   # each notices _stop within its recv timeout
            connection.close()
        for sock in (self._udp, self._tcp, self._other_port, self._other_address,
                     self._wake_read, self._wake_write):
            if sock is not None:
                sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def _bind_udp(address: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((address, 0))
        except OSError:
            sock.close()
            return None
        return sock

    # -- what was asked -----------------------------------------------------

    @property
    def questions(self) -> list[tuple[str, str, str, str, int]]:
        with self._lock:
            return list(self._questions)

    def question_count(self, qname: str | None = None, qtype: str | None = None,
                       transport: str | None = None) -> int:
        wanted = (transport, qname and qname.lower().rstrip("."), qtype and qtype.upper())
        return sum(1 for question in self.questions
                   if all(want is None or want == got for want, got in zip(wanted, question)))

    def _record(self, transport: str, question: Any, peer: tuple[str, int]) -> int:
        """Record a question; return how many UDP questions came before it."""
        entry = (transport, question.name.to_text(omit_final_dot=True).lower(),
                 dns.rdatatype.to_text(question.rdtype), peer[0], peer[1])
        with self._lock:
            self._questions.append(entry)
            if transport != "udp":
                return 0
            self._udp_seen += 1
            return self._udp_seen - 1

    # -- the event loop: UDP, TCP accepts, and sends falling due ------------

    def _serve(self) -> None:
        readers = [self._udp, self._tcp, self._wake_read]
        while not self._stop.is_set():
            readable, _, _ = select.select(readers, [], [], self._until_next_due())
            if self._udp in readable:
                self._receive_udp()
            if self._tcp in readable:
                self._accept_tcp()
            if self._wake_read in readable:
                self._wake_read.recv(4096)
            self._send_due()

    def _until_next_due(self) -> float:
        with self._lock:
            if not self._due:
                return 1.0   # only to notice _stop; a wake byte normally comes first
            return max(0.0, self._due[0][0] - time.monotonic())

    def _schedule(self, when: float, send: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._due, (when, next(self._order), send))
        self._wake()   # the loop may be sleeping towards a later deadline

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"!")
        except OSError:
            pass   # closed by stop(), or full: the loop is awake anyway

    def _send_due(self) -> None:
        while True:
            with self._lock:
                if not self._due or self._due[0][0] > time.monotonic():
                    return
                _, _, send = heapq.heappop(self._due)
            try:
                send()
            except OSError:
                pass   # the client hung up or its port is gone: its loss

    # -- UDP ----------------------------------------------------------------

    def _receive_udp(self) -> None:
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        arrived = time.monotonic()
        query = self._parse(wire)
        if query is None:
            return
        with self._lock:   # one question, one consistent set of settings
            seen_before = self._record("udp", query.question[0], peer)
            if self.silent or self.silent_udp or seen_before < self.drop_first:
                return
            plan = self._plan(query, "udp")
        self._schedule_plan(arrived, plan, lambda kind, data: self._udp_sender(kind, data, peer))

    def _udp_sender(self, kind: str, wire: bytes, peer: tuple[str, int]) -> Callable[[], None] | None:
        sock = {"wrong-source": self._other_port,
                "wrong-source-address": self._other_address}.get(kind, self._udp)
        if sock is None:
            return None   # 127.0.0.3 could not be bound: skip the trick
        return lambda: sock.sendto(wire, peer)

    # -- TCP ----------------------------------------------------------------

    def _accept_tcp(self) -> None:
        try:
            connection, peer = self._tcp.accept()
        except OSError:
            return
        connection.settimeout(0.1)   # so the thread notices stop()
        thread = threading.Thread(target=self._serve_tcp, args=(connection, peer),
                                  name="trick-dns-tcp", daemon=True)
        with self._lock:
            self._connections.append((connection, thread))
        thread.start()

    def _serve_tcp(self, connection: socket.socket, peer: tuple[str, int]) -> None:
        while not self._stop.is_set():
            prefix = self._recv_exactly(connection, 2)
            wire = prefix and self._recv_exactly(connection, struct.unpack("!H", prefix)[0])
            if not wire:
                return   # the client closed, or stop()
            arrived = time.monotonic()
            query = self._parse(wire)
            if query is None:
                continue
            with self._lock:   # one question, one consistent set of settings
                self._record("tcp", query.question[0], peer)
                if self.silent:
                    continue
                plan = self._plan(query, "tcp")
            self._schedule_plan(arrived, plan, lambda kind, data: self._tcp_sender(kind, data, connection))

    def _recv_exactly(self, connection: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = connection.recv(size - len(data))
            except TimeoutError:
                if self._stop.is_set():
                    return None
                continue
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    @staticmethod
    def _tcp_sender(kind: str, wire: bytes, connection: socket.socket) -> Callable[[], None] | None:
        if kind in ("wrong-source", "wrong-source-address"):
            return None   # a TCP stream has one source; nothing to forge
        return lambda: connection.sendall(struct.pack("!H", len(wire)) + wire)

    # -- deciding what to send ----------------------------------------------

    @staticmethod
    def _parse(wire: bytes) -> dns.message.Message | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None   # not a question: nothing to record or answer
        return query if query.question else None

    def _plan(self, query: dns.message.Message, transport: str) -> _Plan:
        genuine = self._genuine(query, transport)
        tricks = []
        if transport == "udp" or self.spoof_tcp:
            tricks = [(kind, self._trick(kind, query, genuine)) for kind in self.spoof]
        withheld = tricks and self.withhold_genuine
        return _Plan(wait=self.delay + self.late, tricks=tricks,
                     genuine=None if withheld else genuine,
                     gap=self.spoof_gap if tricks else 0.0)

    def _schedule_plan(self, arrived: float, plan: _Plan,
                       sender: Callable[[str, bytes], Callable[[], None] | None]) -> None:
        due = arrived + plan.wait
        for kind, wire in plan.tricks:
            send = sender(kind, wire)
            if send is not None:
                self._schedule(due, send)   # same time: the tiebreak keeps their order
        if plan.genuine is not None:
            self._schedule(due + plan.gap, sender("genuine", plan.genuine))

    # -- the genuine answer -------------------------------------------------

    def _genuine(self, query: dns.message.Message, transport: str) -> bytes:
        response = dns.message.make_response(query)
        rcode = self.rcode
        rcode = dns.rcode.from_text(rcode) if isinstance(rcode, str) else dns.rcode.Rcode.make(rcode)
        if rcode != dns.rcode.NOERROR:
            response.set_rcode(rcode)
        else:
            self._fill(response, query.question[0])
        wire = response.to_wire()
        if transport == "udp" and (self.truncate or len(wire) > self._payload(query)):
            wire = self._truncated(response)
        return wire

    def _fill(self, response: dns.message.Message, question: Any) -> None:
        qname = question.name.to_text(omit_final_dot=True).lower()
        answers = self.answers
        address = answers.get(qname, self.address)
        exists = address is not None or qname not in answers
        if not exists or (question.rdtype == dns.rdatatype.A and address is None):
            self._nxdomain(response, question.name)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN", "A", address))
        elif question.rdtype == dns.rdatatype.TXT:
            text = self.txt if self.txt is not None else (
                "x" * self.txt_size if self.txt_size else None)
            if text is not None:
                response.answer.append(self._txt_rrset(question.name, text))

    def _nxdomain(self, response: dns.message.Message, name: dns.name.Name) -> None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        # Resolvers take the negative TTL from the SOA (RFC 2308): give them one.
        zone = name.parent() if len(name) > 1 else name
        response.authority.append(dns.rrset.from_text(
            zone, self.ttl, "IN", "SOA",
            f"ns.{zone} hostmaster.{zone} 1 600 300 86400 {self.negative_ttl}"))

    def _txt_rrset(self, name: dns.name.Name, text: str) -> dns.rrset.RRset:
        data = text.encode()
        # One TXT character-string holds at most 255 bytes (RFC 1035 3.3).
        strings = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
        return dns.rrset.from_rdata(name, self.ttl, rdata)

    @staticmethod
    def _payload(query: dns.message.Message) -> int:
        return max(UDP_PAYLOAD, query.payload) if query.edns >= 0 else UDP_PAYLOAD

    @staticmethod
    def _truncated(response: dns.message.Message) -> bytes:
        """The response as a server sends one that does not fit: TC, question only."""
        response.answer, response.authority, response.additional = [], [], []
        response.flags |= dns.flags.TC
        return response.to_wire()

    # -- the tricks ---------------------------------------------------------

    def _trick(self, kind: str, query: dns.message.Message, genuine: bytes) -> bytes:
        question = query.question[0]
        if kind == "garbage":
            with self._lock:   # the UDP loop and TCP threads share the generator
                return self._random.randbytes(self._random.randint(0, GARBAGE_MAX))
        if kind == "short":
            return genuine[:SHORT_LENGTH]
        if kind == "wrong-id":
            return self._forged(query, question.name, question.rdtype, query.id ^ WRONG_ID_MASK)
        if kind == "wrong-question":
            return self._forged(query, self._spoofed_name(question.name), question.rdtype, query.id)
        if kind == "wrong-type":
            other = dns.rdatatype.TXT if question.rdtype == dns.rdatatype.A else dns.rdatatype.A
            return self._forged(query, question.name, question.rdtype, query.id, asked_type=other)
        return self._forged(query, question.name, question.rdtype, query.id)   # wrong-source*

    @staticmethod
    def _spoofed_name(name: dns.name.Name) -> dns.name.Name:
        if len(name.labels) <= 1:
            return dns.name.from_text("spoofed.")
        return dns.name.Name((b"spoofed",) + name.labels[1:])

    def _forged(self, query: dns.message.Message, name: dns.name.Name, rdtype: int,
                query_id: int, asked_type: int | None = None) -> bytes:
        """A "listed" answer for name/rdtype, under a question for name/asked_type."""
        fake_query = dns.message.make_query(
            name, rdtype if asked_type is None else asked_type,
            use_edns=query.edns if query.edns >= 0 else False, payload=query.payload or None,
            id=query_id, flags=query.flags)
        response = dns.message.make_response(fake_query)
        if rdtype == dns.rdatatype.TXT:
            response.answer.append(self._txt_rrset(name, "spoofed"))
        else:
            response.answer.append(dns.rrset.from_text(name, self.ttl, "IN", "A", LISTED))
        return response.to_wire()
