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

    DNSBL: connect starts the lookups of an untrusted client, so that their
    latency hides behind HELO and MAIL FROM; RCPT collects them. With
    [dnsbl] reject_stage = "connect", connect is negotiated as a stage with
    a reply, waits for the verdict and rejects the connection.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from typing import Any, Callable

import Milter

from relaymilter.address import IPAddress, parse_ip
from relaymilter.decision import Action, ClientFacts, Decision, RecipientFacts
from relaymilter.engine import Engine


log = logging.getLogger(__name__)

# Macros whose absence means the MTA is configured so that a check is
# weaker than it should be; warned about once per process.
EXPECTED_MACROS = {"connect": ("j",), "envrcpt": ("{rcpt_addr}",)}


# Stands for a macro value that was not UTF-8; it parses as no address.
UNDECODABLE = "\udcff"


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

    def _start_session(self, client: ClientFacts) -> None:
        self._client = client
        self._listing = None
        self._sender: str | None = None
        self._session_fault = False
        self._message_fault = False

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

    @Milter.symlist("j", "{daemon_name}")
    @Milter.noreply
    @guarded("connect")
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self._engine.connection()
        name = hostname if hostname and not hostname.startswith("[") else "unknown"
        self._start_session(ClientFacts(address=client_address(family, hostaddr), name=name))
        self._require_macros("connect")
        snapshot = self._engine.snapshot
        self._listing = self._engine.start_lookups(self._client, snapshot)
        if self._listing is not None and snapshot.rejects_at_connect \
                and self._protocol & Milter.P_NR_CONN == 0:
            return self._answer(self._engine.answer_connect(self._client, self._listing))
        return Milter.CONTINUE

    @Milter.noreply
    @guarded("helo")
    def hello(self, hostname: str) -> int:
        self._client = ClientFacts(self._client.address, self._client.name, hostname,
                                   self._client.auth_user)
        return Milter.CONTINUE

    @Milter.symlist("{auth_authen}", "{auth_type}")
    @Milter.noreply
    @guarded("mail")
    def envfrom(self, sender: str, *params: str) -> int:
        self._message_fault = False
        self._sender = _text(sender)
        auth_user = self._macro("{auth_authen}") or None
        self._client = ClientFacts(self._client.address, self._client.name, self._client.helo,
                                   auth_user)
        return Milter.CONTINUE

    @Milter.symlist("{rcpt_addr}", "i")
    @guarded("rcpt")
    def envrcpt(self, recipient: str, *params: str) -> int:
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
                               queue_id=queue_id, listing=self._listing)
        return self._answer(self._engine.answer_recipient(facts))

    @guarded("data")
    def data(self) -> int:
        # Everything is decided at RCPT; do not be asked again for this message.
        return Milter.ACCEPT

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
