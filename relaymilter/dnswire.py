"""dnswire - the DNS messages relaymilter sends and reads, on the wire.

NAME
    dnswire - build one-question queries; read their answers, cheaply and strictly

SYNOPSIS
    asked = question("2.0.0.127.zen.example", A)
    packet = query(0x1f2e, asked)
    answer = read_answer(reply, 0x1f2e, asked)    # None: not the answer to this query

DESCRIPTION
    A DNSBL client asks one thing, again and again: an A or TXT question
    about one name, class IN. This module writes that query and reads its
    answer, and nothing else of DNS. dnspython does all of it, but at about
    150 microseconds of CPU for a query and its answer, seven times what
    these few struct calls cost. In a botnet storm every client is new, so
    this is the cost of every connection. tests/unit/test_dnswire.py holds
    dnspython up as the oracle for what is read here.

    Matching. read_answer() returns None for a packet that is not the
    answer to this query: not a response, another ID, another opcode, not
    exactly one question, or another question (the name compared without
    regard to letter case, type and class exactly). A caller drops such a
    packet and keeps waiting, so a forged packet costs the forger the race,
    not us the lookup. A packet that is the answer but cannot be read
    (cut short, a name that runs off the end, a record longer than the
    packet) raises MalformedAnswer; it is dropped the same way.

    Cost follows the answer. NXDOMAIN and NODATA, most answers about
    clients, are read from the header and the authority section's SOA (the
    negative TTL, RFC 2308: the smaller of the SOA's TTL and its MINIMUM).
    A truncated answer (TC) is returned at once, unread, for a retry over
    TCP. Only answers with records are walked record by record; the
    records of the type asked become text: A as a dotted quad, TXT as its
    character-strings joined (UTF-8, undecodable bytes replaced), and their
    smallest TTL the answer's. A TTL with its top bit set counts as 0
    (RFC 2181 section 8).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

A = 1
SOA = 6
TXT = 16
IN = 1
TYPE_NAMES = {"A": A, "TXT": TXT}

NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5

HEADER = struct.Struct("!6H")
RECORD = struct.Struct("!HHIH")     # type, class, TTL, RDLENGTH after the owner name
FLAG_RESPONSE = 0x8000
FLAG_TRUNCATED = 0x0200
FLAG_RECURSION_DESIRED = 0x0100
OPCODE_MASK = 0x7800
MAX_TTL = 0x7FFFFFFF
MAX_NAME = 255


class MalformedAnswer(ValueError):
    """The answer to our query, but not readable as DNS."""


@dataclass(frozen=True, slots=True)
class WireAnswer:
    """What a query's answer says.

    records is empty for NXDOMAIN, NODATA, an error rcode and a truncated
    answer; ttl is then the negative TTL (0 without a SOA).
    """

    rcode: int
    records: tuple[str, ...] = ()
    ttl: int = 0
    truncated: bool = False


def question(name: str, qtype: int) -> bytes:
    """The question section for name (lower-cased, no trailing dot needed), class IN.

    Raises ValueError for a name DNS cannot carry: an empty or over-long
    label, over 255 octets, or not ASCII.
    """
    labels = name.lower().rstrip(".").split(".")
    encoded = bytearray()
    for label in labels:
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"a DNS label must have 1 to 63 octets, not {len(raw)}")
        encoded.append(len(raw))
        encoded += raw
    encoded.append(0)
    if len(encoded) > MAX_NAME:
        raise ValueError(f"a DNS name must have at most {MAX_NAME} octets, not {len(encoded)}")
    return bytes(encoded) + struct.pack("!HH", qtype, IN)


def query(query_id: int, asked: bytes) -> bytes:
    """A recursive query (RD set) with the one question asked."""
    return HEADER.pack(query_id, FLAG_RECURSION_DESIRED, 1, 0, 0, 0) + asked


def read_answer(packet: bytes, query_id: int, asked: bytes) -> WireAnswer | None:
    """The answer in packet to query (query_id, asked); None if it is not that answer."""
    end = HEADER.size + len(asked)
    if len(packet) < end:
        return None
    answer_id, flags, questions, answers, authorities, _ = HEADER.unpack_from(packet)
    if answer_id != query_id or not flags & FLAG_RESPONSE or flags & OPCODE_MASK \
            or questions != 1:
        return None
    if packet[end - 4:end] != asked[-4:] or packet[HEADER.size:end - 4].lower() != asked[:-4]:
        return None
    rcode = flags & 0x000F
    if flags & FLAG_TRUNCATED:
        return WireAnswer(rcode, truncated=True)
    if rcode not in (NOERROR, NXDOMAIN):
        return WireAnswer(rcode)
    if rcode == NOERROR and answers:
        records, ttl, offset = _records(packet, end, answers, struct.unpack("!H", asked[-4:-2])[0])
        if records:
            return WireAnswer(rcode, records, ttl)
    else:
        offset = end
        if answers:     # NXDOMAIN with records (a CNAME to a name that does not exist)
            offset = _skip_records(packet, offset, answers)
    return WireAnswer(rcode, (), _negative_ttl(packet, offset, authorities))


def _records(packet: bytes, offset: int, count: int, qtype: int) -> tuple[tuple[str, ...], int, int]:
    """The answer section's records of qtype as text, the smallest TTL, the offset after."""
    found = []
    ttl = MAX_TTL
    for _ in range(count):
        offset = _skip_name(packet, offset)
        rtype, rclass, rttl, length = _record_header(packet, offset)
        offset += RECORD.size
        data_end = offset + length
        if data_end > len(packet):
            raise MalformedAnswer("a record runs past the end of the packet")
        ttl = min(ttl, _ttl(rttl))
        if rtype == qtype and rclass == IN:
            found.append(_text(packet, offset, data_end, rtype))
        offset = data_end
    return tuple(found), (ttl if found else 0), offset


