"""probe - an SMTP client that asks a server to relay in every form, and never sends a message.

NAME
    probe - run_probe(): the relay forms of probeforms.py against one server

SYNOPSIS
    report = run_probe(ProbeOptions(host="mx.example.net", port=25, relay_domain="example.com"))
    report.verdict          # "closed", "open", "deferred", "unreachable"
    for row in report.rows: row.form.name, row.stage, row.code, row.reply, row.verdict

DESCRIPTION
    One SMTP session (smtplib), greeting, EHLO (HELO if EHLO is refused),
    STARTTLS when asked, XCLIENT ADDR=... when asked and offered (to be
    seen as another client by a server that allows it, e.g. the local
    MTA), then the control and every relay form: MAIL FROM, RCPT TO, RSET.
    DATA is never sent, so no message is queued, whatever the server says.
    A form with a HELO of its own says EHLO again first. A form the server
    cannot take (UTF-8 without SMTPUTF8) is skipped. A server that drops
    the connection or answers 421 gets a new one for the next form (at
    most MAX_RECONNECTS).

    Verdicts per form: "relayed" (RCPT accepted: an open relay would carry
    it), "refused" (5xx at MAIL or RCPT), "deferred" (4xx, a lost
    connection, anything else: not proven either way), "skipped".
    The report's verdict: "open" when one form was relayed, else "closed"
    when every form was refused, else "deferred". The control
    (postmaster of the local domain) is asked first and reported apart.

    With auth (user, password), a second session logs in (after STARTTLS
    when asked) and asks the plain relay form: an authenticated sender
    should be let through, and the report says whether it was.

    Every reply is bounded: MAX_LINE bytes a line, MAX_LINES lines, and
    the timeout for the whole reply, however slowly the server trickles
    it; server text is made printable before it is shown.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from relaymilter.probeforms import CONTROL, Form, relay_forms
from relaymilter.probeforms import control as control_form
from relaymilter.text import printable

MAX_LINE = 2048         # bytes in one reply line (RFC 5321: 512)
MAX_LINES = 64          # lines in one reply
MAX_RECONNECTS = 5      # new connections after the server dropped one
SHOWN = 200             # characters of a reply shown


class Unreachable(Exception):
    """No SMTP session could be opened: the message says why."""


class NoLocalDomain(ValueError):
    """No --local-domain, and the greeting names none."""


class _Client(smtplib.SMTP):
    """smtplib's client, with every reply bounded in size and time: a hostile
    server may trickle a line or never end a multi-line reply."""

    def __init__(self, timeout: float, source: str | None) -> None:
        self._pending = b""
        super().__init__(timeout=timeout,
                         source_address=(source, 0) if source else None)

    def connect(self, host: str = "localhost", port: int = 0,
                source_address: tuple | None = None):
        self._pending = b""
        self._host = host       # STARTTLS checks the certificate against it
        return super().connect(host, port, source_address)

    def starttls(self, *args, **kwargs):
        # What a server sent before the handshake must not be read as if
        # it came through TLS (STARTTLS command injection).
        self._pending = b""
        return super().starttls(*args, **kwargs)

    def getreply(self) -> tuple[int, bytes]:
        deadline = time.monotonic() + self.timeout
        lines = []
        code = -1
        try:
            while len(lines) < MAX_LINES:
                line = self._line(deadline)
                lines.append(line[4:].strip(b" \t\r\n"))
                try:
                    code = int(line[:3])
                except ValueError:
                    code = -1
                    break
                if line[3:4] != b"-":
                    break
            else:
                raise smtplib.SMTPServerDisconnected(f"a reply of over {MAX_LINES} lines")
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.timeout)
        return code, b"\n".join(lines)

    def _line(self, deadline: float) -> bytes:
        while b"\n" not in self._pending:
            if len(self._pending) > MAX_LINE:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"a reply line of over {MAX_LINE} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.sock is None:
                self.close()
                raise smtplib.SMTPServerDisconnected("no complete reply within the timeout")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(4096)
            except OSError as error:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"connection lost: {error}") from None
            if not chunk:
                self.close()
                raise smtplib.SMTPServerDisconnected("connection closed by the server")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line + b"\n"


@dataclass(frozen=True)
class ProbeOptions:
    host: str
    port: int = 25
    relay_domain: str = "example.com"
    local_domain: str | None = None     # None: the name in the greeting
    helo: str = "relaytest.invalid"
    sender: str | None = None           # MAIL FROM; None: relaytest@RELAY_DOMAIN
    source: str | None = None           # local address to connect from
    starttls: bool = False
    tls_context: ssl.SSLContext | None = None
    xclient: str | None = None          # XCLIENT ADDR=this when the server offers it
    auth: tuple[str, str] | None = None
    timeout: float = 30.0


class Row(NamedTuple):
    form: Form
    stage: str          # "MAIL", "RCPT", "EHLO", "" (skipped), "connection"
    code: int | None
    reply: str          # printable, at most SHOWN characters
    verdict: str        # relayed, refused, deferred, skipped (accepted for the control)


@dataclass
class Report:
    server: str
    greeting: str = ""
    local_domain: str = ""
    relay_domain: str = ""
    tls: bool = False
    xclient: str | None = None          # the address XCLIENT made us, when it did
    control: Row | None = None
    rows: list[Row] = field(default_factory=list)
    authenticated: Row | None = None
    notes: list[str] = field(default_factory=list)
    verdict: str = "closed"

    def counts(self) -> dict[str, int]:
        counts = {"relayed": 0, "refused": 0, "deferred": 0, "skipped": 0}
        for row in self.rows:
            counts[row.verdict] += 1
        return counts


def _shown(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    text = printable(" / ".join(text.splitlines()))
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def _verdict(code: int, accepted: str) -> str:
    if 200 <= code < 300:
        return accepted
    if 500 <= code < 600:
        return "refused"
    return "deferred"


class _Session:
    """One connection and what it was set up with; reopened after a drop."""

    def __init__(self, options: ProbeOptions, report: Report) -> None:
        self.options, self.report = options, report
        self.client: _Client | None = None
        self.reconnects = 0

    def open(self, first: bool = False) -> None:
        options = self.options
        client = _Client(options.timeout, options.source)
        try:
            code, greeting = client.connect(options.host, options.port)
        except (OSError, smtplib.SMTPException) as error:
            client.close()
            raise Unreachable(f"cannot connect to {self.report.server}: "
                              f"{type(error).__name__}: {error}") from None
        self.client = client
        if first:
            self.report.greeting = _shown(f"{code} {greeting.decode('utf-8', 'replace')}")
        if code != 220:
            raise _Refused("greeting", code, greeting)
        self.hello(options.helo)
        if options.starttls:
            if not client.has_extn("starttls"):
                raise _Refused("STARTTLS", 0, b"STARTTLS not offered")
            code, reply = client.starttls(context=options.tls_context)
            if code != 220:
                raise _Refused("STARTTLS", code, reply)
            self.report.tls = True
            self.hello(options.helo)
        if options.xclient and client.has_extn("xclient"):
            code, reply = client.docmd("XCLIENT", f"ADDR={options.xclient} NAME=[UNAVAILABLE]")
            if code != 220:
                raise _Refused("XCLIENT", code, reply)
            self.report.xclient = options.xclient
            self.hello(options.helo)
        elif options.xclient and first:
            self.report.notes.append(f"XCLIENT not offered to us: probed as ourselves, "
                                     f"not as {options.xclient}")

    def hello(self, name: str) -> None:
        assert self.client is not None
        self.client.local_hostname = name
        code, reply = self.client.ehlo(name)
        if not 200 <= code < 300:
            code, reply = self.client.helo(name)
            if not 200 <= code < 300:
                raise _Refused("EHLO", code, reply)

    def ask(self, form: Form, accepted: str = "relayed") -> Row:
        """MAIL and RCPT of form, then RSET; a drop or 421 leaves the session closed."""
        client = self.client
        assert client is not None
        if form.helo:
            self.hello(form.helo)
        parameters = form.mail_parameters
        if form.smtputf8:
            if not client.has_extn("smtputf8"):
                return Row(form, "", None, "SMTPUTF8 not offered", "skipped")
            parameters = (parameters + " SMTPUTF8").strip()
            client.command_encoding = "utf-8"
        try:
            code, reply = client.docmd("MAIL", f"FROM:{form.sender}"
                                       + (f" {parameters}" if parameters else ""))
            if not 200 <= code < 300:
                row = Row(form, "MAIL", code, _shown(reply), _verdict(code, accepted))
            else:
                code, reply = client.docmd("RCPT", f"TO:{form.recipient}")
                row = Row(form, "RCPT", code, _shown(reply), _verdict(code, accepted))
        finally:
            client.command_encoding = "ascii"
        if code == 421:
            client.close()
            return row
        client.docmd("RSET")
        if form.helo:
            self.hello(self.options.helo)
        return row

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.quit()
            except (OSError, smtplib.SMTPException):
                self.client.close()
            self.client = None


class _Refused(Exception):
    """The server refused the session itself (greeting, EHLO, STARTTLS, XCLIENT)."""

    def __init__(self, stage: str, code: int, reply: bytes) -> None:
        super().__init__(stage)
        self.stage, self.code, self.reply = stage, code, reply


def _greeted_name(greeting: str) -> str | None:
    """The server's name from "220 mx.example.net ESMTP ...", if it is a domain."""
    words = greeting.split()
    name = words[1] if len(words) > 1 else ""
    if "." in name and not name.startswith("[") and all(
            part and (part.replace("-", "").isalnum()) for part in name.rstrip(".").split(".")):
        return name.rstrip(".").lower()
    return None


