"""dnswire against dnspython: the queries it writes and the answers it reads.

dnspython is the oracle: it builds the answers read here (with name
compression, as servers send them) and parses the queries written here.
The fuzz tests mutate real answers and hold read_answer() to two rules:
it returns an answer, None or raises MalformedAnswer, nothing else; and
where dnspython reads the same mutated packet as the answer to our query,
the records read here are the records it reads.
"""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from relaymilter.dnswire import (A, NOERROR, NXDOMAIN, REFUSED, SERVFAIL, TXT, MalformedAnswer,
                                 WireAnswer, query, question, read_answer)

NAME = "2.0.0.127.bl.example"
QID = 0x4A31


def asked(qtype: int = A, name: str = NAME) -> bytes:
    return question(name, qtype)


def response(qtype: str = "A", name: str = NAME, rcode: int = dns.rcode.NOERROR,
             records: list[str] | None = None, ttl: int = 300, soa: tuple[int, int] | None = None,
             cname: str | None = None, query_id: int = QID) -> dns.message.Message:
    """A response as a server would write it; soa = (SOA TTL, MINIMUM) in authority."""
    request = dns.message.make_query(name + ".", qtype)
    request.id = query_id
    message = dns.message.make_response(request)
    message.set_rcode(rcode)
    owner = name + "."
    if cname:
        message.answer.append(dns.rrset.from_text(owner, ttl, "IN", "CNAME", cname + "."))
        owner = cname + "."
    if records:
        message.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", qtype, records))
    if soa:
        zone = name.split(".", 4)[-1] + "."
        message.authority.append(dns.rrset.from_text(
            zone, soa[0], "IN", "SOA", f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {soa[1]}"))
    return message


def wire(message: dns.message.Message) -> bytes:
    return message.to_wire()


# ----------------------------------------------------------------- queries ---

def test_a_query_is_what_dnspython_reads_as_one_recursive_question():
    parsed = dns.message.from_wire(query(QID, asked(TXT, "1.2.0.192.Zen.Example.")))
    assert parsed.id == QID
    assert parsed.flags & dns.flags.RD and not parsed.flags & dns.flags.QR
    assert len(parsed.question) == 1
    assert parsed.question[0].name == dns.name.from_text("1.2.0.192.zen.example.")
    assert parsed.question[0].rdtype == dns.rdatatype.TXT
    assert parsed.question[0].rdclass == dns.rdataclass.IN


@pytest.mark.parametrize("name", ["", "a..b", "x" * 64 + ".example", ".".join(["abcdefgh"] * 30),
                                  "bücher.example"])
def test_a_name_dns_cannot_carry_is_refused(name):
    with pytest.raises(ValueError):
        question(name, A)


# ----------------------------------------------------------------- answers ---

@pytest.mark.parametrize("ttl, minimum, expected", [(3600, 900, 900), (120, 900, 120),
                                                    (0, 900, 0)])
def test_nxdomain_carries_the_smaller_of_soa_ttl_and_minimum(ttl, minimum, expected):
    answer = read_answer(wire(response(rcode=dns.rcode.NXDOMAIN, soa=(ttl, minimum))), QID,
                         asked())
    assert answer == WireAnswer(NXDOMAIN, (), expected)


def test_nxdomain_without_a_soa_has_ttl_0():
    assert read_answer(wire(response(rcode=dns.rcode.NXDOMAIN)), QID, asked()) \
        == WireAnswer(NXDOMAIN, (), 0)


def test_nodata_is_noerror_without_records_and_the_negative_ttl():
    assert read_answer(wire(response(soa=(900, 120))), QID, asked()) == WireAnswer(NOERROR, (), 120)


def test_a_records_are_dotted_quads_with_the_smallest_ttl():
    message = response(records=["127.0.0.2", "127.0.0.10"], ttl=900)
    message.answer.append(dns.rrset.from_text(NAME + ".", 40, "IN", "A", "127.0.0.4"))
    answer = read_answer(wire(message), QID, asked())
    assert answer.rcode == NOERROR and answer.ttl == 40
    assert sorted(answer.records) == ["127.0.0.10", "127.0.0.2", "127.0.0.4"]


def test_txt_strings_of_a_record_are_joined_and_undecodable_bytes_replaced():
    message = response("TXT", records=['"Listed: see" " https://bl.example/q?ip=127.0.0.2"',
                                       '"caf\\195\\169 \\255"'], ttl=60)
    answer = read_answer(wire(message), QID, asked(TXT))
    assert sorted(answer.records) == ["Listed: see https://bl.example/q?ip=127.0.0.2",
                                      "café \ufffd"]


def test_records_behind_a_cname_are_read_and_the_cname_ttl_counts():
    message = response(records=["127.0.0.2"], ttl=600, cname="2.0.0.127.real.example")
    message.answer[0].ttl = 30
    answer = read_answer(wire(message), QID, asked())
    assert answer.records == ("127.0.0.2",) and answer.ttl == 30


def test_records_of_another_type_do_not_count():
    message = response(soa=(100, 100))
    message.answer.append(dns.rrset.from_text(NAME + ".", 60, "IN", "TXT", '"not an address"'))
    assert read_answer(wire(message), QID, asked()) == WireAnswer(NOERROR, (), 100)


@pytest.mark.parametrize("rcode, code", [(dns.rcode.SERVFAIL, SERVFAIL),
                                         (dns.rcode.REFUSED, REFUSED)])
def test_an_error_rcode_is_returned_without_records(rcode, code):
    assert read_answer(wire(response(rcode=rcode)), QID, asked()) == WireAnswer(code)


def test_a_truncated_answer_is_returned_unread_for_a_retry_over_tcp():
    message = response(records=["127.0.0.2"])
    message.flags |= dns.flags.TC
    assert read_answer(wire(message), QID, asked()) == WireAnswer(NOERROR, truncated=True)


def test_a_ttl_with_its_top_bit_set_counts_as_0():
    packet = bytearray(wire(response(records=["127.0.0.2"], ttl=60)))
    at = packet.rindex(bytes([0, 0, 0, 60]))
    packet[at:at + 4] = bytes([0x80, 0, 0, 60])
    assert read_answer(bytes(packet), QID, asked()).ttl == 0


def test_the_name_is_matched_whatever_its_letter_case():
    message = response(name="2.0.0.127.BL.Example", records=["127.0.0.2"])
    assert read_answer(wire(message), QID, asked()).records == ("127.0.0.2",)


# ---------------------------------------------- packets that are not ours ---

def test_another_id_is_not_the_answer():
    assert read_answer(wire(response(records=["127.0.0.2"], query_id=QID ^ 1)), QID, asked()) \
        is None


def test_another_question_is_not_the_answer():
    spoofed = response(name="2.0.0.127.spoofed.example", records=["127.0.0.2"])
    assert read_answer(wire(spoofed), QID, asked()) is None
    assert read_answer(wire(response("TXT", records=['"x"'])), QID, asked(A)) is None


def test_a_query_is_not_an_answer():
    assert read_answer(query(QID, asked()), QID, asked()) is None


def test_a_packet_without_exactly_one_question_is_not_the_answer():
    packet = bytearray(wire(response(records=["127.0.0.2"])))
    packet[5] = 2
    assert read_answer(bytes(packet), QID, asked()) is None


@pytest.mark.parametrize("cut", [0, 5, 11, 12, 20])
def test_a_packet_cut_inside_its_question_is_not_the_answer(cut):
    assert read_answer(wire(response(records=["127.0.0.2"]))[:cut], QID, asked()) is None


def test_an_answer_cut_inside_its_records_is_malformed():
    packet = wire(response(records=["127.0.0.2"]))
    with pytest.raises(MalformedAnswer):
        read_answer(packet[:-2], QID, asked())


# -------------------------------------------------------------------- fuzz ---

def _samples() -> list[tuple[bytes, int]]:
    return [
        (wire(response(records=["127.0.0.2", "127.0.0.3"])), A),
        (wire(response(rcode=dns.rcode.NXDOMAIN, soa=(300, 60))), A),
        (wire(response(soa=(300, 60))), A),
        (wire(response("TXT", records=['"one" "two"', '"three"'])), TXT),
        (wire(response(records=["127.0.0.2"], cname="x.real.example", soa=(10, 20))), A),
    ]


def _mutate(packet: bytes, chance: random.Random) -> bytes:
    """One or two changes, most of them past the header and question (the records)."""
    data = bytearray(packet)
    for _ in range(1 if chance.random() < 0.8 else 2):
        kind = chance.randrange(4)
        first = 12 + len(asked()) if chance.random() < 0.8 else 0
        if kind == 0 and len(data) > first:         # change a byte
            data[chance.randrange(first, len(data))] = chance.randrange(256)
        elif kind == 1:                             # cut short
            del data[chance.randrange(len(data) + 1):]
        elif kind == 2:                             # insert bytes
            at = chance.randrange(min(first, len(data)), len(data) + 1)
            data[at:at] = bytes(chance.randrange(256) for _ in range(chance.randint(1, 8)))
        else:                           # trailing garbage
            data += bytes(chance.randrange(256) for _ in range(chance.randint(1, 16)))
    return bytes(data)


def _oracle(packet: bytes, qtype: int) -> tuple[str, ...] | None:
    """The records of qtype dnspython reads, when it reads packet as our answer."""
    try:
        message = dns.message.from_wire(packet)
    except Exception:
        return None
    if message.id != QID or len(message.question) != 1 or not message.flags & dns.flags.QR:
        return None
    asked_question = message.question[0]
    if asked_question.name != dns.name.from_text(NAME + ".") \
            or asked_question.rdtype != qtype or asked_question.rdclass != dns.rdataclass.IN:
        return None
    if message.flags & dns.flags.TC or message.rcode() != dns.rcode.NOERROR:
        return None
    found = []
    for rrset in message.answer:
        if rrset.rdtype == qtype and rrset.rdclass == dns.rdataclass.IN:
            for rdata in rrset:
                found.append(rdata.to_text() if qtype == A
                             else b"".join(rdata.strings).decode("utf-8", "replace"))
    return tuple(sorted(found))


def test_mutated_answers_are_read_as_dnspython_reads_them_or_refused_cleanly():
    chance = random.Random(5782)
    compared = 0
    for packet, qtype in _samples() * 2000:
        mutated = _mutate(packet, chance)
        try:
            answer = read_answer(mutated, QID, asked(qtype))
        except MalformedAnswer:
            continue
        expected = _oracle(mutated, qtype)
        if answer is None or expected is None or answer.truncated or answer.rcode != NOERROR:
            continue
        assert tuple(sorted(answer.records)) == expected, mutated.hex()
        compared += 1
    assert compared > 1000      # the comparison ran on many mutated answers, not a few


def test_random_bytes_never_raise_anything_but_malformed_answer():
    chance = random.Random(2308)
    prefix = wire(response(records=["127.0.0.2"]))[:12 + len(asked())]
    for _ in range(20000):
        tail = bytes(chance.randrange(256) for _ in range(chance.randrange(64)))
        for packet in (tail, prefix + tail):
            try:
                read_answer(packet, QID, asked())
            except MalformedAnswer:
                pass
