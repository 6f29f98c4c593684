"""slow_dns - a tiny DNS server on loopback that answers late, or badly.

NAME
    slow_dns - a UDP DNS server for timeout and parallelism tests

SYNOPSIS
    with SlowDnsServer(delay=1.5, address="127.0.0.2") as server:
        resolver = DnsResolver([server.nameserver], timeout=0.5)   # "127.0.0.1:PORT"
        ...
        server.questions        # [(qname, qtype), ...] received so far

DESCRIPTION
    Listens on 127.0.0.1 at a free UDP port, in one daemon thread. Every
    question is answered `delay` seconds after it arrived, and questions
    are delayed side by side, not one after another: four questions that
    arrive together are answered together, one delay later.

    A queries get `address` (an A record with `ttl`), or NXDOMAIN with a
    SOA (TTL and MINIMUM = ttl) when address is None. TXT queries get `txt`,
    or an empty NOERROR answer. rcode="SERVFAIL" (or any rcode name) answers
    every question with that rcode and nothing else.

    stop() drops the answers still waiting and joins the thread.
"""

from __future__ import annotations

import heapq
import itertools
import select
import socket
import threading
import time

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class SlowDnsServer:
    """See the module docstring."""

    def __init__(self, delay: float = 0.0, address: str | None = "127.0.0.2",
                 txt: str | None = None, ttl: int = 60, rcode: str = "NOERROR") -> None:
        self.delay = delay
        self.address = address
        self.txt = txt
        self.ttl = ttl
        self.rcode = dns.rcode.from_text(rcode)
        self.port = 0
        self.questions: list[tuple[str, str]] = []
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="slow-dns", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> "SlowDnsServer":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def question_count(self) -> int:
        with self._lock:
            return len(self.questions)

    def _serve(self) -> None:
        due: list[tuple[float, int, bytes, tuple]] = []   # (when, tiebreak, wire, peer)
        order = itertools.count()
        while not self._stop.is_set():
            wait = 0.05 if not due else max(0.0, min(0.05, due[0][0] - time.monotonic()))
            readable, _, _ = select.select([self._socket], [], [], wait)
            if readable:
                wire, peer = self._socket.recvfrom(65535)
                reply = self._reply(wire)
                if reply is not None:
                    heapq.heappush(due, (time.monotonic() + self.delay, next(order), reply, peer))
            while due and due[0][0] <= time.monotonic():
                _, _, reply, peer = heapq.heappop(due)
                self._socket.sendto(reply, peer)

    def _reply(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        with self._lock:
            self.questions.append((question.name.to_text(omit_final_dot=True).lower(),
                                   dns.rdatatype.to_text(question.rdtype)))
        response = dns.message.make_response(query)
        if self.rcode != dns.rcode.NOERROR:
            response.set_rcode(self.rcode)
        elif question.rdtype == dns.rdatatype.A:
            if self.address is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                zone = question.name.parent()
                response.authority.append(dns.rrset.from_text(
                    zone, self.ttl, "IN", "SOA",
                    f"ns.{zone} hostmaster.{zone} 1 600 300 86400 {self.ttl}"))
            else:
                response.answer.append(dns.rrset.from_text(
                    question.name, self.ttl, "IN", "A", self.address))
        elif question.rdtype == dns.rdatatype.TXT and self.txt is not None:
            response.answer.append(dns.rrset.from_text(
                question.name, self.ttl, "IN", "TXT", '"' + self.txt.replace('"', '\\"') + '"'))
        return response.to_wire()
