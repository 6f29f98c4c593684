"""address - read an envelope recipient the way an MTA would.

NAME
    address - RFC 5321 path parsing, normalisation, routing tricks, IDN

SYNOPSIS
    recipient = parse_recipient("<user%remote.example@local.example>")
    recipient.domain        # "local.example"
    recipient.tricks        # frozenset({Trick.PERCENT_HACK})

DESCRIPTION
    parse_recipient() reads a RCPT TO argument with an RFC 5321 Path grammar
    (RFC 6531 for UTF-8): an optional source route, a dot-string or quoted
    local part, and a domain or address literal. The local part ends at the
    LAST unquoted "@", because that is where an MTA splits it; any other "@"
    makes the address a relay attempt rather than a different domain.

    Two kinds of problem are told apart:

    AddressSyntaxError   the text is no address at all (control or NUL bytes,
                         bytes that are not UTF-8, unbalanced brackets, stray
                         specials, absurd lengths). Every client gets a 501.
    Trick                the address parses, but routes somewhere other than
                         its last domain says, or says nothing certain about
                         where it goes (percent hack, bang path, source route,
                         "@" inside the local part, missing, empty, malformed
                         or non-canonical domain). Fine from a trusted client,
                         a relay attempt from anyone else. relay.py decides.

    Domains are normalised to lower-case ASCII without a trailing dot, IDN
    labels to their IDNA 2008 / UTS-46 A-label ("xn--") form, so that every
    spelling of one domain compares equal.

    This module knows nothing of policy: it says what an address is.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

# RFC 5321 4.5.3.1 allows 64 octets of local part and 256 of path; real
# mail (SRS, VERP, BATV) exceeds 64, so we allow four times that.
MAX_LOCAL_PART_OCTETS = 256
MAX_DOMAIN_OCTETS = 255
MAX_PATH_OCTETS = 512

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 5322 atext: the characters a dot-string may hold unquoted.
ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                   "0123456789!#$%&'*+-/=?^_`{|}~")
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


class AddressSyntaxError(ValueError):
    """The recipient text is not an address; the message says why."""


class Trick(enum.Enum):
    """Ways an address can route elsewhere than its last domain says."""

    # Routing tricks: refused from untrusted clients even for postmaster.
    PERCENT_HACK = "percent-hack"           # user%remote@local
    BANG_PATH = "bang-path"                 # remote!user@local
    AT_IN_LOCAL_PART = "at-in-local-part"   # "user@remote"@local, user@remote@local
    SOURCE_ROUTE = "source-route"           # @local:user@remote
    # Domain tricks: the address does not name one clear domain.
    NO_DOMAIN = "no-domain"                 # <user>
    EMPTY_DOMAIN = "empty-domain"           # <user@>
    MALFORMED_DOMAIN = "malformed-domain"   # user@local..example, user@[1.2.3]
    MAPPED_DOMAIN = "mapped-domain"         # fullwidth or otherwise UTS-46-mapped

    @property
    def is_routing(self) -> bool:
        return self in _ROUTING_TRICKS


_ROUTING_TRICKS = frozenset({Trick.PERCENT_HACK, Trick.BANG_PATH,
                             Trick.AT_IN_LOCAL_PART, Trick.SOURCE_ROUTE})


@dataclass(frozen=True, slots=True)
class Recipient:
    """One envelope recipient, parsed.

    path        the address as the client wrote it, without angle brackets
    local_part  the local part with quoting and escapes removed
    domain      normalised domain (A-label, lower case, no trailing dot), or
                None when there is none or it is malformed
    literal     the IP address of an address literal such as [192.0.2.1]
    route       normalised domains of a source route, in order
    quoted      the local part was a quoted string or held escapes
    tricks      the routing and domain tricks found
    """

    path: str
    local_part: str
    domain: str | None
    literal: IPAddress | None
    route: tuple[str, ...]
    quoted: bool
    tricks: frozenset[Trick]

    @property
    def routing_tricks(self) -> frozenset[Trick]:
        return frozenset(t for t in self.tricks if t.is_routing)

    @property
    def is_postmaster(self) -> bool:
        return self.local_part.lower() == "postmaster"

    @property
    def is_bare_postmaster(self) -> bool:
        """<postmaster> with no domain, which RFC 5321 says must be accepted."""
        return (self.is_postmaster and not self.quoted and not self.route
                and self.tricks == frozenset({Trick.NO_DOMAIN}))


# Pure and called for every recipient: a busy server sees the same ones again
# and again (a mailing list, a popular mailbox). Bad input raises and is not
# cached. lru_cache is thread-safe.
@functools.lru_cache(maxsize=8192)
def parse_recipient(text: str) -> Recipient:
    """Parse a RCPT TO argument such as "<user@example.com>".

    Angle brackets are optional (Sendmail passes what the client wrote).
    Raises AddressSyntaxError when the text is not an address.
    """
    _refuse_unreadable(text)
    path = _strip_brackets(text.strip(" "))
    if not path:
        raise AddressSyntaxError("empty recipient address")
    route, mailbox = _split_source_route(path)
    local_text, domain_text = _split_mailbox(mailbox)
    local_part, quoted = _decode_local_part(local_text)
    tricks: set[Trick] = set()
    if route:
        tricks.add(Trick.SOURCE_ROUTE)
    if "%" in local_part:
        tricks.add(Trick.PERCENT_HACK)
    if "!" in local_part:
        tricks.add(Trick.BANG_PATH)
    if "@" in local_part:
        tricks.add(Trick.AT_IN_LOCAL_PART)
    domain: str | None = None
    literal: IPAddress | None = None
    if domain_text is None:
        tricks.add(Trick.NO_DOMAIN)
    elif domain_text == "":
        tricks.add(Trick.EMPTY_DOMAIN)
    elif domain_text.startswith("["):
        literal = parse_address_literal(domain_text)
        if literal is None:
            tricks.add(Trick.MALFORMED_DOMAIN)
    else:
        try:
            domain, mapped = _normalise_mail_domain(domain_text)
        except ValueError:
            tricks.add(Trick.MALFORMED_DOMAIN)
        else:
            if mapped:
                tricks.add(Trick.MAPPED_DOMAIN)
    return Recipient(path=path, local_part=local_part, domain=domain,
                     literal=literal, route=route, quoted=quoted,
                     tricks=frozenset(tricks))


def normalise_domain(text: str) -> str:
    """Return the canonical form of a domain name, for comparison.

    Lower case, one trailing dot removed, IDN labels as A-labels (IDNA 2008
    with UTS-46 mapping). Raises ValueError for something that is no domain.
    Used for configured domains too, so both sides of a comparison agree.
    """
    return _normalise_mail_domain(text)[0]


def transitional_variant(domain: str) -> str | None:
    """The IDNA 2003 ("transitional") form of a normalised domain, if it differs.

    straße.test is xn--strae-oqa.test under IDNA 2008 but strasse.test under
    IDNA 2003, which Postfix uses. None when the two agree (almost always).
    """
    if "xn--" not in domain:
        return None
    try:
        ulabel = idna.decode(domain)
        mapped = ulabel.translate(_TRANSITIONAL_DEVIATIONS)
        if mapped == ulabel:
            return None
        return normalise_domain(mapped)
    except (idna.IDNAError, ValueError):
        return None


# The four UTS-46 deviation characters, as transitional processing maps them
# (the idna package no longer implements transitional processing).
_TRANSITIONAL_DEVIATIONS = {0x00DF: "ss", 0x03C2: "\u03c3", 0x200C: None, 0x200D: None}


@functools.lru_cache(maxsize=4096)
def mta_readings(domain: str) -> tuple[str, ...]:
    """Other domains an MTA may read a normalised domain as; () when none.

    Postfix and Sendmail map international domains the IDNA 2003 way
    (transitional_variant) and Postfix case-folds SMTPUTF8 addresses with
    full Unicode case folding (ß -> ss, ς -> σ, ...). Where their reading
    differs from ours, the mail may go to the other domain: a recipient is
    ours only if every reading is. ASCII domains have no other reading.
    """
    if "xn--" not in domain:
        return ()
    readings = set()
    variant = transitional_variant(domain)
    if variant:
        readings.add(variant)
    try:
        folded = normalise_domain(idna.decode(domain).casefold())
    except (idna.IDNAError, ValueError):
        folded = domain
    if folded != domain:
        readings.add(folded)
    return tuple(sorted(readings))


def resolved_domain(address: str) -> tuple[str | None, IPAddress | None]:
    """Domain (or literal) of an MTA-resolved address such as {rcpt_addr}.

    The MTA has already interpreted routing, so the split is at the last
    "@". Returns (None, None) when the address has no domain part; raises
    ValueError when the domain part is not a valid domain or literal.
    """
    if any("\ud800" <= char <= "\udfff" for char in address):
        raise ValueError("not UTF-8")
    address = address.strip().strip("<>")
    at = address.rfind("@")
    if at < 0:
        return None, None
    domain_text = address[at + 1:]
    if domain_text.startswith("["):
        literal = parse_address_literal(domain_text)
        if literal is None:
            raise ValueError(f"bad address literal {domain_text!r}")
        return None, literal
    return normalise_domain(domain_text), None


def shown_domain(address: str | None) -> str | None:
    """The text after the last "@" of an address as logged or shown, lower
    case, without brackets or a trailing dot; None without one. For
    counting and filtering what was decided (the report, the status page),
    never for deciding: resolved_domain() checks, this does not."""
    if not address or "@" not in address:
        return None
    return address.rsplit("@", 1)[1].strip("<> ").rstrip(".").lower() or None


def parse_address_literal(text: str) -> IPAddress | None:
    """[192.0.2.1] or [IPv6:2001:db8::1] -> address; None if malformed."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def _refuse_unreadable(text: str) -> None:
    if len(text.encode("utf-8", "surrogateescape")) > MAX_PATH_OCTETS:
        raise AddressSyntaxError("recipient address too long")
    for char in text:
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            raise AddressSyntaxError("control character in recipient address")
        if 0xD800 <= code <= 0xDFFF:
            # pymilter decodes with surrogateescape: a surrogate is a byte
            # that was not UTF-8.
            raise AddressSyntaxError("recipient address is not UTF-8")


