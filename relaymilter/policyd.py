"""policyd - the Postfix policy service front end: requests -> facts -> Decision -> action.

NAME
    policyd - Postfix SMTPD access policy delegation server (check_policy_service)

SYNOPSIS
    server = PolicyServer(engine, "unix:/var/spool/postfix/private/relaymilter", 0o660)
    server.serve_forever()          # serving on the I/O loop until server.shutdown()

DESCRIPTION
    Postfix's policy protocol: a request is "name=value" lines and an empty
    line; the answer is one "action=..." line and an empty line; the
    connection stays open for the next request. Postfix keeps a few such
    connections and reuses them across SMTP sessions, so a recipient costs
    one round trip on an open connection, where the milter protocol costs a
    new connection and several round trips per session.

    Each request becomes the same frozen facts the milter builds
    (client_address, client_name, helo_name, sasl_username, sender,
    recipient, queue_id) and goes to the same engine.Engine, which applies
    dry run, holds, the log line and metrics ([decisions] settings govern
    both front ends). Only requests with protocol_state RCPT are decided;
    others answer DUNNO. The Decision becomes:
      permit to relay        action=OK (trusted network, SMTP AUTH, relay
                             client: Postfix's reject_unauth_destination
                             after us must not undo it)
      other permit           action=DUNNO (the next restriction decides)
      reject                 action=554 5.7.1 text   (Postfix's own reply text)
      defer (limit, fault)   action=450 4.7.1 text / action=451 4.3.0 text
    A DNSBL lookup is started at the first request of a message and reused
    for its further recipients; it is bounded by [dnsbl] timeout, so
    Postfix's policy_time_limit never fires for it.

    There is no MTA resolution to cross-check ({rcpt_addr}): Postfix hands
    the recipient as it parsed it, source routes already removed (a route
    to a local mailbox is then simply local mail).

    Lines may end in LF, as Postfix writes them, or CRLF (a hand-written
    client, a test over telnet); the empty line ends a request either way.

    Bad input: a line without "=", a line over MAX_LINE bytes, a request
    over MAX_ATTRIBUTES lines or MAX_REQUEST bytes (its empty line
    included) is answered "action=DEFER_IF_PERMIT Malformed policy
    request", logged, and the connection is closed (the stream can no
    longer be trusted). Bytes that are not UTF-8 are kept as surrogate
    escapes and refused by the address parser (501 5.1.3). An exception
    while deciding is logged with its traceback and answered per
    [decisions] on_error.

    Connections: all of them are served by the process's I/O loop
    (ioloop.py), the loop the DNS queries run on, not by a thread each: a
    request is read, decided and answered in one callback, and a request
    whose DNSBL verdict is not in yet waits on the loop (when_ready) while
    other connections are served; requests on one connection are answered
    in order. A client that sends requests without reading the answers is
    no longer read once its answers back up (asyncio's write buffer limit). Postfix opens one connection per smtpd process that needs
    the service, in bursts; the listen backlog is the system's largest
    (SOMAXCONN), so a burst of connects all succeed. A connection silent
    for [policyd] idle_timeout seconds is closed (Postfix reconnects when
    it needs us again). At most [policyd] max_connections are served at
    once; further connections are not refused: they are accepted but not
    read, unanswered, until a served one closes (a warning, at most once a
    minute, says the limit was reached). Postfix waits for them up to
    smtpd_policy_service_timeout (100 s), then answers its
    smtpd_policy_service_default_action.

    The socket: claim_socket() (socketclaim.py) first, so a second
    instance never takes a live one's unix socket, and a TCP address in
    use is a clear error (OSError, exit 69), not a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping

from relaymilter import ioloop
from relaymilter.address import ATEXT, IPAddress, parse_ip
from relaymilter.decision import Action, ClientFacts, Decision, RecipientFacts
from relaymilter.endpoint import parse_socket
from relaymilter.engine import Engine
from relaymilter.socketclaim import claim_socket


log = logging.getLogger(__name__)

MAX_LINE = 8192             # bytes, newline included
MAX_ATTRIBUTES = 256        # lines in one request
MAX_REQUEST = MAX_ATTRIBUTES * 256  # bytes: far above what Postfix sends (about 1 KB)
MALFORMED = "DEFER_IF_PERMIT Malformed policy request"
# The empty line that ends a request: the end of the last line, then an
# empty one; LF or CRLF.
_END_OF_REQUEST = re.compile(rb"\n\r?\n")
LIMIT_WARNING_INTERVAL = 60.0   # seconds between two "max_connections reached" warnings
BACKLOG = socket.SOMAXCONN      # smtpd processes connect in bursts
DRAIN_SECONDS = 1.0


class MalformedRequest(Exception):
    """The request breaks the protocol; the text says how."""


class RequestSplitter:
    """Cuts the bytes of a connection into requests: blocks of lines ended by an empty line.

    feed() what arrives, then next() until it returns None. The whole
    buffer is searched for the empty line instead of reading line by line:
    a request is some 25 lines, and a Python loop per line would cost more
    than the decision.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk

    def next(self) -> "Request | None":
        """The next complete request's attributes; None until one is complete.

        Raises MalformedRequest. Values are decoded as UTF-8 with surrogate
        escapes, so no byte is lost and none crashes a decoder.
        """
        self._buffer = self._buffer.lstrip(b"\r\n")      # stray empty lines between requests
        end = _END_OF_REQUEST.search(self._buffer)
        if end is not None:
            if end.end() > MAX_REQUEST:
                raise MalformedRequest(f"a request longer than {MAX_REQUEST} bytes")
            block, self._buffer = self._buffer[:end.start()], self._buffer[end.end():]
            return parse_request(block.removesuffix(b"\r"))
        if len(self._buffer) >= MAX_REQUEST:        # no room left for the empty line
            raise MalformedRequest(f"a request longer than {MAX_REQUEST} bytes")
        return None


