"""milter - the pymilter adapter: callbacks -> facts -> engine -> reply.

NAME
    milter - thin libmilter front end to engine.py

DESCRIPTION
    libmilter runs one thread per MTA connection and creates one RelayMilter
    per connection. A RelayMilter keeps the facts of its SMTP session (who
    the client is, HELO, MAIL FROM, SASL login), hands them to the engine
    at each RCPT TO and turns the Decision it gets back into a reply. Dry
    run, holds, the log line and metrics are the engine's (one answer path
    for both front ends); this module makes no decision of its own.

    Protocol economy: connect, HELO and MAIL are "no reply" stages (the MTA
    does not wait for us); headers, body and unknown commands are negotiated
    away; RCPT waits for an answer. At DATA every recipient is decided, so
    DATA answers ACCEPT: the MTA then skips end of message for us. That is
    no more round trips than the end-of-message reply it replaces, and over
    TCP it avoids a 40 ms Nagle/delayed-ACK stall per message (Postfix
    would send the DATA macros and end of message as two writes with no
    reply between them). Macros are requested per stage with
    @Milter.symlist.

    Error boundary: every callback is guarded. An exception is logged once
    with its traceback and answered per [decisions] on_error; in a no-reply
    stage it is remembered and answered at the next RCPT. Nothing is ever
    permanently rejected because relaymilter failed.

    Postfix runs the milter's connect callback again after XCLIENT, in the
    same milter conversation: connect starts a fresh session every time.
    After QUIT_NC pymilter drops the RelayMilter and the next connect gets
    a new one. An aborted transaction (RSET, or the MTA's ABORT) ends the
    message state: the sender and the SASL login of MAIL. libmilter keeps
    the MAIL macros of the aborted transaction until the MTA sends new
    ones, so after an ABORT a MAIL's {auth_authen} counts only when that
    MAIL's macros are shown to be fresh: {mail_addr} (requested at MAIL,
    sent by Postfix and Sendmail with every MAIL) names this MAIL's sender.

    Bytes that are not UTF-8: pymilter decodes the connect host name and
    the HELO argument in C, before any Python runs, and for bytes that are
    not UTF-8 calls no callback at all: it prints the UnicodeDecodeError
    through sys.excepthook and answers libmilter with its exception policy
    (nothing reaches the MTA in a no-reply stage). install_entry_guards()
    (once, at the first connection) turns that into a decision: its
    excepthook keeps the raw bytes for the connection's thread (pymilter
    gives each connection its own thread state) and logs one escaped line,
    no traceback; the failed callback is replayed with the bytes decoded
    with surrogateescape (shown as \xff in logs), the client address read
    from the {client_addr} connect macro. A connect is told from a HELO by
    that address: a new address, or no session yet, is a new connect. Where
    pymilter has no RelayMilter for the connection (a connect that failed
    after QUIT_NC), the next callback makes one. Without {client_addr} the
    client is unknown (never trusted) and the session answers [decisions]
    on_error at RCPT: never a permit that skipped the DNSBL.

    DNSBL: connect starts the lookups of an untrusted client, so that their
    latency hides behind HELO and MAIL FROM; RCPT collects them. With
    [dnsbl] reject_stage = "connect", connect is negotiated as a stage with
    a reply, waits for the verdict and rejects the connection.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import sys
import threading
from typing import Any, Callable

import Milter

from relaymilter.address import IPAddress, parse_ip
from relaymilter.decision import Action, ClientFacts, Decision, RecipientFacts
from relaymilter.engine import Engine
from relaymilter.text import printable


log = logging.getLogger(__name__)

# Macros whose absence means the MTA is configured so that a check is
# weaker than it should be; warned about once per process.
EXPECTED_MACROS = {"connect": ("j", "{client_addr}"), "envrcpt": ("{rcpt_addr}",)}


# Stands for a macro value that was not UTF-8; it parses as no address.
UNDECODABLE = "\udcff"

# Message ids for the outbound limits (limits.py): unique across processes
# and hosts, so that a recipient asked again is not counted twice and a
# message counts once, whatever its recipients.
_MESSAGE_PREFIX = os.urandom(6).hex()
_message_numbers = itertools.count(1)


class MacroWarnings:
    """Remembers which missing macros were already reported. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reported: set[str] = set()

    def missing(self, stage: str, macro: str) -> None:
        with self._lock:
            if macro in self._reported:
                return
            self._reported.add(macro)
        log.warning("the MTA sent no %s macro at %s; see the relaymilter guide, "
                    "section on MTA macros", macro, stage)


