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

    Bad input: a line without "=", a line over MAX_LINE bytes, a request
    over MAX_ATTRIBUTES lines or MAX_REQUEST bytes is answered "action=DEFER_IF_PERMIT Malformed
    policy request", logged, and the connection is closed (the stream can
    no longer be trusted). Bytes that are not UTF-8 are kept as surrogate
    escapes and refused by the address parser (501 5.1.3). An exception
    while deciding is logged with its traceback and answered per
    [decisions] on_error.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import socketserver
import threading
from relaymilter.address import ATEXT, IPAddress, parse_ip
from relaymilter.decision import Action, ClientFacts, Decision, RecipientFacts
from relaymilter.endpoint import parse_socket
from relaymilter.engine import Engine


log = logging.getLogger(__name__)

MAX_LINE = 8192             # bytes, newline included
MAX_ATTRIBUTES = 256        # lines in one request
MAX_REQUEST = MAX_ATTRIBUTES * 256  # bytes: far above what Postfix sends (about 1 KB)
MALFORMED = "DEFER_IF_PERMIT Malformed policy request"


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
            self._buffer = self._buffer.lstrip(b"\n")   # stray empty lines between requests
            end = self._buffer.find(b"\n\n")
            if end >= 0:
                block, self._buffer = self._buffer[:end], self._buffer[end + 2:]
                return parse_request(block)
            if len(self._buffer) > MAX_REQUEST:
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
                self._send(MALFORMED)
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


class PolicyServer:
    """The listening socket and its threads; see the module docstring."""

    def __init__(self, engine: Engine, where: str, socket_mode: int = 0o660) -> None:
        self.engine = engine
        self.where = where
        self._server = _listen(where, socket_mode)
        self._server.engine = engine

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        """Stop serving (from another thread than serve_forever's) and close."""
        self._server.shutdown()
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


def _listen(where: str, socket_mode: int) -> socketserver.BaseServer:
    """A bound, listening threaded server for "unix:/path" or "inet[6]:PORT@HOST"."""
    spec = parse_socket(where)
    if spec.kind == "unix":
        if os.path.exists(spec.path):
            os.unlink(spec.path)    # a stale socket from a killed process

        class UnixServer(_Server, socketserver.UnixStreamServer):
            pass
        server: socketserver.BaseServer = UnixServer(spec.path, PolicyConnection)
        os.chmod(spec.path, socket_mode)
        return server
    family = socket.AF_INET6 if spec.kind == "inet6" else socket.AF_INET

    class InetServer(_Server, socketserver.TCPServer):
        address_family = family
    return InetServer((spec.host, spec.port), PolicyConnection)


def serve(engine: Engine) -> None:
    """Serve until SIGTERM or SIGINT. Raises OSError when the socket cannot be opened."""
    import signal

    settings = engine.snapshot.config.policyd
    server = PolicyServer(engine, settings.socket, settings.mode)
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        if not stopping.is_set():
            stopping.set()
            # shutdown() waits for serve_forever(), which runs on this thread.
            threading.Thread(target=server.shutdown, name="policyd-stop").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("policy service listening on %s", settings.socket)
    server.serve_forever()
