"""policyd - the Postfix policy service front end: requests -> facts -> Decision -> action.

NAME
    policyd - Postfix SMTPD access policy delegation server (check_policy_service)

SYNOPSIS
    server = PolicyServer(engine, "unix:/var/spool/postfix/private/relaymilter", 0o660)
    server.serve_forever()          # until server.shutdown() from another thread

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

    Connections: Postfix opens one per smtpd process that needs the
    service, in bursts; the listen backlog is the system's largest
    (SOMAXCONN), so a burst of connects all succeed. A connection silent
    for [policyd] idle_timeout seconds is closed (Postfix reconnects when
    it needs us again). At most [policyd] max_connections are served at
    once; further connections are not refused: they wait in the listen
    backlog, unanswered, until a served one closes (a warning, at most
    once a minute, says the limit was reached). Postfix waits for them up
    to smtpd_policy_service_timeout (100 s), then answers its
    smtpd_policy_service_default_action.

    The socket: claim_socket() (socketclaim.py) first, so a second
    instance never takes a live one's unix socket, and a TCP address in
    use is a clear error (OSError, exit 69), not a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import socketserver
import threading
import time
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


class MalformedRequest(Exception):
    """The request breaks the protocol; the text says how."""


class RequestReader:
    """Splits a stream into requests: blocks of lines ended by an empty line.

    read_some is a function returning at most n bytes, b"" at end of stream
    (a BufferedReader's read1, a socket's recv). Whole chunks are searched
    for the empty line instead of reading line by line: a request is some
    25 lines, and a Python loop per line would cost more than the decision.
    """

    def __init__(self, read_some) -> None:
        self._read_some = read_some
        self._buffer = b""

    def next(self) -> dict[str, str] | None:
        """The next request's attributes; None at end of stream.

        Raises MalformedRequest. Values are decoded as UTF-8 with surrogate
        escapes, so no byte is lost and none crashes a decoder.
        """
        while True:
            self._buffer = self._buffer.lstrip(b"\r\n")  # stray empty lines between requests
            end = _END_OF_REQUEST.search(self._buffer)
            if end is not None:
                if end.end() > MAX_REQUEST:
                    raise MalformedRequest(f"a request longer than {MAX_REQUEST} bytes")
                block, self._buffer = self._buffer[:end.start()], self._buffer[end.end():]
                return parse_request(block.removesuffix(b"\r"))
            if len(self._buffer) >= MAX_REQUEST:    # no room left for the empty line
                raise MalformedRequest(f"a request longer than {MAX_REQUEST} bytes")
            chunk = self._read_some(65536)
            if not chunk:
                return None     # end of stream, possibly mid-request: nothing to answer
            self._buffer += chunk


def parse_request(block: bytes) -> dict[str, str]:
    """The lines of one request (without the empty line) -> attributes."""
    text = block.decode("utf-8", "surrogateescape")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if len(lines) > MAX_ATTRIBUTES:
        raise MalformedRequest(f"more than {MAX_ATTRIBUTES} attributes")
    if max(map(len, lines)) > MAX_LINE:
        raise MalformedRequest(f"a line longer than {MAX_LINE} bytes")
    pairs = [line.partition("=") for line in lines]
    for line, (name, equals, _) in zip(lines, pairs):
        if not equals or not name:
            raise MalformedRequest(f"a line that is not name=value: {line[:60]!r}")
    return {name: value for name, _, value in pairs}


@functools.lru_cache(maxsize=4096)
def _client_address(text: str) -> IPAddress | None:
    """Postfix's client_address -> address; None for "unknown" or nonsense."""
    try:
        return parse_ip(text)
    except ValueError:
        return None                      # never trusted


UNKNOWN_CLIENT = ClientFacts(address=None)


def client_facts(attributes: dict[str, str]) -> ClientFacts:
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


