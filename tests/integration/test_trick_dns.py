"""Tests of TrickDnsServer itself, with dnspython and plain sockets as its client.

A DNS client's tests will trust this server to misbehave exactly as
documented; these tests are what earns that trust. Every behaviour is seen
from the wire: what arrives, from where, in which order, and when.
"""

from __future__ import annotations

import socket
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from trick_dns import SPOOF_KINDS, TrickDnsServer, free_port_pair

LISTED_NAME = "2.0.0.127.bl.example"
CLEAN_NAME = "1.0.0.127.bl.example"


def make_query(name: str = LISTED_NAME, rdtype: str = "A", **kwargs: object) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kwargs)


def udp(server: TrickDnsServer, query: dns.message.Message, timeout: float = 1.0) -> dns.message.Message:
    return dns.query.udp(query, server.listen, timeout=timeout, port=server.port)


def tcp(server: TrickDnsServer, query: dns.message.Message, timeout: float = 1.0,
        sock: socket.socket | None = None) -> dns.message.Message:
    return dns.query.tcp(query, server.listen, timeout=timeout, port=server.port, sock=sock)


def addresses(response: dns.message.Message) -> list[str]:
    return [rdata.address for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.A for rdata in rrset]


def txt_of(response: dns.message.Message) -> bytes:
    return b"".join(b"".join(rdata.strings) for rrset in response.answer for rdata in rrset)


def raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def receive(sock: socket.socket, count: int, timeout: float = 1.0) -> list[tuple[bytes, tuple, float]]:
    """count datagrams as (wire, source, arrival time), in arrival order."""
    sock.settimeout(timeout)
    packets = []
    for _ in range(count):
        wire, source = sock.recvfrom(65535)
        packets.append((wire, source, time.monotonic()))
    return packets


def tcp_frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def read_frame(sock: socket.socket) -> bytes:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "server closed the connection"
            data += chunk
        return data
    return exactly(struct.unpack("!H", exactly(2))[0])


# -- answers ------------------------------------------------------------------

def test_a_question_gets_the_address_with_the_ttl() -> None:
    with TrickDnsServer(ttl=120) as server:
        response = udp(server, make_query())
    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == ["127.0.0.2"]
    assert response.answer[0].ttl == 120


def test_no_address_means_nxdomain_with_a_soa_giving_the_negative_ttl() -> None:
    with TrickDnsServer(address=None, ttl=30, negative_ttl=5) as server:
        response = udp(server, make_query(CLEAN_NAME))
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    soa = response.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.ttl == 30
    assert soa[0].minimum == 5


def test_txt_answer_may_be_long_and_is_empty_without_txt() -> None:
    text = "listed, see https://bl.example/lookup?ip=127.0.0.2 " * 12   # > 255 bytes
    with TrickDnsServer(txt=text) as server:
        long_answer = tcp(server, make_query(rdtype="TXT"))
    with TrickDnsServer() as server:
        empty = udp(server, make_query(rdtype="TXT"))
    assert txt_of(long_answer) == text.encode()
    assert empty.rcode() == dns.rcode.NOERROR and empty.answer == []


def test_per_name_answers_serve_listed_and_unlisted_names_side_by_side() -> None:
    answers = {"3.0.0.127.BL.example.": "127.0.0.4", CLEAN_NAME: None}
    with TrickDnsServer(answers=answers, txt="listed") as server:
        default = udp(server, make_query(LISTED_NAME))
        mapped = udp(server, make_query("3.0.0.127.bl.example"))
        unlisted = udp(server, make_query(CLEAN_NAME))
        unlisted_txt = udp(server, make_query(CLEAN_NAME, "TXT"))
    assert addresses(default) == ["127.0.0.2"]
    assert addresses(mapped) == ["127.0.0.4"]
    assert unlisted.rcode() == dns.rcode.NXDOMAIN
    assert unlisted_txt.rcode() == dns.rcode.NXDOMAIN