def run_probe(options: ProbeOptions) -> Report:
    """Probe the server of options; raises Unreachable when no session opens."""
    report = Report(server=f"{options.host}:{options.port}",
                    relay_domain=options.relay_domain.lower().rstrip("."))
    session = _Session(options, report)
    try:
        try:
            session.open(first=True)
        except _Refused as refused:
            return _session_refused(report, refused)
        except (smtplib.SMTPException, OSError) as error:     # TLS, a broken reply
            report.notes.append(f"the session broke before any form: "
                                f"{_shown(f'{type(error).__name__}: {error}')}")
            report.verdict = "deferred"
            return report
        assert session.client is not None
        server_name = _greeted_name(report.greeting)
        local = options.local_domain or server_name
        if not local:
            session.close()
            raise NoLocalDomain("the greeting names no domain: give --local-domain")
        report.local_domain = local.lower().rstrip(".")
        peer = session.client.sock.getpeername()[0] if session.client.sock else None
        sender = options.sender or f"relaytest@{report.relay_domain}"
        forms = relay_forms(report.relay_domain, report.local_domain, peer, server_name,
                            sender)
        for position, form in enumerate([control_form(report.local_domain, sender)] + forms):
            row = _ask(session, form, "accepted" if form.name == CONTROL else "relayed")
            if row is None:       # could not reconnect: the rest is not tried
                for rest in forms[max(0, position - 1):]:
                    report.rows.append(Row(rest, "connection", None, "not tried: no new "
                                           "connection", "deferred"))
                break
            if form.name == CONTROL:
                report.control = row
            else:
                report.rows.append(row)
        session.close()
        if options.auth:
            report.authenticated = _authenticated(options, report, forms[0])
    finally:
        session.close()
    counts = report.counts()
    report.verdict = ("open" if counts["relayed"] else
                      "deferred" if counts["deferred"] else "closed")
    if report.control is not None and report.control.verdict != "accepted":
        report.notes.append(f"the server did not take postmaster@{report.local_domain}: is "
                            f"{report.local_domain} a domain it takes mail for "
                            "(--local-domain)? Refusals prove less without it")
    return report


