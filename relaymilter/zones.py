"""zones - DNSBL and DNSWL zones, their answer codes, and what an answer means.

NAME
    zones - Zone, CodeRange, Status, classify(), ZoneAnswer, ListingResult, summarise()

SYNOPSIS
    zone = Zone.build("zen.spamhaus.org", weight=1, codes=["127.0.0.2-127.0.0.11"])
    classify(zone, ["127.0.0.4"])            # Status.LISTED
    classify(zone, ["127.255.255.254"])      # Status.ZONE_ERROR, whatever the codes say
    result = summarise(client, [ZoneAnswer(zone, Status.LISTED)], threshold=1)
    result.listed, result.reply_zone

DESCRIPTION
    The types the configuration, the DNSBL checker (dnsbl.py) and the
    engine share, and the rules that need no DNS: config.py builds Zones
    from [[dnsbl.zone]] tables, dnsbl.py fills ZoneAnswers, the engine
    reads ListingResults. Pure: no DNS library, no threads, no sockets, so
    that reading a config or deciding on a result loads none of them.

    Codes. A zone lists a client when its A answer is one of the zone's
    codes (default 127.0.0.0/8 minus 127.255.255.0/24). An answer in
    127.255.255.0/24 (Spamhaus: query refused, public resolver, rate
    limited) or outside 127.0.0.0/8 is a ZONE_ERROR, never a listing:
    codes may not include such addresses, and one of them in an answer
    makes the whole answer an error.

    Verdict. The score is the sum of the weights of the LISTED zones; a
    negative weight makes a zone an allowlist (DNSWL). The client is listed
    when score >= threshold; the reply names the listing zone with the
    highest positive weight, with its TXT record when it has one.

    Zone names are checked without a DNS library: labels of 1 to 63 octets
    (an IDN label as its IDNA 2003 A-label, as dnspython reads it), and no
    longer than MAX_ZONE_NAME_LENGTH, so that an IPv6 client's query name
    still fits in 253 characters.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Sequence

from relaymilter.address import IPAddress
from relaymilter.cache import FetchSource

LOOPBACK_NETWORK = ipaddress.IPv4Network("127.0.0.0/8")
ERROR_NETWORK = ipaddress.IPv4Network("127.255.255.0/24")

# The longest reverse name, an IPv6 client's 32 nibbles with their dots,
# plus the dot before the zone, must still fit a 253-character DNS name.
MAX_ZONE_NAME_LENGTH = 253 - 64


# ------------------------------------------------------------------ codes ---

@dataclass(frozen=True)
class CodeRange:
    """An inclusive range of answer addresses that mean "listed"."""

    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    def __contains__(self, address: object) -> bool:
        return isinstance(address, ipaddress.IPv4Address) and self.first <= address <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


# 127.0.0.0/8 minus the error codes in 127.255.255.0/24.
DEFAULT_CODES: tuple[CodeRange, ...] = (
    CodeRange(LOOPBACK_NETWORK.network_address, ERROR_NETWORK.network_address - 1),
)


def parse_codes(entries: Iterable[str]) -> tuple[CodeRange, ...]:
    """["127.0.0.2-127.0.0.11", "127.0.0.20", "127.0.1.0/24"] -> ranges.

    Raises ValueError naming the entry: codes must lie in 127.0.0.0/8 and
    outside 127.255.255.0/24, because any other answer is a zone error and
    can never list; a list of no codes could never list either.
    """
    if isinstance(entries, str):
        raise ValueError(f"codes must be a list, not the string {entries!r}")
    ranges = tuple(_parse_code(entry) for entry in entries)
    if not ranges:
        raise ValueError("no codes: the zone could never list anyone")
    return ranges


def _parse_code(entry: str) -> CodeRange:
    text = entry.strip()
    try:
        if "/" in text:
            network = ipaddress.IPv4Network(text, strict=True)
            first, last = network.network_address, network.broadcast_address
        elif "-" in text:
            low, high = text.split("-", 1)
            first, last = ipaddress.IPv4Address(low.strip()), ipaddress.IPv4Address(high.strip())
        else:
            first = last = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"{entry!r} is not an IPv4 address, range A-B or network") from None
    if first > last:
        raise ValueError(f"{entry!r} is an empty range: {first} comes after {last}")
    if first not in LOOPBACK_NETWORK or last not in LOOPBACK_NETWORK:
        raise ValueError(f"{entry!r} is outside 127.0.0.0/8: such answers are zone errors")
    if first <= ERROR_NETWORK.broadcast_address and last >= ERROR_NETWORK.network_address:
        raise ValueError(f"{entry!r} overlaps 127.255.255.0/24, the error codes")
    return CodeRange(first, last)


# ------------------------------------------------------------------ zones ---

TXT_MODES = ("listed", "with-a", "off")


@dataclass(frozen=True)
class Zone:
    """One DNSBL or DNSWL zone.

    name          the DNS zone, lower case, no trailing dot (may hold a key)
    display_name  what replies, logs and counters call it
    weight        added to the score when the zone lists the client;
                  negative for an allowlist
    codes         answer addresses that mean "listed"
    txt           when a blocklist's TXT record (the reply text) is asked:
                  "listed" (after an A answer that lists the client),
                  "with-a" (together with A: no extra round trip, one more
                  query per new client), "off" (never)
    """

    name: str
    display_name: str
    weight: int
    codes: tuple[CodeRange, ...] = DEFAULT_CODES
    txt: str = "listed"

    @property
    def shows_txt(self) -> bool:
        """Is this zone's TXT record ever asked (a blocklist whose txt is not off)?"""
        return self.weight > 0 and self.txt != "off"

    @classmethod
    def build(cls, name: str, weight: int = 1, codes: Iterable[str] | None = None,
              display_name: str | None = None, txt: str = "listed") -> "Zone":
        """A zone from config values; raises ValueError saying what is wrong."""
        zone_name = normalise_zone_name(name)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"weight must be an integer, not {weight!r}")
        shown = zone_name if display_name is None else display_name.strip()
        if not shown or not shown.isprintable():
            raise ValueError(f"display_name {display_name!r} must be printable and not empty")
        ranges = DEFAULT_CODES if codes is None else parse_codes(codes)
        if txt not in TXT_MODES:
            raise ValueError(f"txt must be one of {', '.join(TXT_MODES)}, not {txt!r}")
        return cls(name=zone_name, display_name=shown, weight=weight, codes=ranges, txt=txt)

    def lists(self, address: ipaddress.IPv4Address) -> bool:
        return any(address in code for code in self.codes)