def test_rcode_answers_every_question_with_it_and_nothing_else() -> None:
    with TrickDnsServer(rcode="SERVFAIL", txt="listed") as server:
        over_udp = udp(server, make_query())
        over_tcp = tcp(server, make_query(rdtype="TXT"))
    for response in (over_udp, over_tcp):
        assert response.rcode() == dns.rcode.SERVFAIL
        assert response.answer == [] and response.authority == []


# -- truncation and TCP -----------------------------------------------------------

def test_truncate_sets_tc_over_udp_and_tcp_on_the_same_port_answers_in_full() -> None:
    with TrickDnsServer(truncate=True) as server:
        over_udp = udp(server, make_query())
        with socket.create_connection((server.listen, server.port), timeout=1) as connection:
            first = tcp(server, make_query(), sock=connection)
            second = tcp(server, make_query(CLEAN_NAME), sock=connection)
        questions = server.questions
    assert over_udp.flags & dns.flags.TC
    assert over_udp.answer == [] and len(over_udp.question) == 1
    assert not first.flags & dns.flags.TC
    assert addresses(first) == ["127.0.0.2"] and addresses(second) == ["127.0.0.2"]
    tcp_ports = {port for transport, _, _, _, port in questions if transport == "tcp"}
    assert len(tcp_ports) == 1   # both questions came on the one connection


def test_one_tcp_connection_carries_pipelined_questions() -> None:
    queries = [make_query(LISTED_NAME), make_query(CLEAN_NAME, "TXT")]
    with TrickDnsServer(txt="why") as server, \
            socket.create_connection((server.listen, server.port), timeout=1) as connection:
        connection.sendall(b"".join(tcp_frame(query.to_wire()) for query in queries))
        replies = [dns.message.from_wire(read_frame(connection)) for _ in queries]
    assert sorted(reply.id for reply in replies) == sorted(query.id for query in queries)
    by_id = {reply.id: reply for reply in replies}
    assert addresses(by_id[queries[0].id]) == ["127.0.0.2"]
    assert txt_of(by_id[queries[1].id]) == b"why"


def test_a_udp_answer_too_big_for_the_querier_is_truncated_like_a_real_server_does() -> None:
    with TrickDnsServer(txt_size=1500) as server:
        plain = udp(server, make_query(rdtype="TXT"))
        with_edns = udp(server, make_query(rdtype="TXT", use_edns=0, payload=4096))
        server.truncate = True
        forced = udp(server, make_query(rdtype="TXT", use_edns=0, payload=4096))
        over_tcp = tcp(server, make_query(rdtype="TXT"))
    assert plain.flags & dns.flags.TC and plain.answer == []
    assert not with_edns.flags & dns.flags.TC and len(txt_of(with_edns)) == 1500
    assert forced.flags & dns.flags.TC and forced.answer == []
    assert len(txt_of(over_tcp)) == 1500


# -- silence, loss, and delay -------------------------------------------------

def test_silent_server_records_questions_and_never_answers() -> None:
    with TrickDnsServer(silent=True) as server:
        with pytest.raises(dns.exception.Timeout):
            udp(server, make_query(), timeout=0.2)
        with pytest.raises(dns.exception.Timeout):
            tcp(server, make_query(), timeout=0.2)
        assert server.question_count(transport="udp") == 1
        assert server.question_count(transport="tcp") == 1


def test_silent_udp_keeps_tcp_answering() -> None:
    with TrickDnsServer(silent_udp=True) as server:
        with pytest.raises(dns.exception.Timeout):
            udp(server, make_query(), timeout=0.2)
        assert addresses(tcp(server, make_query())) == ["127.0.0.2"]


def test_drop_first_loses_the_first_udp_questions_only() -> None:
    with TrickDnsServer(drop_first=2) as server:
        assert addresses(tcp(server, make_query())) == ["127.0.0.2"]
        for _ in range(2):
            with pytest.raises(dns.exception.Timeout):
                udp(server, make_query(), timeout=0.2)
        assert addresses(udp(server, make_query())) == ["127.0.0.2"]
        assert server.question_count(transport="udp") == 3