def client_address(family: int | None, hostaddr: Any) -> IPAddress | None:
    """The client IP from connect's arguments; None when unknown or not IP."""
    if family not in (socket.AF_INET, socket.AF_INET6) or not hostaddr:
        return None
    text = hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr
    try:
        return parse_ip(str(text).split("%", 1)[0])
    except ValueError:
        return None


def escape_reply(text: str) -> str:
    """pymilter's setreply() treats "%" as a format character."""
    return text.replace("%", "%%")


def guarded(stage: str) -> Callable:
    """Catch any exception of a callback at the edge and answer per on_error."""
    def decorate(callback: Callable) -> Callable:
        @functools.wraps(callback)
        def wrapper(self: "RelayMilter", *args: Any) -> int:
            try:
                return callback(self, *args)
            except Exception:
                log.exception("internal error in the %s callback", stage)
                self._engine.internal_error(stage)
                return self.fault(stage, args)
        return wrapper
    return decorate


class RelayMilter(Milter.Base):
    """One MTA connection. Created by libmilter's thread for that connection."""

    def __init__(self, engine: Engine, warnings: MacroWarnings):
        super().__init__()      # libmilter attaches the context itself
        self._engine = engine
        self._warnings = warnings
        self._start_session(ClientFacts(address=None))
        if not _guards_installed and _in_libmilter():
            install_entry_guards()

    def _start_session(self, client: ClientFacts, client_addr_text: str | None = None) -> None:
        self._client = client
        self._client_addr_text = client_addr_text   # the {client_addr} the session began with
        self._listing = None
        self._sender: str | None = None
        self._message_id: str | None = None
        self._session_fault = False
        self._message_fault = False
        self._aborted = False       # an ABORT since the session began: MAIL macros may be stale
        self._connected = False
        _entries.setdefault(threading.get_ident(), {})["milter"] = self

    # ------------------------------------------------------ callbacks ---

    def negotiate(self, opts: list[int]) -> int:
        """Ask for the no-reply stages and per-stage macros.

        Replaces Milter.Base.negotiate, whose setsymlist() hands bytes to the
        C module under Python 3 (pymilter 1.0.5): it raises, and the failed
        negotiation silently falls back to every stage with a reply.
        """
        try:
            self._actions, offered, _, _ = opts
            if self._actions & Milter.SETSYMLIST:
                for stage, macros in _macro_requests(type(self)):
                    self._ctx.setsymlist(stage, macros)
            protocol = offered & ~self.protocol_mask()
            if self._engine.snapshot.rejects_at_connect:
                protocol &= ~Milter.P_NR_CONN
            opts[1] = self._protocol = protocol
            opts[2] = opts[3] = 0
        except Exception:
            log.exception("milter negotiation failed; using the MTA's defaults")
            return Milter.ALL_OPTS
        return Milter.CONTINUE

    @Milter.symlist("j", "{daemon_name}", "{client_addr}")
    @Milter.noreply
    @guarded("connect")
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self._engine.connection()
        name = hostname if hostname and not hostname.startswith("[") else "unknown"
        self._start_session(ClientFacts(address=client_address(family, hostaddr), name=name),
                            self._macro("{client_addr}"))
        self._connected = True
        self._require_macros("connect")
        return self._start_lookups()

    def _start_lookups(self) -> int:
        snapshot = self._engine.snapshot
        self._listing = self._engine.start_lookups(self._client, snapshot)
        if self._listing is not None and snapshot.rejects_at_connect \
                and self._protocol & Milter.P_NR_CONN == 0:
            return self._answer(self._engine.answer_connect(self._client, self._listing))
        return Milter.CONTINUE

    @Milter.noreply
    @guarded("helo")
    def hello(self, hostname: str) -> int:
        self._follow_client()
        self._client = ClientFacts(self._client.address, self._client.name, hostname,
                                   self._client.auth_user)
        return Milter.CONTINUE

    @Milter.symlist("{auth_authen}", "{auth_type}", "{mail_addr}")
    @Milter.noreply
    @guarded("mail")
    def envfrom(self, sender: str, *params: str) -> int:
        self._follow_client()
        self._message_fault = False
        self._sender = _text(sender)
        self._message_id = f"{_MESSAGE_PREFIX}.{os.getpid()}.{next(_message_numbers)}"
        auth_user = self._macro("{auth_authen}") or None
        if auth_user is not None and self._aborted and not self._mail_macros_fresh():
            log.warning("ignoring {auth_authen} at MAIL from %s: the MTA sent no new MAIL "
                        "macros after an aborted transaction", self._client_label())
            auth_user = None
        self._client = ClientFacts(self._client.address, self._client.name, self._client.helo,
                                   auth_user)
        return Milter.CONTINUE

    def _mail_macros_fresh(self) -> bool:
        """Does the {mail_addr} macro name this MAIL's sender (not an aborted one's)?"""
        witness = self._macro("{mail_addr}")
        if witness is None or witness == UNDECODABLE:
            return False
        return witness.strip().strip("<>").lower() == self._sender.strip().strip("<>").lower()

    @Milter.symlist("{rcpt_addr}", "i")
    @guarded("rcpt")
    def envrcpt(self, recipient: str, *params: str) -> int:
        self._follow_client()
        recipient = _text(recipient)
        queue_id = self._macro("i") or None
        if self._session_fault or self._message_fault:
            return self._answer(self._engine.answer_fault(self._client, self._sender, recipient,
                                                          queue_id))
        resolved = self._macro("{rcpt_addr}")
        if resolved is None:
            self._warnings.missing("RCPT", "{rcpt_addr}")
        facts = RecipientFacts(client=self._client, sender=self._sender or "",
                               recipient=recipient, resolved_recipient=resolved,
                               queue_id=queue_id, listing=self._listing,
                               instance=self._message_id)
        return self._answer(self._engine.answer_recipient(facts))

    @guarded("data")
    def data(self) -> int:
        # Everything is decided at RCPT; do not be asked again for this message.
        return Milter.ACCEPT

    def abort(self) -> int:
        """The MTA aborted the transaction (RSET, a rejected message, QUIT).

        The message ends here: its sender, its SASL login and its fault. The
        client, HELO and DNSBL lookups belong to the session and stay.
        """
        self._sender = None
        self._message_id = None
        self._message_fault = False
        self._aborted = True
        self._client = ClientFacts(self._client.address, self._client.name, self._client.helo)
        return Milter.CONTINUE

    def close(self) -> int:
        """The milter connection, or its session (QUIT_NC), ended."""
        _entries.pop(threading.get_ident(), None)
        return Milter.CONTINUE

    # ------------------------------------------- arguments pymilter could not decode ---

    def _follow_client(self) -> None:
        """Start a new session when the connect macros name another client.

        libmilter swallows a CONNECT that follows an ABORT without QUIT_NC:
        no connect callback, but its macros replace the old ones. A client
        address that changed under us is a new client: nothing of the old
        session (trust, login, lookups) may stay. Runs at every HELO, MAIL
        and RCPT: the macro's text is compared with the session's, and
        parsed only when it changed.
        """
        text = self._macro("{client_addr}")
        if text is None or not self._connected or text == self._client_addr_text:
            return
        address = _macro_address(text)
        if address == self._client.address:
            self._client_addr_text = text
            return
        log.warning("the MTA began a session for %s without a connect callback; "
                    "starting a new session", address if address is not None else "unknown")
        self._restart_session(ClientFacts(address=address), text)

    def unreadable_argument(self, raw: bytes) -> None:
        """pymilter could not decode a connect host name or a HELO argument (raw).

        Called by the excepthook of install_entry_guards() in place of the
        callback pymilter did not call: see the module docstring.
        """
        text = raw.decode("utf-8", "surrogateescape")
        macro = self._macro("{client_addr}")
        address = _macro_address(macro) if macro is not None else None
        if self._connected and address is not None and address == self._client.address:
            log.warning("HELO from %s is not UTF-8: %s", self._client_label(), printable(text))
            self._client = ClientFacts(self._client.address, self._client.name, text)
            return
        log.warning("connect from %s[%s]: the host name is not UTF-8%s", printable(text),
                    address if address is not None else "unknown",
                    "" if address is not None else
                    "; no {client_addr} macro either: answering [decisions] on_error")
        self._restart_session(ClientFacts(address=address, name=text), macro)

    def _restart_session(self, client: ClientFacts, client_addr_text: str | None) -> None:
        """A session begun without pymilter's connect callback: as connect would
        begin it. An unknown client is answered [decisions] on_error at RCPT."""
        self._engine.connection()
        self._start_session(client, client_addr_text)
        self._connected = True
        self._session_fault = client.address is None
        if client.address is not None:
            self._start_lookups()

    def _client_label(self) -> str:
        address = self._client.address
        return f"{printable(self._client.name)}[{address if address is not None else 'unknown'}]"

    # -------------------------------------------------------- helpers ---

    def fault(self, stage: str, args: tuple = ()) -> int:
        """Answer for an exception in `stage` (called by @guarded)."""
        if stage in ("connect", "helo"):
            self._session_fault = True
            return Milter.CONTINUE
        if stage == "mail":
            self._message_fault = True
            return Milter.CONTINUE
        recipient = _text(args[0]) if args and isinstance(args[0], (str, bytes)) else None
        try:
            return self._answer(self._engine.answer_fault(self._client, self._sender, recipient))
        except Exception:
            log.exception("could not answer after an internal error; answering TEMPFAIL")
            return Milter.TEMPFAIL

    def _answer(self, decision: Decision) -> int:
        action = decision.answered
        if action is Action.PERMIT:
            return Milter.CONTINUE
        self.setreply(str(decision.code), decision.dsn, escape_reply(decision.text))
        return Milter.REJECT if action is Action.REJECT else Milter.TEMPFAIL

    def _macro(self, name: str) -> str | None:
        """getsymval(), but a value that is not UTF-8 becomes UNDECODABLE.

        pymilter raises UnicodeDecodeError for such a macro (Postfix with
        smtputf8_enable = no passes raw 8-bit addresses). The engine then
        meets a value it cannot parse and answers for bad syntax.
        """
        try:
            return self.getsymval(name)
        except UnicodeDecodeError:
            log.debug("macro %s is not UTF-8", name)
            return UNDECODABLE

    def _require_macros(self, stage: str) -> None:
        for macro in EXPECTED_MACROS[stage]:
            if self._macro(macro) is None:
                self._warnings.missing(stage, macro)