def _ask(session: _Session, form: Form, accepted: str) -> Row | None:
    """One form, reconnecting first if the last one left the session closed;
    None when no new session opens."""
    if session.client is None or session.client.sock is None:
        if session.reconnects >= MAX_RECONNECTS:
            return None
        session.reconnects += 1
        try:
            session.open()
        except (Unreachable, _Refused, OSError, smtplib.SMTPException):
            return None
    try:
        return session.ask(form, accepted)
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPResponseException, OSError) as error:
        if session.client is not None:
            session.client.close()
        return Row(form, "connection", None, _shown(f"connection lost: {error}"), "deferred")
    except _Refused as refused:
        return Row(form, refused.stage, refused.code, _shown(refused.reply),
                   _verdict(refused.code, accepted))


def _session_refused(report: Report, refused: _Refused) -> Report:
    """The server refused us before any form: closed on 5xx, deferred on anything else."""
    report.notes.append(f"the server refused the session at {refused.stage}: "
                        f"{refused.code} {_shown(refused.reply)}")
    report.verdict = "closed" if 500 <= refused.code < 600 else "deferred"
    return report


def _authenticated(options: ProbeOptions, report: Report, plain: Form) -> Row:
    """The plain relay form again, after logging in: it should be accepted."""
    session = _Session(options, report)
    try:
        try:
            session.open()
        except _Refused as refused:
            return Row(plain, refused.stage, refused.code, _shown(refused.reply), "refused")
        client = session.client
        assert client is not None and options.auth is not None
        if not client.has_extn("auth"):
            return Row(plain, "AUTH", None, "AUTH not offered (STARTTLS first? --starttls)",
                       "refused")
        try:
            client.login(*options.auth)
        except smtplib.SMTPAuthenticationError as error:
            return Row(plain, "AUTH", error.smtp_code, _shown(error.smtp_error), "refused")
        return session.ask(plain, "relayed")
    except (smtplib.SMTPException, OSError) as error:
        return Row(plain, "connection", None, _shown(f"connection lost: {error}"), "deferred")
    finally:
        session.close()


def resolve_port(text: str, default: int = 25) -> tuple[str, int]:
    """ "HOST", "HOST:PORT", "[IPV6]:PORT" or "IPV6" -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default