def test_delayed_questions_are_answered_side_by_side() -> None:
    queries = [make_query(LISTED_NAME), make_query(CLEAN_NAME)]
    with TrickDnsServer(delay=0.4) as server, raw_socket() as sock:
        sent = time.monotonic()
        for query in queries:
            sock.sendto(query.to_wire(), (server.listen, server.port))
        packets = receive(sock, 2)
    elapsed = packets[-1][2] - sent
    assert 0.35 <= elapsed < 0.7, elapsed   # one delay, not two
    assert {dns.message.from_wire(wire).id for wire, _, _ in packets} == {q.id for q in queries}


def test_late_answer_comes_after_the_clients_deadline() -> None:
    with TrickDnsServer(late=0.3) as server, raw_socket() as sock:
        with pytest.raises(dns.exception.Timeout):
            udp(server, make_query(), timeout=0.1)
        query = make_query()
        sent = time.monotonic()
        sock.sendto(query.to_wire(), (server.listen, server.port))
        [(wire, _, arrived)] = receive(sock, 1)
    assert arrived - sent >= 0.25
    assert dns.message.from_wire(wire).id == query.id


# -- spoofing -------------------------------------------------------------------------

def spoof_exchange(server: TrickDnsServer, query: dns.message.Message,
                   count: int = 2) -> list[tuple[bytes, tuple, float]]:
    with raw_socket() as sock:
        sock.sendto(query.to_wire(), (server.listen, server.port))
        return receive(sock, count)


def check_genuine(wire: bytes, source: tuple, server: TrickDnsServer,
                  query: dns.message.Message) -> None:
    genuine = dns.message.from_wire(wire)
    assert source == (server.listen, server.port)
    assert genuine.id == query.id
    assert genuine.rcode() == dns.rcode.NXDOMAIN   # address=None: the truth is "not listed"


def check_listed(spoof: dns.message.Message) -> None:
    assert addresses(spoof) == ["127.0.0.2"]


@pytest.mark.parametrize("kind", [kind for kind in SPOOF_KINDS if kind != "garbage"])
def test_each_spoof_arrives_before_the_genuine_answer(kind: str) -> None:
    query = make_query()
    with TrickDnsServer(address=None, spoof=[kind]) as server:
        (spoof_wire, spoof_source, spoof_at), (wire, source, genuine_at) = spoof_exchange(server, query)
        check_genuine(wire, source, server, query)
        assert genuine_at - spoof_at >= 0.03   # spoof_gap = 0.05
        if kind == "short":
            assert spoof_wire == wire[:11]
            return
        spoof = dns.message.from_wire(spoof_wire)
        check_listed(spoof)
        question = spoof.question[0]
        if kind == "wrong-id":
            assert spoof.id == query.id ^ 0x5A5A != query.id
            assert question.name == query.question[0].name
        else:
            assert spoof.id == query.id
        if kind == "wrong-question":
            assert question.name.to_text() == "spoofed.0.0.127.bl.example."
            assert spoof.answer[0].name == question.name
        if kind == "wrong-type":
            assert question.name == query.question[0].name
            assert question.rdtype == dns.rdatatype.TXT
        if kind == "wrong-source":
            assert spoof_source[0] == server.listen and spoof_source[1] != server.port
        elif kind == "wrong-source-address":
            assert spoof_source[0] == "127.0.0.3" == server.spoof_source_address
        else:
            assert spoof_source == (server.listen, server.port)
        if kind.startswith("wrong-source"):
            assert question.name == query.question[0].name and question.rdtype == dns.rdatatype.A


def test_garbage_arrives_first_and_is_reproducible_from_the_seed() -> None:
    query = make_query()
    runs = []
    for seed in (7, 7, 8):
        with TrickDnsServer(address=None, spoof=["garbage"], seed=seed) as server:
            (garbage, _, _), (wire, source, _) = spoof_exchange(server, query)
            check_genuine(wire, source, server, query)
            runs.append(garbage)
    assert all(len(garbage) <= 600 for garbage in runs)
    assert runs[0] == runs[1] != runs[2]