@functools.cache
def _macro_requests(milter_class: type) -> tuple[tuple[int, str], ...]:
    """(stage, "macro macro") for each callback decorated with @Milter.symlist."""
    requests = []
    for name, stage in Milter.MACRO_CALLBACKS.items():
        macros = getattr(getattr(milter_class, name), "_symlist", None)
        if macros:
            requests.append((stage, " ".join(macros)))
    return tuple(requests)


# ------------------------------------------------------- pymilter entry points ---

# Per libmilter connection, keyed by its OS thread (libmilter runs one
# thread per connection; pymilter may give one connection several Python
# thread states, so threading.local would not do): "milter", "pending".
_entries: dict[int, dict[str, Any]] = {}
_guards_lock = threading.Lock()
_guards_installed: list = []     # what was replaced, kept alive


def install_entry_guards() -> None:
    """Make undecodable connect and HELO arguments a decision, not a traceback.

    Idempotent; called when the first RelayMilter is made (inside
    Milter.runmilter, after it registered its callbacks). See the module
    docstring.
    """
    with _guards_lock:
        if _guards_installed:
            return
        previous = sys.excepthook

        def excepthook(kind: type, value: BaseException, traceback: Any) -> None:
            # pymilter's C argument building fails before any Python frame:
            # a UnicodeDecodeError without a traceback is that, nothing else.
            if issubclass(kind, UnicodeDecodeError) and traceback is None \
                    and isinstance(getattr(value, "object", None), bytes):
                try:
                    _unreadable_argument(value.object)
                    return
                except Exception:
                    log.exception("could not handle an undecodable milter argument")
            previous(kind, value, traceback)

        replaced = (previous, Milter.milter.set_helo_callback, Milter.milter.set_envfrom_callback)
        sys.excepthook = excepthook
        # pymilter's own entries assume connect made a RelayMilter: after a
        # connect whose host name it could not decode, none exists.
        Milter.milter.set_helo_callback(lambda ctx, host: _milter_of(ctx).hello(host))
        Milter.milter.set_envfrom_callback(lambda ctx, *b: _milter_of(ctx).envfrom_bytes(*b))
        Milter.milter.set_envrcpt_callback(lambda ctx, *b: _milter_of(ctx).envrcpt_bytes(*b))
        Milter.milter.set_abort_callback(lambda ctx: _milter_of(ctx).abort())
        _guards_installed.append(replaced)


