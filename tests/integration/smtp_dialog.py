"""smtp_dialog - an SMTP client that says exactly what a test tells it to.

NAME
    smtp_dialog - EHLO, XCLIENT, MAIL, raw RCPT and DATA, one reply each

SYNOPSIS
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        smtp.xclient(addr="192.0.2.9", login="alice")
        smtp.mail_from("<sender@remote.test>")
        reply = smtp.rcpt_to(b"<user%remote.test@local.test>")
        assert reply.code == 554

DESCRIPTION
    Built on smtplib for the connection, EHLO and reply parsing. Commands go
    out as bytes through smtplib's send(): putcmd() refuses CR and LF and
    encodes as ASCII, and a relay test must be able to send NUL, 0xff or a
    4 KB local part after "RCPT TO:" byte for byte.

    Every method returns the server's Reply(code, text); a 4xx/5xx is an
    answer to assert on, not an exception. A server that hangs up raises
    smtplib.SMTPServerDisconnected.
"""

from __future__ import annotations

import smtplib
from typing import Iterable, NamedTuple

TINY_MESSAGE = b"Subject: relaymilter test\r\n\r\nA test message.\r\n"


class Reply(NamedTuple):
    code: int
    text: str  # lines joined by "\n", without the code


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def xtext(value: str) -> str:
    """RFC 3461 xtext, which XCLIENT attribute values are written in."""
    return "".join(
        ch if 33 <= ord(ch) <= 126 and ch not in "+=" else f"+{ord(ch):02X}" for ch in value
    )


class SmtpDialog:
    """One SMTP session with a server on loopback; see the module docstring."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.smtp = smtplib.SMTP(timeout=timeout)
        code, text = self.smtp.connect(host, port)
        self.banner = Reply(code, text.decode("utf-8", "replace"))
        self.helo_name = "client.test"

    def __enter__(self) -> "SmtpDialog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def command(self, line: bytes | str) -> Reply:
        """Send one command line exactly as given (CRLF appended); read the reply."""
        self.smtp.send(_as_bytes(line) + b"\r\n")
        code, text = self.smtp.getreply()
        return Reply(code, text.decode("utf-8", "replace"))

    def ehlo(self, name: str | None = None) -> Reply:
        self.helo_name = name or self.helo_name
        code, text = self.smtp.ehlo(self.helo_name)
        return Reply(code, text.decode("utf-8", "replace"))

    def xclient(
        self,
        addr: str | None = None,
        name: str | None = None,
        login: str | None = None,
        **attributes: str,
    ) -> Reply:
        """XCLIENT ADDR=… NAME=… LOGIN=… (plus any other attribute, e.g. HELO).

        For IPv6 pass addr="IPV6:2001:db8::9". Postfix answers XCLIENT with a
        new 220 banner and forgets the EHLO, so this sends EHLO again and
        returns the XCLIENT reply.
        """
        attributes = {"ADDR": addr, "NAME": name, "LOGIN": login, **attributes}
        words = [f"{key.upper()}={xtext(value)}" for key, value in attributes.items() if value]
        reply = self.command("XCLIENT " + " ".join(words))
        if reply.code == 220:
            self.ehlo()
        return reply

    def mail_from(self, sender: bytes | str = b"<>", parameters: bytes | str = b"") -> Reply:
        """MAIL FROM:<sender> [parameters], e.g. parameters="SMTPUTF8"."""
        line = b"MAIL FROM:" + _as_bytes(sender)
        if parameters:
            line += b" " + _as_bytes(parameters)
        return self.command(line)

    def rcpt_to(self, recipient: bytes | str) -> Reply:
        """RCPT TO: followed by exactly these bytes (brackets are the caller's)."""
        return self.command(b"RCPT TO:" + _as_bytes(recipient))

    def rcpt_to_each(self, recipients: Iterable[bytes | str]) -> list[Reply]:
        return [self.rcpt_to(recipient) for recipient in recipients]

    def data(self, message: bytes = TINY_MESSAGE) -> Reply:
        """DATA and a message; the reply to DATA itself if it is not 354."""
        try:
            code, text = self.smtp.data(message)
        except smtplib.SMTPDataError as refused:
            code, text = refused.smtp_code, refused.smtp_error
        return Reply(code, text.decode("utf-8", "replace"))

    def rset(self) -> Reply:
        return self.command("RSET")

    def close(self) -> None:
        """QUIT if the server still listens, then close the socket."""
        try:
            if self.smtp.sock is not None:
                self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        self.smtp.close()


def rcpt_reply(port: int, recipient: bytes | str, addr: str | None = None,
               login: str | None = None, smtputf8: bool = False) -> Reply:
    """One session: EHLO, XCLIENT (when addr or login), MAIL FROM, one RCPT TO."""
    with SmtpDialog(port) as smtp:
        smtp.ehlo()
        if addr or login:
            reply = smtp.xclient(addr=addr, login=login)
            if reply.code != 220:
                raise AssertionError(f"XCLIENT refused: {reply}")
        reply = smtp.mail_from("<sender@sender.test>", "SMTPUTF8" if smtputf8 else "")
        if reply.code != 250:
            return reply
        return smtp.rcpt_to(recipient)