def test_several_spoofs_go_in_order_and_the_genuine_answer_may_be_withheld() -> None:
    query = make_query()
    with TrickDnsServer(address=None, spoof=["wrong-id", "short"], withhold_genuine=True) as server, \
            raw_socket() as sock:
        sock.sendto(query.to_wire(), (server.listen, server.port))
        (first, _, _), (second, _, _) = receive(sock, 2)
        with pytest.raises(socket.timeout):
            receive(sock, 1, timeout=0.3)
    assert dns.message.from_wire(first).id == query.id ^ 0x5A5A
    assert len(second) == 11


def test_spoofs_stay_off_tcp_unless_asked() -> None:
    query = make_query()
    with TrickDnsServer(address=None, spoof=["wrong-id", "wrong-source"]) as server:
        assert tcp(server, query).rcode() == dns.rcode.NXDOMAIN
        server.spoof_tcp = True
        with socket.create_connection((server.listen, server.port), timeout=1) as connection:
            connection.sendall(tcp_frame(query.to_wire()))
            frames = [dns.message.from_wire(read_frame(connection)) for _ in range(2)]
    assert frames[0].id == query.id ^ 0x5A5A and addresses(frames[0]) == ["127.0.0.2"]
    assert frames[1].id == query.id and frames[1].rcode() == dns.rcode.NXDOMAIN


def test_listening_on_127_0_0_3_spoofs_from_127_0_0_4() -> None:
    query = make_query()
    with TrickDnsServer(listen="127.0.0.3", address=None, spoof=["wrong-source-address"]) as server:
        assert server.nameserver == f"127.0.0.3:{server.port}"
        (_, spoof_source, _), (wire, source, _) = spoof_exchange(server, query)
        check_genuine(wire, source, server, query)
    assert spoof_source[0] == "127.0.0.4"


# -- bookkeeping and settings ------------------------------------------------------

def test_questions_are_recorded_with_transport_and_source() -> None:
    with TrickDnsServer() as server, raw_socket() as sock:
        sock.sendto(make_query("Mixed.Case.Example.", "TXT").to_wire(), (server.listen, server.port))
        receive(sock, 1)
        with socket.create_connection((server.listen, server.port), timeout=1) as connection:
            tcp(server, make_query(LISTED_NAME), sock=connection)
            tcp_port = connection.getsockname()[1]
        questions = server.questions
        questions.append(("mutated", "", "", "", 0))   # a copy: the server's list is untouched
        assert server.questions == [
            ("udp", "mixed.case.example", "TXT", "127.0.0.1", sock.getsockname()[1]),
            ("tcp", LISTED_NAME, "A", "127.0.0.1", tcp_port),
        ]
        assert server.question_count() == 2
        assert server.question_count(qname="MIXED.case.example.") == 1
        assert server.question_count(qtype="a", transport="tcp") == 1
        assert server.question_count(qtype="A", transport="udp") == 0


def test_settings_change_while_the_server_runs() -> None:
    with TrickDnsServer() as server:
        server.address = "127.0.0.9"
        assert addresses(udp(server, make_query())) == ["127.0.0.9"]
        server.silent = True
        with pytest.raises(dns.exception.Timeout):
            udp(server, make_query(), timeout=0.2)
        server.silent = False
        server.rcode = "REFUSED"
        assert udp(server, make_query()).rcode() == dns.rcode.REFUSED
        with pytest.raises(ValueError):
            server.spoof = ["wrong-colour"]


def test_the_server_stays_on_loopback() -> None:
    with pytest.raises(ValueError):
        TrickDnsServer(listen="192.0.2.1")


def test_free_port_pair_is_free_for_udp_and_tcp() -> None:
    port = free_port_pair()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_socket, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp_socket:
        udp_socket.bind(("127.0.0.1", port))
        tcp_socket.bind(("127.0.0.1", port))
