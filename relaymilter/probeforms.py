"""probeforms - the relay forms `relaymilter probe` tries: a catalogue, no sockets.

NAME
    probeforms - Form, and relay_forms(): every way a relay tester asks a
    server to carry mail to a domain that is not its own

SYNOPSIS
    forms = relay_forms(relay="example.com", local="mx.example.net",
                        server_ip="192.0.2.25", server_name="mx.example.net")
    for form in forms:
        form.name, form.helo, form.sender, form.mail_parameters, form.recipient

DESCRIPTION
    Each Form is one MAIL FROM / RCPT TO pair (and, for some, its own HELO)
    whose recipient an open relay would carry to the relay domain: the
    plain address and its spellings (case, trailing dot, no angle
    brackets), the percent hack, bang paths, source routes, "@" hidden in
    the local part (quoted, escaped, doubled), address literals, IDN twins
    of the relay domain, postmaster forms, and senders a careless server
    trusts: one of its own domains, its own HELO name, AUTH= on MAIL
    without authenticating, the null sender. The texts are written as
    they go on the wire, angle brackets included, so that what is shown
    is what was sent.

    CONTROL is not a relay form: postmaster of the local domain, which
    every server must take (RFC 5321 4.5.1). A control refused says the
    local domain is wrong, and every "refused" with it proves less.
"""

from __future__ import annotations

from typing import NamedTuple


class Form(NamedTuple):
    name: str                   # short, one word: "percent-hack"
    recipient: str              # RCPT TO argument, as sent: "<user%example.com@local>"
    sender: str                 # MAIL FROM argument, as sent: "<probe@example.com>"
    mail_parameters: str = ""   # after MAIL FROM: "AUTH=<postmaster@local>"
    helo: str | None = None     # a HELO of its own, else the probe's
    smtputf8: bool = False      # needs SMTPUTF8 (the server must offer it)


CONTROL = "control"
USER = "relaytest"


def _twins(domain: str) -> list[tuple[str, str]]:
    """(name, spelling) of domains that look like domain and are not it."""
    twins = []
    labels = domain.split(".")
    first = labels[0]
    if "a" in first or "o" in first or "e" in first:
        # Cyrillic look-alikes of a, o, e in the first label: another domain,
        # sent as its A-label (any server can read it) and as UTF-8.
        swapped = first.replace("a", "\u0430", 1) if "a" in first else \
            first.replace("o", "\u043e", 1) if "o" in first else first.replace("e", "\u0435", 1)
        u_label = ".".join([swapped] + labels[1:])
        a_label = u_label.encode("idna").decode("ascii")
        twins.append(("idn-twin-alabel", a_label))
        twins.append(("idn-twin-utf8", u_label))
    # Fullwidth letters: IDNA 2003 maps them onto the plain name (the same
    # domain for some software, not for others).
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in first)
    twins.append(("idn-fullwidth", ".".join([fullwidth] + labels[1:])))
    return twins


def relay_forms(relay: str, local: str, server_ip: str | None = None,
                server_name: str | None = None, sender: str | None = None) -> list[Form]:
    """Every relay form for a relay domain the server must not relay to, a
    domain it takes mail for (local), its address and its name (from its
    greeting) when known; sender: the probe's MAIL FROM address."""
    relay, local = relay.lower().rstrip("."), local.lower().rstrip(".")
    mail_from = f"<{sender or 'relaytest@' + relay}>"
    user = USER
    forms = [
        Form("plain", f"<{user}@{relay}>", mail_from),
        Form("upper-case", f"<{user.upper()}@{relay.upper()}>", mail_from),
        Form("trailing-dot", f"<{user}@{relay}.>", mail_from),
        Form("no-brackets", f"{user}@{relay}", mail_from),
        Form("local-subdomain", f"<{user}@{local}.{relay}>", mail_from),
        Form("percent-hack", f"<{user}%{relay}@{local}>", mail_from),
        Form("percent-bare", f"<{user}%{relay}>", mail_from),
        Form("percent-quoted", f'<"{user}%{relay}"@{local}>', mail_from),
        Form("bang-path", f"<{relay}!{user}@{local}>", mail_from),
        Form("bang-bare", f"<{relay}!{user}>", mail_from),
        Form("bang-quoted", f'<"{relay}!{user}"@{local}>', mail_from),
        Form("source-route", f"<@{local}:{user}@{relay}>", mail_from),
        Form("source-route-list", f"<@{local},@{local}:{user}@{relay}>", mail_from),
        Form("at-quoted", f'<"{user}@{relay}"@{local}>', mail_from),
        Form("at-escaped", f"<{user}\\@{relay}@{local}>", mail_from),
        Form("at-doubled", f"<{user}@{relay}@{local}>", mail_from),
        Form("literal-foreign", f"<{user}@[192.0.2.1]>", mail_from),
        Form("literal-ipv6", f"<{user}@[IPv6:2001:db8::1]>", mail_from),
        Form("postmaster-remote", f"<postmaster@{relay}>", mail_from),
        Form("postmaster-percent", f"<postmaster%{relay}@{local}>", mail_from),
        # Senders a careless server trusts.
        Form("sender-local", f"<{user}@{relay}>", f"<postmaster@{local}>"),
        Form("sender-null", f"<{user}@{relay}>", "<>"),
        Form("sender-auth-param", f"<{user}@{relay}>", mail_from,
             mail_parameters=f"AUTH=<postmaster@{local}>"),
    ]
    if server_ip:
        literal = f"[IPv6:{server_ip}]" if ":" in server_ip else f"[{server_ip}]"
        forms.append(Form("percent-literal", f"<{user}%{relay}@{literal}>", mail_from))
        forms.append(Form("source-route-literal", f"<@{literal}:{user}@{relay}>", mail_from))
        forms.append(Form("helo-literal", f"<{user}@{relay}>", mail_from, helo=literal))
    if server_name:
        forms.append(Form("helo-server-name", f"<{user}@{relay}>", mail_from,
                          helo=server_name))
    forms.append(Form("helo-localhost", f"<{user}@{relay}>", mail_from, helo="localhost"))
    for name, twin in _twins(relay):
        utf8 = not twin.isascii()
        forms.append(Form(name, f"<{user}@{twin}>", mail_from, smtputf8=utf8))
    return forms


def control(local: str, sender: str) -> Form:
    """The recipient every server must take: postmaster of its own domain."""
    return Form(CONTROL, f"<postmaster@{local.lower().rstrip('.')}>", f"<{sender}>")