# A request's lines, each "name=value" with a name: one pass in C. A
# mismatch backtracks over each line once at most (about 3 ms for the
# largest request). Possessive quantifiers would say so outright, but
# Debian's Python 3.11.2 matches nothing with them here.
_WELL_FORMED = re.compile(r"[^=\n]+=[^\n]*(?:\n[^=\n]+=[^\n]*)*")


def parse_request(block: bytes) -> "Request":
    """The lines of one request (without the empty line) -> its attributes."""
    text = block.decode("utf-8", "surrogateescape")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if text.count("\n") >= MAX_ATTRIBUTES:
        raise MalformedRequest(f"more than {MAX_ATTRIBUTES} attributes")
    if len(text) > MAX_LINE and len(max(text.split("\n"), key=len)) > MAX_LINE:
        raise MalformedRequest(f"a line longer than {MAX_LINE} bytes")
    if _WELL_FORMED.fullmatch(text) is None:
        line = next(line for line in text.split("\n")
                    if not line.partition("=")[0] or "=" not in line)
        raise MalformedRequest(f"a line that is not name=value: {line[:60]!r}")
    return Request(text)


class Request(Mapping[str, str]):
    """A well-formed request's attributes, each found when it is asked for.

    A request is some 30 lines, of which the decision reads ten: finding
    "\nname=" in the text costs a fraction of splitting every line into a
    dict. A name given twice (Postfix never does) reads as its first value.
    """

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = f"\n{text}\n"

    def get(self, name: str, default: str | None = None) -> str | None:   # type: ignore[override]
        text = self._text
        start = text.find(f"\n{name}=")
        if start < 0:
            return default
        start += len(name) + 2
        return text[start:text.index("\n", start)]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(line.partition("=")[0]
                                  for line in self._text[1:-1].split("\n")))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Request({dict(self)!r})"


@functools.lru_cache(maxsize=4096)
def _client_address(text: str) -> IPAddress | None:
    """Postfix's client_address -> address; None for "unknown" or nonsense."""
    try:
        return parse_ip(text)
    except ValueError:
        return None                      # never trusted