def _macro_address(text: str) -> IPAddress | None:
    """The address in a {client_addr} macro (Sendmail writes "IPv6:" before
    IPv6); None when it is not readable."""
    if text == UNDECODABLE:
        return None
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    return client_address(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def _in_libmilter() -> bool:
    """On one of libmilter's threads (not a test driving RelayMilter directly)?"""
    return isinstance(threading.current_thread(), threading._DummyThread)


def _unreadable_argument(raw: bytes) -> None:
    entry = _entries.setdefault(threading.get_ident(), {})
    milter = entry.get("milter")
    if milter is None:              # no RelayMilter yet: the next callback makes one
        entry["pending"] = entry.get("pending", ()) + (raw,)    # connect, then HELO
    else:
        milter.unreadable_argument(raw)


def _milter_of(ctx: Any) -> RelayMilter:
    """The connection's RelayMilter; made now if pymilter's connect never ran."""
    milter = ctx.getpriv()
    if milter is None:
        milter = Milter.factory()
        milter._setctx(ctx)
        entry = _entries.setdefault(threading.get_ident(), {})
        pending = entry.pop("pending", ()) or (b"",)
        for raw in pending:
            milter.unreadable_argument(raw)
    return milter


def _text(value: str | bytes) -> str:
    """pymilter passes str (surrogate-escaped) or, rarely, bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def serve(engine: Engine, name: str = "relaymilter") -> None:
    """Run the milter until libmilter stops (SIGTERM, SIGINT).

    libmilter would stop on SIGHUP too: cli._serve runs this on a thread
    of its own, with SIGHUP blocked, and handles SIGHUP (a reload) on the
    main thread. Raises OSError when the socket cannot be opened.
    """
    config = engine.snapshot.config.milter
    warnings = MacroWarnings()
    Milter.factory = lambda: RelayMilter(engine, warnings)
    # No message modifications; SETSYMLIST so @symlist can ask for macros.
    Milter.set_flags(Milter.SETSYMLIST)
    try:
        Milter.runmilter(name, config.socket, config.timeout, rmsock=True)
    except Milter.milter.error as error:
        raise OSError(f"cannot serve on {config.socket}: {error}") from None
