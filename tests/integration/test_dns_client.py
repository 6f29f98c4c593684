"""dnsclient.DnsResolver against a DNS server that misbehaves on purpose (trick_dns).

The resolver runs on the process's real I/O loop and talks UDP and TCP to
TrickDnsServer on loopback: truncation and the retry over TCP, a dead
first name server, SERVFAIL, spoofed answers of every kind, answers after
the deadline, and the randomness of IDs and source ports.
"""

from __future__ import annotations

import time

import pytest
from trick_dns import LISTED, SPOOF_KINDS, TrickDnsServer

from relaymilter import dnsclient
from relaymilter.cache import LookupCache
from relaymilter.dnsbl import DnsblChecker
from relaymilter.dnsclient import DnsFailure, DnsResolver, DnsTimeout
from relaymilter.zones import Status, Zone

NAME = "2.0.0.127.bl.trick"


@pytest.fixture
def resolvers():
    made = []

    def make(servers, timeout=2.0):
        resolver = DnsResolver([server.nameserver for server in servers], timeout=timeout)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        resolver.close()


def test_an_answer_and_an_nxdomain_with_its_negative_ttl(resolvers):
    with TrickDnsServer(answers={NAME: LISTED, "1.0.0.127.bl.trick": None}, ttl=300,
                        negative_ttl=45) as server:
        resolver = resolvers([server])
        answer = resolver.query(NAME, "A")
        assert (answer.records, answer.ttl, answer.nxdomain) == ((LISTED,), 300, False)
        answer = resolver.query("1.0.0.127.bl.trick", "A")
        assert (answer.records, answer.ttl, answer.nxdomain) == ((), 45, True)


def test_a_truncated_answer_is_asked_again_over_tcp(resolvers):
    with TrickDnsServer(truncate=True, txt="Listed, see https://bl.trick/") as server:
        resolver = resolvers([server])
        assert resolver.query(NAME, "TXT").records == ("Listed, see https://bl.trick/",)
        assert server.question_count(transport="udp") == 1
        assert server.question_count(transport="tcp") == 1


def test_a_dead_first_name_server_is_asked_last_after_a_few_misses(resolvers):
    with TrickDnsServer(silent=True) as dead, TrickDnsServer(address=LISTED) as alive:
        resolver = resolvers([dead, alive], timeout=1.0)      # each try waits 0.5 s
        took = []
        for index in range(8):
            started = time.monotonic()
            answer = resolver.query(f"{index}.0.0.127.bl.trick", "A")
            took.append(time.monotonic() - started)
            assert answer.records == (LISTED,)
        first = dnsclient.SUSPECT_AFTER
        assert all(0.45 <= seconds < 1.0 for seconds in took[:first]), took
        assert all(seconds < 0.2 for seconds in took[first:]), took
        assert dead.question_count() == first


def test_servfail_moves_the_query_to_the_next_server(resolvers):
    with TrickDnsServer(rcode="SERVFAIL") as failing, TrickDnsServer(address=LISTED) as good:
        assert resolvers([failing, good]).query(NAME, "A").records == (LISTED,)
        assert failing.question_count() == 1 and good.question_count() == 1


def test_servfail_from_every_server_is_a_failure_at_once(resolvers):
    with TrickDnsServer(rcode="SERVFAIL") as one, TrickDnsServer(rcode="REFUSED") as two:
        started = time.monotonic()
        with pytest.raises(DnsFailure):
            resolvers([one, two]).query(NAME, "A")
        assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("kind", SPOOF_KINDS)
def test_a_spoofed_answer_is_dropped_and_the_genuine_one_taken(resolvers, kind):
    # The genuine answer is NXDOMAIN; every spoof says "listed", first.
    with TrickDnsServer(address=None, spoof=[kind], spoof_gap=0.1) as server:
        resolver = resolvers([server])
        answer = resolver.query(NAME, "A")
        assert answer.nxdomain and answer.records == ()
        if kind.startswith("wrong-source"):
            assert resolver.stray_answers == 0      # the kernel never delivered it
        else:
            assert resolver.stray_answers >= 1


def test_spoofed_answers_alone_are_never_taken(resolvers):
    with TrickDnsServer(address=None, spoof=list(SPOOF_KINDS), withhold_genuine=True) as server:
        with pytest.raises(DnsTimeout):
            resolvers([server], timeout=0.6).query(NAME, "A")