UNKNOWN_CLIENT = ClientFacts(address=None)


def client_facts(attributes: Mapping[str, str]) -> ClientFacts:
    """The client as Postfix describes it in the request."""
    address = _client_address(attributes.get("client_address", ""))
    name = attributes.get("client_name") or "unknown"
    return ClientFacts(address=address, name=name,
                       helo=attributes.get("helo_name", ""),
                       auth_user=attributes.get("sasl_username") or None)


def action_for(decision: Decision) -> str:
    """The answer line for a decision, without "action=".

    A permit that grants relaying answers OK: Postfix must not refuse it
    afterwards (reject_unauth_destination). Every other permit answers
    DUNNO and leaves the recipient to Postfix's own restrictions.
    """
    if decision.answered is Action.PERMIT:
        return "OK" if decision.grants_relay else "DUNNO"
    return f"{decision.code} {decision.dsn} {decision.text}"


class PolicyConnection(asyncio.Protocol):
    """One Postfix connection, many requests answered in order, on the I/O loop."""

    def __init__(self, server: "PolicyServer") -> None:
        self._server = server
        self._requests = RequestSplitter()
        self.transport: asyncio.Transport | None = None
        self._message: tuple[str | None, IPAddress | None] | None = None  # (instance, client)
        self._listing = None
        self._waiting = False       # a request waits for its DNSBL verdict
        self._ended = False         # the client sent EOF
        self._drain_left = 0        # bytes still read and dropped after a malformed request
        self._last_read = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport      # type: ignore[assignment]
        self._last_read = time.monotonic()
        self._server.opened(self)

    def admitted(self) -> None:
        """Served from now on (the server's max_connections let it in)."""
        self._arm_idle_timer(self._server.idle_timeout)

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        if self._drain_left:
            self._drain_left = max(0, self._drain_left - len(data))
            if not self._drain_left:
                self.transport.close()
            return
        self._requests.feed(data)
        if not self._waiting:
            self._answer_requests()

    def eof_received(self) -> bool:
        self._ended = True
        if not self._waiting and not self._drain_left:
            return False        # asyncio closes the connection
        return True             # the answer still due is written first

    def pause_writing(self) -> None:
        # A client that sends requests but does not read the answers: stop
        # reading its requests until it has read (the transport's buffer is
        # then bounded by its high-water mark, not by what the client sends).
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, error: Exception | None) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._server.closed(self)

    # -- requests ------------------------------------------------------------
    def _answer_requests(self) -> None:
        """Answer every complete request, in order, until one must wait for DNS."""
        while not self._waiting and not self.transport.is_closing():
            try:
                attributes = self._requests.next()
            except MalformedRequest as error:
                log.warning("policy request refused: %s; closing the connection", error)
                self._send(MALFORMED)
                self._drain()
                return
            if attributes is None:
                if self._ended:
                    self.transport.close()
                return
            self._answer(attributes)

    def _answer(self, attributes: Mapping[str, str]) -> None:
        if attributes.get("request") != "smtpd_access_policy" \
                or attributes.get("protocol_state", "").upper() != "RCPT":
            self._send("DUNNO")
            return
        client, sender, recipient, queue_id = UNKNOWN_CLIENT, None, None, None
        try:
            client = client_facts(attributes)
            sender = _path(attributes.get("sender", ""))
            recipient = _path(attributes.get("recipient", ""))
            queue_id = attributes.get("queue_id") or None
            facts = RecipientFacts(client=client, sender=sender, recipient=recipient,
                                   queue_id=queue_id, instance=attributes.get("instance"),
                                   listing=self._pending_listing(attributes, client))
        except Exception:       # the fault is answered with what was read so far
            self._fault(client, sender, recipient, queue_id)
            return
        listing = facts.listing
        if listing is None or listing.ready():
            self._decide(facts)
            return
        self._waiting = True
        listing.when_ready(self._server.io, functools.partial(self._verdict_in, facts))

    def _verdict_in(self, facts: RecipientFacts) -> None:
        self._waiting = False
        if self.transport.is_closing():
            return
        self._decide(facts)
        self._answer_requests()

    def _decide(self, facts: RecipientFacts) -> None:
        try:
            action = _without_recipient(action_for(self._server.engine.answer_recipient(facts)))
        except Exception:
            self._fault(facts.client, facts.sender, facts.recipient, facts.queue_id)
            return
        self._send(action)

    def _fault(self, client: ClientFacts, sender: str | None, recipient: str | None,
               queue_id: str | None) -> None:
        """The edge: one traceback, then [decisions] on_error."""
        log.exception("internal error while deciding a policy request")
        engine = self._server.engine
        engine.internal_error("policyd")
        self._send(action_for(engine.answer_fault(client, sender, recipient, queue_id)))

    def _pending_listing(self, attributes: Mapping[str, str], client: ClientFacts):
        """One DNSBL lookup per message, shared by its recipients."""
        message = (attributes.get("instance"), client.address)
        if message[0] and message == self._message and self._listing is not None:
            return self._listing
        listing = self._server.engine.start_lookups(client)
        if listing is not None:
            self._message, self._listing = message, listing
        return listing

    # -- the connection ------------------------------------------------------
    def _send(self, action: str) -> None:
        self.transport.write(f"action={action}\n\n".encode("utf-8", "surrogateescape"))

    def _drain(self) -> None:
        """Read and drop what the client still sends (bounded: 1 s, 4 MAX_REQUEST)
        before closing: closing with unread input resets the connection, and
        the client could lose the answer just sent."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._drain_left = 4 * MAX_REQUEST
        self._server.io.loop.call_later(DRAIN_SECONDS, self.transport.close)

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_timer = self._server.io.loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        # One timer per connection, moved on only when it fires: reading a
        # request costs a time stamp, not a timer.
        silent = time.monotonic() - self._last_read
        timeout = self._server.idle_timeout
        if self._waiting or silent < timeout:
            self._arm_idle_timer(timeout - silent if not self._waiting else timeout)
            return
        log.debug("closing a policy service connection idle for %s s", timeout)
        self.transport.close()


@functools.lru_cache(maxsize=8192)
def _path(address: str) -> str:
    """Postfix's internal form -> an RFC 5321 path, as the facts carry it.

    Postfix hands addresses with quoting removed: `"john doe"@example.com`
    arrives as `john doe@example.com`. A local part that is not a dot-atom
    is quoted again, so that it parses as the client meant it (and
    `user@remote@local` becomes `"user@remote"@local`, which it was).
    """
    if not address:
        return "<>"
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if local and not _is_dot_atom(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"<{local}{at}{domain}>"


def _is_dot_atom(text: str) -> bool:
    return all(part and all(char in ATEXT or ord(char) > 0x7F for char in part)
               for part in text.split("."))


def _without_recipient(action: str) -> str:
    """Postfix prefixes a policy refusal with "<rcpt>: Recipient address
    rejected: "; "<rcpt>: Relay access denied" would name it twice."""
    code, _, text = action.partition(" ")
    dsn, _, rest = text.partition(" ")
    if rest.startswith("<") and rest.endswith(">: Relay access denied"):
        return f"{code} {dsn} Relay access denied"
    return action