def _skip_records(packet: bytes, offset: int, count: int) -> int:
    for _ in range(count):
        offset = _skip_name(packet, offset)
        length = _record_header(packet, offset)[3]
        offset += RECORD.size + length
        if offset > len(packet):
            raise MalformedAnswer("a record runs past the end of the packet")
    return offset


def _negative_ttl(packet: bytes, offset: int, count: int) -> int:
    """RFC 2308: min(SOA TTL, SOA MINIMUM) of the authority section's SOA, else 0."""
    for _ in range(count):
        offset = _skip_name(packet, offset)
        rtype, _, rttl, length = _record_header(packet, offset)
        offset += RECORD.size + length
        if offset > len(packet):
            raise MalformedAnswer("a record runs past the end of the packet")
        if rtype == SOA:
            if length < 22:     # two names of one octet at least, five 32-bit numbers
                raise MalformedAnswer("a SOA record too short for its fields")
            minimum = struct.unpack_from("!I", packet, offset - 4)[0]
            return min(_ttl(rttl), _ttl(minimum))
    return 0


def _record_header(packet: bytes, offset: int) -> tuple[int, int, int, int]:
    if offset + RECORD.size > len(packet):
        raise MalformedAnswer("a record cut short")
    return RECORD.unpack_from(packet, offset)


def _skip_name(packet: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at offset."""
    size = len(packet)
    while True:
        if offset >= size:
            raise MalformedAnswer("a name runs past the end of the packet")
        length = packet[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > size:
                raise MalformedAnswer("a compression pointer cut short")
            return offset + 2   # a pointer ends the name: where it points is not read
        if length & 0xC0:
            raise MalformedAnswer("a label type DNS does not define")
        offset += 1 + length


def _text(packet: bytes, start: int, end: int, rtype: int) -> str:
    if rtype == A:
        if end - start != 4:
            raise MalformedAnswer("an A record that is not 4 octets")
        return "%d.%d.%d.%d" % tuple(packet[start:end])
    strings = bytearray()           # TXT: <length><octets>, repeated
    while start < end:
        length = packet[start]
        start += 1
        if start + length > end:
            raise MalformedAnswer("a TXT string runs past its record")
        strings += packet[start:start + length]
        start += length
    return strings.decode("utf-8", "replace")


def _ttl(value: int) -> int:
    return value if value <= MAX_TTL else 0