def _strip_brackets(text: str) -> str:
    opens, closes = text.startswith("<"), text.endswith(">")
    if opens != closes:
        raise AddressSyntaxError("unbalanced angle brackets")
    inner = text[1:-1] if opens else text
    if "<" in inner or ">" in inner:
        # A quoted local part may hold them, but nothing legitimate does.
        raise AddressSyntaxError("angle bracket inside recipient address")
    return inner


def _split_source_route(path: str) -> tuple[tuple[str, ...], str]:
    """"@a,@b:user@c" -> (("a", "b"), "user@c")."""
    if not path.startswith("@"):
        return (), path
    colon = path.find(":")
    if colon < 0:
        raise AddressSyntaxError("source route without mailbox")
    hops = []
    for hop in path[:colon].split(","):
        if not hop.startswith("@") or len(hop) < 2:
            raise AddressSyntaxError("malformed source route")
        try:
            hops.append(normalise_domain(hop[1:]))
        except ValueError:
            hops.append(hop[1:].lower())
    return tuple(hops), path[colon + 1:]


def _split_mailbox(mailbox: str) -> tuple[str, str | None]:
    """Split at the last "@" outside quotes and escapes, as an MTA does."""
    last_at = -1
    in_quotes = False
    index = 0
    while index < len(mailbox):
        char = mailbox[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            in_quotes = not in_quotes
        elif char == "@" and not in_quotes:
            last_at = index
        index += 1
    if in_quotes:
        raise AddressSyntaxError("unterminated quoted string")
    if last_at < 0:
        return mailbox, None
    return mailbox[:last_at], mailbox[last_at + 1:]


def _decode_local_part(text: str) -> tuple[str, bool]:
    """Remove quoting and escapes; return (local part, was quoted)."""
    if not text:
        raise AddressSyntaxError("empty local part")
    if len(text.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        raise AddressSyntaxError("local part too long")
    if text.startswith('"'):
        if not text.endswith('"') or len(text) < 2:
            raise AddressSyntaxError("text after quoted local part")
        return _unquote(text[1:-1]), True
    if '"' in text:
        raise AddressSyntaxError("quote inside unquoted local part")
    return _unescape(text, "local part", _dot_string_char), "\\" in text


def _unquote(body: str) -> str:
    return _unescape(body, "quoted string", _quoted_char)


def _dot_string_char(char: str) -> None:
    if not (char in ATEXT or char == "." or char == "@" or ord(char) > 0x7F):
        raise AddressSyntaxError(f"character {char!r} not allowed in local part")


def _quoted_char(char: str) -> None:
    if char == '"':
        raise AddressSyntaxError("quote inside quoted string")


def _unescape(text: str, where: str, check_plain) -> str:
    """text with backslash escapes removed; check_plain(char) refuses an unescaped char."""
    decoded = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            if index + 1 >= len(text):
                raise AddressSyntaxError(f"backslash at end of {where}")
            char = text[index + 1]
            index += 1
        else:
            check_plain(char)
        decoded.append(char)
        index += 1
    return "".join(decoded)


def _normalise_mail_domain(text: str) -> tuple[str, bool]:
    """Return (A-label form, whether UTS-46 had to map characters).

    "Mapped" means the client wrote something that only becomes this domain
    after mapping beyond lower-casing (fullwidth letters, ideographic full
    stops): the MTA may not map it the same way, so from an untrusted
    client it proves nothing about where the mail goes.
    """
    if len(text.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        raise ValueError("domain too long")
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise ValueError("empty domain")
    if name.isascii():
        name = name.lower()
        labels = name.split(".")
        if not all(_LDH_LABEL.match(label) for label in labels):
            raise ValueError(f"invalid domain {text!r}")
        return name, False
    try:
        alabel = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        ulabel = idna.decode(alabel)
    except idna.IDNAError as error:
        raise ValueError(f"invalid international domain {text!r}: {error}") from None
    return alabel, ulabel != name.lower()


# ------------------------------------------------------------ IP addresses ---

def parse_network(text: str) -> IPNetwork:
    """"192.0.2.0/24", "2001:db8::/32", "::ffff:10.0.0.0/104" -> network."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


def normalise_ip(address: IPAddress) -> IPAddress:
    """v4-mapped IPv6 (::ffff:192.0.2.1) -> IPv4, so one rule covers both."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return mapped
        if address.scope_id:
            return ipaddress.IPv6Address(str(address).split("%", 1)[0])
    return address


def parse_ip(text: str) -> IPAddress:
    """"192.0.2.1", "::ffff:192.0.2.1" -> the address, v4-mapped as IPv4; ValueError."""
    return normalise_ip(ipaddress.ip_address(text))