class PolicyServer:
    """The listening socket and its connections, on the I/O loop; see the module docstring."""

    def __init__(self, engine: Engine, where: str, socket_mode: int = 0o660,
                 max_connections: int = 200, idle_timeout: float = 330.0,
                 io: ioloop.IoLoop | None = None,
                 listener: socket.socket | None = None) -> None:
        """listener: a socket open_listener() bound in the supervisor of several
        workers (workers.py), who also removes it at the end; else one of its own."""
        self.engine = engine
        self.where = where
        self.io = io or ioloop.shared()
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self._owns_socket = listener is None
        self._socket = open_listener(where, socket_mode) if listener is None else listener
        self.address = self._socket.getsockname()
        # Owned by the loop thread:
        self._served: set[PolicyConnection] = set()
        self._queued: collections.deque[PolicyConnection] = collections.deque()
        self._warned = -LIMIT_WARNING_INTERVAL
        self._listener: asyncio.AbstractServer | None = None
        self._stopped = threading.Event()
        asyncio.run_coroutine_threadsafe(self._start(), self.io.loop).result()

    def serve_forever(self) -> None:
        """Wait while the I/O loop serves, until shutdown() (from another thread)."""
        self._stopped.wait()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        make = functools.partial(PolicyConnection, self)
        if self._socket.family == socket.AF_UNIX:
            self._listener = await loop.create_unix_server(make, sock=self._socket,
                                                           backlog=BACKLOG)
        else:
            self._listener = await loop.create_server(make, sock=self._socket, backlog=BACKLOG)

    def shutdown(self) -> None:
        """Stop serving and close every connection; safe from a signal handler."""
        closed = threading.Event()

        def close() -> None:
            self._listener.close()
            for connection in [*self._served, *self._queued]:
                connection.transport.close()
            closed.set()

        self.io.call(close)
        if not self.io.on_loop:
            closed.wait(5)
        spec = parse_socket(self.where)
        if spec.kind == "unix" and self._owns_socket:
            try:
                os.unlink(spec.path)
            except OSError:
                pass
        self._stopped.set()

    # -- connections (the loop thread) ---------------------------------------
    def opened(self, connection: PolicyConnection) -> None:
        """A new connection: served, or queued unread beyond max_connections."""
        if len(self._served) < self.max_connections:
            self._served.add(connection)
            connection.admitted()
            return
        connection.transport.pause_reading()
        self._queued.append(connection)
        now = time.monotonic()
        if now - self._warned >= LIMIT_WARNING_INTERVAL:
            self._warned = now
            log.warning("policy service: %d connections open, [policyd] max_connections; "
                        "new connections wait until one closes", self.max_connections)

    def closed(self, connection: PolicyConnection) -> None:
        if connection in self._served:
            self._served.discard(connection)
        else:
            try:
                self._queued.remove(connection)
            except ValueError:
                pass
        while self._queued and len(self._served) < self.max_connections:
            waiting = self._queued.popleft()
            self._served.add(waiting)
            waiting.transport.resume_reading()
            waiting.admitted()