class PolicyConnection(socketserver.StreamRequestHandler):
    """One Postfix connection, many requests; runs in a thread of its own."""

    server: "PolicyServer"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout     # StreamRequestHandler applies it
        super().setup()
        self._message: tuple[str | None, IPAddress | None] | None = None  # (instance, client)
        self._listing = None
        self._requests = RequestReader(self.rfile.read1)

    def handle(self) -> None:
        while True:
            try:
                attributes = self._requests.next()
            except MalformedRequest as error:
                log.warning("policy request refused: %s; closing the connection", error)
                if self._send(MALFORMED):
                    self._drain()
                return
            except TimeoutError:
                log.debug("closing a policy service connection idle for %s s",
                          self.server.idle_timeout)
                return
            except OSError:
                return
            if attributes is None:
                return
            if not self._send(self._answer(attributes)):
                return

    def _answer(self, attributes: dict[str, str]) -> str:
        engine = self.server.engine
        if attributes.get("request") != "smtpd_access_policy" \
                or attributes.get("protocol_state", "").upper() != "RCPT":
            return "DUNNO"
        client, sender, recipient, queue_id = UNKNOWN_CLIENT, None, None, None
        try:
            client = client_facts(attributes)
            sender = _path(attributes.get("sender", ""))
            recipient = _path(attributes.get("recipient", ""))
            queue_id = attributes.get("queue_id") or None
            facts = RecipientFacts(client=client, sender=sender, recipient=recipient,
                                   queue_id=queue_id,
                                   listing=self._pending_listing(attributes, client, engine))
            return _without_recipient(action_for(engine.answer_recipient(facts)))
        except Exception:               # the edge: one traceback, then on_error
            log.exception("internal error while deciding a policy request")
            engine.internal_error("policyd")
            return action_for(engine.answer_fault(client, sender, recipient, queue_id))

    def _pending_listing(self, attributes: dict[str, str], client: ClientFacts, engine: Engine):
        """One DNSBL lookup per message, shared by its recipients."""
        message = (attributes.get("instance"), client.address)
        if message[0] and message == self._message and self._listing is not None:
            return self._listing
        listing = engine.start_lookups(client)
        if listing is not None:
            self._message, self._listing = message, listing
        return listing

    def _drain(self) -> None:
        """Read what the client still sends (bounded: 1 s, 4 MAX_REQUEST) before
        closing: closing with unread input resets the connection, and the
        client could lose the answer just sent."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            for _ in range(4 * MAX_REQUEST // 65536):
                if not self.connection.recv(65536):
                    return
        except OSError:
            pass

    def _send(self, action: str) -> bool:
        try:
            self.wfile.write(f"action={action}\n\n".encode("utf-8", "surrogateescape"))
            self.wfile.flush()
        except OSError:
            return False
        return True


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


class _Server(socketserver.ThreadingMixIn):
    daemon_threads = True           # a stuck Postfix connection must not block the exit
    allow_reuse_address = True
    request_queue_size = socket.SOMAXCONN   # smtpd processes connect in bursts
    engine: Engine
    idle_timeout: float
    max_connections: int

    def limit(self, max_connections: int, idle_timeout: float) -> None:
        """Set the limits of the module docstring (before serving)."""
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = False
        self._warned = -LIMIT_WARNING_INTERVAL

    def get_request(self):
        # A connection beyond max_connections is not accepted: it waits in
        # the listen backlog until a slot frees.
        if not self._slots.acquire(blocking=False):
            now = time.monotonic()
            if now - self._warned >= LIMIT_WARNING_INTERVAL:
                self._warned = now
                log.warning("policy service: %d connections open, [policyd] max_connections; "
                            "new connections wait until one closes", self.max_connections)
            while not self._slots.acquire(timeout=0.5):
                if self._stopping:
                    raise OSError("the policy service is stopping")
        try:
            return super().get_request()
        except BaseException:
            self._slots.release()
            raise

    def shutdown_request(self, request) -> None:
        """Called once for every accepted connection, however it ends."""
        try:
            super().shutdown_request(request)
        finally:
            self._slots.release()

    def stop(self) -> None:
        self._stopping = True
        self.shutdown()


class PolicyServer:
    """The listening socket and its threads; see the module docstring."""

    def __init__(self, engine: Engine, where: str, socket_mode: int = 0o660,
                 max_connections: int = 200, idle_timeout: float = 330.0) -> None:
        self.engine = engine
        self.where = where
        self._server = _listen(where, socket_mode)
        self._server.engine = engine
        self._server.limit(max_connections, idle_timeout)

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        """Stop serving (from another thread than serve_forever's) and close."""
        self._server.stop()
        self._server.server_close()
        spec = parse_socket(self.where)
        if spec.kind == "unix":
            try:
                os.unlink(spec.path)
            except OSError:
                pass

    @property
    def address(self):
        return self._server.server_address


def _listen(where: str, socket_mode: int) -> _Server:
    """A bound, listening threaded server for "unix:/path" or "inet[6]:PORT@HOST".

    Raises OSError naming the socket: socketclaim.SocketBusy when a live
    process answers there, else the bind's own error.
    """
    spec = parse_socket(where)
    claim_socket(where)         # removes a stale unix socket, refuses a live one
    try:
        if spec.kind == "unix":
            class UnixServer(_Server, socketserver.UnixStreamServer):
                pass
            server: _Server = UnixServer(spec.path, PolicyConnection)
            os.chmod(spec.path, socket_mode)
            return server
        family = socket.AF_INET6 if spec.kind == "inet6" else socket.AF_INET

        class InetServer(_Server, socketserver.TCPServer):
            address_family = family
        return InetServer((spec.host, spec.port), PolicyConnection)
    except OSError as error:
        raise OSError(f"cannot listen on {where}: {error.strerror or error}") from None


def serve(engine: Engine, reload=None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP calls reload() (runtime.reload_now).

    Raises OSError when the socket cannot be opened.
    """
    import signal

    settings = engine.snapshot.config.policyd
    server = PolicyServer(engine, settings.socket, settings.mode, settings.max_connections,
                          settings.idle_timeout)
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            # shutdown() waits for serve_forever(), which runs on this thread.
            threading.Thread(target=server.shutdown, name="policyd-stop").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload())
    # cli._serve blocked these while it started threads; this thread takes them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    log.info("policy service listening on %s", settings.socket)
    server.serve_forever()