def test_an_answer_after_the_deadline_is_a_timeout_and_then_dropped(resolvers):
    with TrickDnsServer(address=LISTED, late=0.8) as server:
        resolver = resolvers([server], timeout=0.4)
        started = time.monotonic()
        with pytest.raises(DnsTimeout):
            resolver.query(NAME, "A")
        assert 0.35 <= time.monotonic() - started < 0.6
        time.sleep(0.8)             # the late answers arrive and find no query
        assert resolver.stray_answers >= 1
        server.late = 0
        assert resolver.query(NAME, "A").records == (LISTED,)


def test_query_ids_and_source_ports_vary_and_sockets_are_renewed(resolvers, monkeypatch):
    monkeypatch.setattr(dnsclient, "SOCKET_QUERIES", 5)
    with TrickDnsServer(address=None) as server:
        resolver = resolvers([server])
        for index in range(60):
            resolver.query(f"{index}.9.0.127.bl.trick", "A")
        ports = {port for _, _, _, _, port in server.questions}
        # 4 sockets in the pool, each replaced after 5 queries: 12 at least.
        assert len(ports) >= 12


def test_a_checker_is_not_fooled_by_a_spoof_that_says_listed():
    zone = Zone.build("bl.trick", weight=1)
    with TrickDnsServer(address=None, spoof=["wrong-id", "wrong-question", "short"]) as server:
        checker = DnsblChecker([zone], DnsResolver([server.nameserver], timeout=2.0),
                               LookupCache(100, 60, 3600), timeout=2.0)
        try:
            result = checker.lookup("127.0.0.2")
        finally:
            checker.close()
        assert not result.listed
        assert [answer.status for answer in result.answers] == [Status.NOT_LISTED]


@pytest.mark.parametrize("txt, round_trips", [("listed", 2), ("with-a", 1)])
def test_a_listed_clients_txt_costs_a_round_trip_unless_asked_with_a(txt, round_trips):
    delay = 0.3
    zone = Zone.build("bl.trick", weight=1, txt=txt)
    with TrickDnsServer(address=LISTED, txt="Listed, see https://bl.trick/",
                        delay=delay) as server:
        checker = DnsblChecker([zone], DnsResolver([server.nameserver], timeout=2.0),
                               LookupCache(100, 60, 3600), timeout=2.0)
        try:
            started = time.monotonic()
            result = checker.lookup("127.0.0.2")
            took = time.monotonic() - started
        finally:
            checker.close()
    assert result.listed and result.txt == "Listed, see https://bl.trick/"
    assert round_trips * delay <= took < (round_trips + 0.6) * delay


def test_an_allowlisted_client_does_not_wait_for_a_txt_it_never_shows():
    # One server lists everyone on both zones, 0.3 s late; the allowlist wins.
    delay = 0.3
    zones = [Zone.build("bl.trick", weight=1), Zone.build("wl.trick", weight=-2)]
    with TrickDnsServer(address=LISTED, txt="never shown", delay=delay) as server:
        checker = DnsblChecker(zones, DnsResolver([server.nameserver], timeout=2.0),
                               LookupCache(100, 60, 3600), timeout=2.0)
        try:
            started = time.monotonic()
            result = checker.start("127.0.0.2").result()
            took = time.monotonic() - started
        finally:
            checker.close()
    assert not result.listed and result.score == -1
    assert delay <= took < 1.6 * delay


def test_a_storm_of_new_clients_leaves_no_work_for_the_garbage_collector(resolvers):
    """Every request of a storm is freed by reference counting (no cycles), and
    what the cache keeps is untracked by the collector: tracked, a full cache
    made each full collection cost about 100 ms in a storm."""
    import gc
    import ipaddress
    import threading

    from relaymilter import ioloop

    io = ioloop.shared()
    with TrickDnsServer(txt="Listed, see https://bl.trick/") as server:
        checker = DnsblChecker([Zone("bl.trick", "bl.trick", 1)], resolvers([server]), LookupCache(1000),
                               timeout=2.0, threshold=1)
        clients = [ipaddress.IPv4Address("127.9.0.0") + index for index in range(1, 201)]
        gc.collect()
        gc.disable()
        try:
            for client in clients:
                listing = checker.start(client)
                ready = threading.Event()
                listing.when_ready(io, ready.set)
                assert ready.wait(5)
                assert listing.result().listed
            del listing
            cyclic = gc.collect()
            gc.collect()    # a tuple is untracked in the pass after its items are
        finally:
            gc.enable()
        assert cyclic < 20, f"{cyclic} objects were freed only by the collector"
        kept = [checker.cache.fetch(key, lambda: pytest.fail("not cached")).future.result()
                for client in clients
                for key in (("bl.trick", str(client)), ("bl.trick", str(client), "TXT"))]
        assert len(kept) == 400 and not [value for value in kept if gc.is_tracked(value)]
