"""The DNSBL engine against a real rbldnsd and a deliberately slow server.

Everything listens on 127.0.0.1 and every resolver is pointed at those
servers only. rbldnsd's query log counts the questions that reach it: that
is how caching is proven. A missing rbldnsd fails these tests (never skips).
"""

import concurrent.futures
import threading
import time

import pytest

from rbldnsd import Rbldnsd, RbldnsdZone, free_udp_port
from relaymilter.cache import FetchSource, LookupCache
from relaymilter.dnsbl import (
    TEST_POINTS, DnsblChecker, DnsResolver, Health, probe_name, query_name, report_lines,
)
from relaymilter.zones import Status, Zone
from slow_dns import SlowDnsServer

TTL = 2                 # rbldnsd's answer TTL and negative TTL, seconds
MARGIN = 0.3            # what a loaded test machine may add to a deadline

# 198.51.100.1-100: the even ones are listed (the concurrency test).
CROWD = [f"198.51.100.{number}" for number in range(1, 101)]

ZONES = [
    RbldnsdZone("bl.test", "ip4set", [
        ":127.0.0.2:Listed, see http://example.test/$",
        "127.0.0.2",                        # RFC 5782 test point
        "192.0.2.10",
        "192.0.2.11",                       # also on the allowlist
        "192.0.2.20 :127.0.0.20",           # a code this zone's config does not use
        "192.0.2.99 :127.255.255.254:",     # Spamhaus's "public resolver" error code
        *CROWD[1::2],
    ]),
    RbldnsdZone("bl.test", "ip6trie", [
        ":127.0.0.3:Listed6, see http://example.test/$",
        "::ffff:7f00:2",                    # not ::ffff:127.0.0.2 (rbldnsd)
        "2001:db8::10",
    ]),
    RbldnsdZone("wl.test", "ip4trie", [
        ":127.0.0.2:",
        "127.0.0.2/32",
        "192.0.2.11/32",
    ]),
    RbldnsdZone("world.test", "ip4trie", ["0.0.0.0/0"]),     # lists the world
]

BL = Zone.build("bl.test", weight=1, codes=["127.0.0.2-127.0.0.11"])
WL = Zone.build("wl.test", weight=-2, display_name="allowlist")
WORLD = Zone.build("world.test", weight=1)


@pytest.fixture
def server(rbldnsd_installed):
    instance = Rbldnsd(ZONES, ttl=TTL)
    instance.start()
    yield instance
    instance.stop()
    assert not instance.is_running()


@pytest.fixture
def make_checker():
    """make(nameservers, zones=..., timeout=..., ...) -> DnsblChecker, closed at teardown."""
    checkers = []

    def make(nameservers, zones=(BL, WL), timeout=2.0, threshold=1, min_ttl=1, **kwargs):
        checker = DnsblChecker(list(zones), DnsResolver(nameservers, timeout=timeout),
                               LookupCache(max_entries=1000, min_ttl=min_ttl, max_ttl=3600),
                               timeout=timeout, threshold=threshold, **kwargs)
        checkers.append(checker)
        return checker

    yield make
    for checker in checkers:
        checker.close()


def statuses(result):
    return {answer.zone.display_name: answer.status for answer in result.answers}


def timed(function, *args):
    started = time.monotonic()
    value = function(*args)
    return value, time.monotonic() - started


# ---------------------------------------------------------------- verdicts ---

def test_listed_ipv4_client_is_listed_with_its_txt(server, make_checker):
    result = make_checker([server.nameserver]).lookup("192.0.2.10")
    assert statuses(result) == {"bl.test": Status.LISTED, "allowlist": Status.NOT_LISTED}
    assert (result.listed, result.score, result.reply_zone) == (True, 1, "bl.test")
    assert result.txt == "Listed, see http://example.test/192.0.2.10"
    assert result.answers[0].addresses == ("127.0.0.2",)
    assert result.answers[0].ttl == TTL


def test_listed_ipv6_client_is_listed(server, make_checker):
    result = make_checker([server.nameserver]).lookup("2001:db8::10")
    assert result.listed and result.reply_zone == "bl.test"
    assert result.answers[0].addresses == ("127.0.0.3",)
    assert result.txt == "Listed6, see http://example.test/2001:db8::10"
    assert server.query_count(name=query_name("2001:db8::10", "bl.test"), qtype="A") == 1