def normalise_zone_name(name: str) -> str:
    """"Zen.Spamhaus.ORG." -> "zen.spamhaus.org"; ValueError if not a DNS name."""
    text = name.strip().rstrip(".").lower()
    if not text:
        raise ValueError("empty zone name")
    for label in text.split("."):
        problem = _label_problem(label)
        if problem:
            raise ValueError(f"{name!r} is not a DNS name: {problem}")
    if len(text) > MAX_ZONE_NAME_LENGTH:
        raise ValueError(f"{name!r} is too long: with an IPv6 client's 32 nibbles "
                         f"the query name would pass 253 characters")
    return text


def _label_problem(label: str) -> str | None:
    """Why label cannot be a DNS label, or None."""
    if not label:
        return "a label is empty"
    try:
        # An IDN label counts as its A-label (the stdlib's IDNA 2003 codec,
        # the form dnspython puts on the wire); it refuses one over 63 octets.
        label.encode("idna")
    except UnicodeError:
        return f"label {label!r} is over 63 octets or no valid IDN label"
    return None


# ---------------------------------------------------------------- answers ---

class Status(enum.Enum):
    """What one zone's answer means for one client."""

    LISTED = "listed"
    NOT_LISTED = "not-listed"
    ZONE_ERROR = "zone-error"
    TIMEOUT = "timeout"
    DNS_FAILURE = "dns-failure"
    DISABLED = "disabled"


PROBLEMS = frozenset({Status.ZONE_ERROR, Status.TIMEOUT, Status.DNS_FAILURE})


def is_error_code(address: ipaddress.IPv4Address) -> bool:
    """Outside 127.0.0.0/8 or inside 127.255.255.0/24: a zone error."""
    return address not in LOOPBACK_NETWORK or address in ERROR_NETWORK


def classify(zone: Zone, addresses: Sequence[str]) -> Status:
    """LISTED, NOT_LISTED or ZONE_ERROR for one zone's A answer.

    One error code (or a record that is no IPv4 address) makes the whole
    answer a ZONE_ERROR: an answer that says "something is wrong" is no
    evidence either way.
    """
    parsed = []
    for text in addresses:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            return Status.ZONE_ERROR
        if is_error_code(address):
            return Status.ZONE_ERROR
        parsed.append(address)
    return Status.LISTED if any(zone.lists(address) for address in parsed) else Status.NOT_LISTED


# ---------------------------------------------------------------- results ---

@dataclass(frozen=True)
class ZoneAnswer:
    """One zone's answer about one client, classified."""

    zone: Zone
    status: Status
    addresses: tuple[str, ...] = ()
    ttl: int | None = None
    nxdomain: bool = False
    txt: str | None = None          # only when LISTED
    source: FetchSource | None = None   # None: never asked (DISABLED)

    @property
    def contribution(self) -> int:
        return self.zone.weight if self.status is Status.LISTED else 0


@dataclass(frozen=True)
class ListingResult:
    """The verdict on one client: listed when score >= threshold.

    reply_zone and txt come from the listing zone with the highest positive
    weight (the first in config order on a tie); both are None when the
    client is not listed.
    """

    client: IPAddress
    answers: tuple[ZoneAnswer, ...]
    score: int
    threshold: int
    listed: bool
    reply_zone: str | None
    txt: str | None


def reply_answer(answers: Sequence[ZoneAnswer], threshold: int) -> ZoneAnswer | None:
    """The answer a refusal names (and shows the TXT of): the listing zone with
    the highest positive weight, first in config order on a tie; None when
    the client is not listed."""
    if sum(answer.contribution for answer in answers) < threshold:
        return None
    blocking = [answer for answer in answers
                if answer.status is Status.LISTED and answer.zone.weight > 0]
    return max(blocking, key=lambda answer: answer.zone.weight, default=None)


def summarise(client: IPAddress, answers: Sequence[ZoneAnswer], threshold: int) -> ListingResult:
    """Weights of the listing zones -> score -> verdict and reply zone."""
    score = sum(answer.contribution for answer in answers)
    listed = score >= threshold
    reply = reply_answer(answers, threshold) if listed else None
    return ListingResult(client=client, answers=tuple(answers), score=score, threshold=threshold,
                         listed=listed, reply_zone=reply.zone.display_name if reply else None,
                         txt=reply.txt if reply else None)