def open_listener(where: str, socket_mode: int) -> socket.socket:
    """A bound socket for "unix:/path" or "inet[6]:PORT@HOST" (the loop listens on it).

    Raises OSError naming the socket: socketclaim.SocketBusy when a live
    process answers there, else the bind's own error.
    """
    spec = parse_socket(where)
    claim_socket(where)         # removes a stale unix socket, refuses a live one
    if spec.kind == "unix":
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        bound = socket.socket(socket.AF_INET6 if spec.kind == "inet6" else socket.AF_INET,
                              socket.SOCK_STREAM)
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        if spec.kind == "unix":
            bound.bind(spec.path)
            os.chmod(spec.path, socket_mode)
        else:
            bound.bind((spec.host, spec.port))
    except OSError as error:
        bound.close()
        raise OSError(f"cannot listen on {where}: {error.strerror or error}") from None
    return bound


def serve(engine: Engine, reload=None, listener: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP calls reload() (runtime.reload_now).

    listener: the supervisor's socket, for a worker (workers.py). Raises
    OSError when the socket cannot be opened.
    """
    import signal

    settings = engine.snapshot.config.policyd
    server = PolicyServer(engine, settings.socket, settings.mode, settings.max_connections,
                          settings.idle_timeout, listener=listener)
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload())
    # cli._serve blocked these while it started threads; this thread takes them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    log.info("policy service listening on %s", settings.socket)
    server.serve_forever()