def test_v4_mapped_client_is_asked_as_ipv4(server, make_checker):
    result = make_checker([server.nameserver]).lookup("::ffff:192.0.2.10")
    assert result.listed
    assert server.query_count(name="10.2.0.192.bl.test", qtype="A") == 1


def test_unlisted_client_is_not_listed(server, make_checker):
    result = make_checker([server.nameserver]).lookup("192.0.2.1")
    assert statuses(result) == {"bl.test": Status.NOT_LISTED, "allowlist": Status.NOT_LISTED}
    assert not result.listed and result.reply_zone is None
    assert all(answer.nxdomain and answer.ttl == TTL for answer in result.answers)
    assert server.query_count(qtype="TXT") == 0          # TXT only for listings


def test_allowlist_outweighs_a_listing(server, make_checker):
    result = make_checker([server.nameserver]).lookup("192.0.2.11")
    assert statuses(result) == {"bl.test": Status.LISTED, "allowlist": Status.LISTED}
    assert (result.score, result.listed, result.reply_zone) == (-1, False, None)


def test_error_code_does_not_list(server, make_checker):
    checker = make_checker([server.nameserver])
    result = checker.lookup("192.0.2.99")
    assert statuses(result)["bl.test"] is Status.ZONE_ERROR
    assert result.answers[0].addresses == ("127.255.255.254",)
    assert not result.listed
    assert checker.lookup("192.0.2.99").answers[0].source is FetchSource.CACHE   # kept, not re-asked


def test_code_outside_the_zone_codes_does_not_list(server, make_checker):
    result = make_checker([server.nameserver]).lookup("192.0.2.20")
    assert statuses(result)["bl.test"] is Status.NOT_LISTED
    assert result.answers[0].addresses == ("127.0.0.20",) and not result.listed


# ----------------------------------------------------------------- caching ---

def test_twenty_lookups_cost_one_query_per_zone_until_the_ttl_runs_out(server, make_checker):
    checker = make_checker([server.nameserver], min_ttl=1)
    results = [checker.lookup("192.0.2.10") for _ in range(20)]
    assert all(result.listed for result in results)
    assert all(answer.source is FetchSource.CACHE for result in results[1:]
               for answer in result.answers)
    bl_name, wl_name = query_name("192.0.2.10", "bl.test"), query_name("192.0.2.10", "wl.test")
    assert server.query_count(name=bl_name, qtype="A") == 1
    assert server.query_count(name=bl_name, qtype="TXT") == 1
    assert server.query_count(name=wl_name, qtype="A") == 1     # NXDOMAIN is cached too
    assert server.query_count() == 3

    time.sleep(TTL + 0.1)
    result = checker.lookup("192.0.2.10")
    assert result.listed and result.txt and result.answers[0].source is FetchSource.DNS
    assert server.query_count(name=bl_name, qtype="A") == 2
    assert server.query_count(name=wl_name, qtype="A") == 2


def test_lookup_report_shows_raw_answers_and_the_cache(server, make_checker):
    checker = make_checker([server.nameserver])
    checker.lookup("192.0.2.10")
    lines = report_lines(checker.lookup("192.0.2.10"))
    assert lines[0].startswith("192.0.2.10: LISTED, blocked using bl.test; Listed, see")
    assert lines[2].split()[:6] == ["bl.test", "1", "listed", "127.0.0.2", str(TTL), "cache"]
    assert lines[3].split() == ["allowlist", "-2", "not-listed", "NXDOMAIN", str(TTL), "cache"]


# --------------------------------------------------------- failing servers ---

def test_nameserver_that_is_down_fails_open_within_the_timeout(make_checker):
    checker = make_checker([f"127.0.0.1:{free_udp_port()}"], timeout=0.5)
    result, elapsed = timed(checker.lookup, "192.0.2.10")
    assert elapsed < 0.5 + MARGIN
    assert set(statuses(result).values()) <= {Status.TIMEOUT, Status.DNS_FAILURE}
    assert not result.listed


def test_slow_server_is_a_timeout_at_the_deadline(make_checker):
    with SlowDnsServer(delay=1.5, address="127.0.0.2") as slow:
        checker = make_checker([slow.nameserver], zones=[BL], timeout=0.5)
        result, elapsed = timed(checker.lookup, "192.0.2.10")
        assert 0.45 <= elapsed < 0.5 + MARGIN
        assert statuses(result) == {"bl.test": Status.TIMEOUT}
        assert not result.listed
        assert slow.question_count() >= 1


def test_servfail_fails_open(make_checker):
    with SlowDnsServer(rcode="SERVFAIL") as broken:
        checker = make_checker([broken.nameserver], timeout=1.0)
        result, elapsed = timed(checker.lookup, "192.0.2.10")
    assert statuses(result) == {"bl.test": Status.DNS_FAILURE, "allowlist": Status.DNS_FAILURE}
    assert not result.listed and elapsed < 1.0


def test_zones_are_asked_in_parallel(make_checker):
    zones = [Zone.build(f"slow{number}.test") for number in range(4)]
    with SlowDnsServer(delay=0.2, address=None) as slow:
        checker = make_checker([slow.nameserver], zones=zones, timeout=2.0)
        result, elapsed = timed(checker.lookup, "192.0.2.10")
        assert slow.question_count() == 4
    assert set(statuses(result).values()) == {Status.NOT_LISTED}
    # Four 200 ms answers one after another would take 800 ms.
    assert 0.2 <= elapsed < 0.6


# ------------------------------------------------------------- concurrency ---

def test_hundred_concurrent_clients_get_the_right_verdicts(server, make_checker):
    checker = make_checker([server.nameserver], timeout=5.0)
    barrier = threading.Barrier(len(CROWD))

    def session(client):
        barrier.wait(10)
        pending = checker.start(client)
        return client, pending.result()

    with concurrent.futures.ThreadPoolExecutor(len(CROWD)) as sessions:
        outcomes = list(sessions.map(session, CROWD, timeout=30))
    for client, result in outcomes:
        listed = int(client.rsplit(".", 1)[1]) % 2 == 0
        assert result.listed is listed, client
        assert statuses(result) == {
            "bl.test": Status.LISTED if listed else Status.NOT_LISTED,
            "allowlist": Status.NOT_LISTED}, client
        if listed:
            assert result.txt == f"Listed, see http://example.test/{client}"
    assert server.query_count(zone="bl.test", qtype="A") == 100
    assert server.query_count(zone="wl.test", qtype="A") == 100


# ------------------------------------------------------------------ health ---

def test_health_check_disables_a_zone_that_lists_the_world_until_fixed(server, make_checker):
    checker = make_checker([server.nameserver], zones=[BL, WL, WORLD])
    reports = {report.zone.display_name: report for report in checker.check_health()}
    assert reports["world.test"].health is Health.LISTS_THE_WORLD
    assert not reports["world.test"].enabled
    assert (reports["bl.test"].health, reports["bl.test"].detail) == (Health.HEALTHY, "")
    assert (reports["allowlist"].health, reports["allowlist"].detail) == (Health.HEALTHY, "")
    assert checker.disabled_zones == {"world.test"}

    before = server.query_count(zone="world.test")
    result = checker.lookup("192.0.2.1")
    assert statuses(result)["world.test"] is Status.DISABLED and not result.listed
    assert server.query_count(zone="world.test") == before

    server.rewrite("world.test", "ip4trie", ["127.0.0.2/32", "192.0.2.77/32"])
    reports = {report.zone.display_name: report for report in checker.check_health()}
    assert (reports["world.test"].health, reports["world.test"].enabled) == (Health.HEALTHY, True)
    assert checker.disabled_zones == frozenset()
    assert checker.lookup("192.0.2.77").listed
    assert not checker.lookup("192.0.2.1").listed


def test_ipv6_test_point_is_served_in_nibble_form(server):
    resolver = DnsResolver([server.nameserver], timeout=1.0)
    listed = resolver.query(probe_name(TEST_POINTS[2], "bl.test"), "A")
    not_listed = resolver.query(probe_name(TEST_POINTS[3], "bl.test"), "A")
    # rbldnsd answers a v4-mapped nibble name from the zone's IPv4 dataset
    # when it has one: bl.test's ip4set lists 127.0.0.2 with 127.0.0.2.
    assert listed.records == ("127.0.0.2",)
    assert server.query_count(name=probe_name(TEST_POINTS[2], "bl.test")) == 1
    assert (not_listed.records, not_listed.nxdomain, not_listed.ttl) == ((), True, TTL)
