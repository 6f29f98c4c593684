"""dnsbl.py: query names, codes, classification, weights, deadline, health.

A fake resolver stands in for DNS; fake timers stand in for the clock,
except where the deadline itself is under test (a 0.2 s real timeout).
"""

import ipaddress
import logging
import threading
import time
from collections import Counter

import dns.message
import dns.rrset
import pytest

from relaymilter.cache import FetchSource, LookupCache
from relaymilter.dnsbl import (
    MAX_TXT_LENGTH, TEST_POINTS, DnsAnswer, DnsblChecker, DnsFailure, DnsTimeout, Health,
    HealthMonitor, RateLimiter, clean_txt, default_workers, judge_health,
    probe_name, query_name, report_lines, reverse_labels,
)
from relaymilter.recorder import Recorder
from relaymilter.zones import Status, Zone

NXDOMAIN = DnsAnswer((), 300, nxdomain=True)


class FakeTimer:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class FakeResolver:
    """Answers from a table; NXDOMAIN for anything else. Thread-safe.

    gates[name] is an Event a query for name waits on (a stuck DNS thread).
    """

    def __init__(self):
        self.answers = {}
        self.gates = {}
        self.calls = []
        self._lock = threading.Lock()

    def set(self, client, zone, *addresses, txt=None, ttl=300):
        name = query_name(client, zone)
        self.answers[(name, "A")] = DnsAnswer(tuple(addresses), ttl) if addresses else NXDOMAIN
        if txt is not None:
            self.answers[(name, "TXT")] = DnsAnswer((txt,), ttl)

    def fail(self, client, zone, error):
        self.answers[(query_name(client, zone), "A")] = error

    def block(self, client, zone, rdtype=None):
        """Hold queries for this name (of one type only, when rdtype is given)."""
        gate = threading.Event()
        name = query_name(client, zone)
        self.gates[(name, rdtype) if rdtype else name] = gate
        return gate

    def query(self, name, rdtype, lifetime=None):
        with self._lock:
            self.calls.append((name, rdtype))
        gate = self.gates.get(name) or self.gates.get((name, rdtype))
        if gate is not None:
            gate.wait(10)
        answer = self.answers.get((name, rdtype), NXDOMAIN)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def count(self, name, rdtype="A"):
        with self._lock:
            return self.calls.count((name, rdtype))


BL = Zone.build("bl.test", weight=1, codes=["127.0.0.2-127.0.0.11"], display_name="bl.test")
BL2 = Zone.build("bl2.test", weight=1)
SECRET = Zone.build("KEY123.bl.example.", weight=2, display_name="example-bl")
WL = Zone.build("wl.test", weight=-2)
CLIENT = "192.0.2.10"


@pytest.fixture
def resolver():
    return FakeResolver()


@pytest.fixture
def clock():
    return FakeTimer()


@pytest.fixture
def make_checker(resolver, clock):
    checkers = []

    def make(zones=(BL,), threshold=1, timeout=2.0, timer=clock, cache_timer=None, **kwargs):
        cache = LookupCache(max_entries=1000, min_ttl=60, max_ttl=3600,
                            timer=cache_timer or FakeTimer())
        checker = DnsblChecker(list(zones), resolver, cache, timeout=timeout,
                               threshold=threshold, timer=timer, **kwargs)
        checkers.append(checker)
        return checker

    yield make
    for gate in resolver.gates.values():
        gate.set()
    for checker in checkers:
        checker.close()


def statuses(result):
    return {answer.zone.display_name: answer.status for answer in result.answers}


class AnswerCounts(Recorder):
    """A metrics recorder that counts (zone, status) answers, as Prometheus would."""

    def __init__(self):
        self.answers = Counter()

    def dnsbl_answer(self, zone, status):
        self.answers[(zone, status)] += 1


@pytest.fixture
def counts():
    return AnswerCounts()


# ------------------------------------------------------------ query names ---

@pytest.mark.parametrize("client, name", [
    ("192.0.2.1", "1.2.0.192.bl.test"),
    ("127.0.0.2", "2.0.0.127.bl.test"),
    ("::ffff:192.0.2.1", "1.2.0.192.bl.test"),          # v4-mapped asks as IPv4
    ("::FFFF:C000:0201", "1.2.0.192.bl.test"),
    ("2001:db8:1:2:3:4:567:89ab",                        # RFC 5782 section 2.4
     "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test"),
    ("2001:db8::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"),
    ("fe80::1%eth0", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.e.f.bl.test"),
])
def test_query_name(client, name):
    assert query_name(client, "bl.test") == name
    assert query_name(ipaddress.ip_address(client), "bl.test") == name


def test_ipv6_test_point_is_asked_in_nibble_form_not_as_ipv4():
    point = ipaddress.IPv6Address("::ffff:7f00:2")
    assert reverse_labels(point) == "2.0.0.0.0.0.f.7.f.f.f.f" + ".0" * 20
    assert probe_name((point, True), "bl.test") == reverse_labels(point) + ".bl.test"


def test_query_name_refuses_what_is_no_address():
    with pytest.raises(ValueError):
        query_name("192.0.2.256", "bl.test")


# -------------------------------------------------------------------- TXT ---

def test_clean_txt_keeps_printable_ascii_and_bounds_the_length():
    assert clean_txt("Listed\r\n250 fake\x00 ok") == "Listed\\x0d\\x0a250 fake\\x00 ok"
    assert clean_txt("caf\u00e9") == "caf\\u00e9"
    assert len(clean_txt("x" * 1000)) == MAX_TXT_LENGTH


# ---------------------------------------------------------------- checker ---

def test_listed_client_is_listed_with_txt(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.2", txt="Listed, see http://example.test/")
    result = make_checker(zones=[BL, WL]).lookup(CLIENT)
    assert result.listed and result.score == 1
    assert (result.reply_zone, result.txt) == ("bl.test", "Listed, see http://example.test/")
    assert statuses(result) == {"bl.test": Status.LISTED, "wl.test": Status.NOT_LISTED}


def test_txt_with_a_is_asked_with_every_new_client_and_used_when_listed(make_checker,
                                                                        resolver):
    with_a = Zone.build("bl.test", weight=1, txt="with-a")
    resolver.set(CLIENT, "bl.test", "127.0.0.2", txt="Listed with A")
    resolver.set("192.0.2.11", "bl.test")
    checker = make_checker(zones=[with_a, WL])
    assert checker.lookup(CLIENT).txt == "Listed with A"
    assert not checker.lookup("192.0.2.11").listed
    assert resolver.count(query_name(CLIENT, "bl.test"), "TXT") == 1
    assert resolver.count(query_name("192.0.2.11", "bl.test"), "TXT") == 1
    assert resolver.count(query_name(CLIENT, "wl.test"), "TXT") == 0


def test_txt_off_is_never_asked_and_the_listing_stands_without_it(make_checker, resolver):
    silent = Zone.build("bl.test", weight=1, txt="off")
    resolver.set(CLIENT, "bl.test", "127.0.0.2", txt="never shown")
    result = make_checker(zones=[silent]).lookup(CLIENT)
    assert result.listed and result.txt is None
    assert resolver.count(query_name(CLIENT, "bl.test"), "TXT") == 0


def test_an_unknown_txt_mode_is_refused():
    with pytest.raises(ValueError, match="txt must be one of listed, with-a, off"):
        Zone.build("bl.test", txt="always")


def test_txt_is_asked_only_for_listing_shaped_answers(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.2")
    make_checker(zones=[BL, WL]).lookup(CLIENT)
    assert resolver.count(query_name(CLIENT, "bl.test"), "TXT") == 1
    assert resolver.count(query_name(CLIENT, "wl.test"), "TXT") == 0


def test_listing_stands_when_txt_fails(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.2")
    resolver.answers[(query_name(CLIENT, "bl.test"), "TXT")] = DnsFailure("SERVFAIL")
    result = make_checker().lookup(CLIENT)
    assert result.listed and result.txt is None


def test_allowlist_txt_is_never_asked(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.2", txt="bl")
    resolver.set(CLIENT, "wl.test", "127.0.0.2", txt="wl")
    result = make_checker(zones=[BL, WL]).lookup(CLIENT)
    assert not result.listed
    assert resolver.count(query_name(CLIENT, "wl.test"), "TXT") == 0


def test_listing_stands_when_txt_is_late_and_the_verdict_keeps_the_deadline(make_checker,
                                                                          resolver):
    # The TXT lookup is separate from the A lookup: a TXT answer that misses
    # the deadline costs the reply its text, never the verdict.
    resolver.set(CLIENT, "bl.test", "127.0.0.2", txt="late")
    resolver.block(CLIENT, "bl.test", "TXT")
    checker = make_checker(timeout=0.3, timer=time.monotonic)
    started = time.monotonic()
    result = checker.lookup(CLIENT)
    assert result.listed and result.txt is None
    assert time.monotonic() - started < 0.3 + 0.25


def test_txt_is_cached_with_the_listing(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.2", txt="see web")
    checker = make_checker()
    assert checker.lookup(CLIENT).txt == "see web"
    assert checker.lookup(CLIENT).txt == "see web"
    assert resolver.count(query_name(CLIENT, "bl.test"), "TXT") == 1


def test_v4_mapped_client_is_asked_as_ipv4(make_checker, resolver):
    resolver.set("192.0.2.10", "bl.test", "127.0.0.2")
    result = make_checker().lookup("::ffff:192.0.2.10")
    assert result.listed
    assert str(result.client) == "192.0.2.10"
    assert resolver.calls[0] == ("10.2.0.192.bl.test", "A")


def test_ipv6_client_is_asked_in_nibbles(make_checker, resolver):
    resolver.set("2001:db8::10", "bl.test", "127.0.0.3")
    result = make_checker().lookup("2001:db8::10")
    assert result.listed
    assert resolver.calls[0][0].startswith("0.1.0.0.0.0")


def test_answer_outside_codes_does_not_list(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.20")
    result = make_checker().lookup(CLIENT)
    assert statuses(result) == {"bl.test": Status.NOT_LISTED} and not result.listed


def test_zone_error_does_not_list_and_is_counted(make_checker, resolver, counts):
    resolver.set(CLIENT, "bl.test", "127.255.255.254")
    checker = make_checker(metrics=counts)
    result = checker.lookup(CLIENT)
    assert statuses(result) == {"bl.test": Status.ZONE_ERROR} and not result.listed
    assert counts.answers == {("bl.test", "zone-error"): 1}


def test_zone_error_is_logged_at_most_once_a_minute_per_zone(make_checker, resolver, clock,
                                                             caplog, counts):
    caplog.set_level(logging.WARNING, logger="relaymilter.dnsbl")
    for number in range(1, 4):
        resolver.set(f"192.0.2.{number}", "bl.test", "127.255.255.254")
        resolver.set(f"192.0.2.{number}", "key123.bl.example", "10.0.0.1")
    checker = make_checker(zones=[BL, SECRET], metrics=counts)
    checker.lookup("192.0.2.1")
    clock.now += 30
    checker.lookup("192.0.2.2")
    errors = [record.getMessage() for record in caplog.records]
    assert len(errors) == 2                       # one per zone
    assert any("bl.test" in message and "127.255.255.254" in message for message in errors)
    assert any("example-bl" in message and "10.0.0.1" in message for message in errors)
    assert not any("key123" in message for message in errors)
    clock.now += 30
    caplog.clear()
    checker.lookup("192.0.2.3")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert all("(1 more since last logged)" in message for message in messages)
    assert counts.answers[("bl.test", "zone-error")] == 3
    assert counts.answers[("example-bl", "zone-error")] == 3      # by display_name only


def test_rate_limiter_counts_what_it_kept_quiet():
    clock = FakeTimer()
    limiter = RateLimiter(60, clock)
    assert limiter.allow("a") == 0
    assert limiter.allow("a") is None
    assert limiter.allow("b") == 0
    clock.now += 59.9
    assert limiter.allow("a") is None
    clock.now += 0.1
    assert limiter.allow("a") == 2


def test_dns_failure_fails_open(make_checker, resolver):
    resolver.fail(CLIENT, "bl.test", DnsFailure("SERVFAIL"))
    resolver.set(CLIENT, "bl2.test", "127.0.0.2")
    result = make_checker(zones=[BL, BL2], threshold=2).lookup(CLIENT)
    assert statuses(result) == {"bl.test": Status.DNS_FAILURE, "bl2.test": Status.LISTED}
    assert (result.score, result.listed) == (1, False)


def test_resolver_timeout_is_a_timeout(make_checker, resolver):
    resolver.fail(CLIENT, "bl.test", DnsTimeout("slow"))
    result = make_checker().lookup(CLIENT)
    assert statuses(result) == {"bl.test": Status.TIMEOUT} and not result.listed


def test_failures_are_not_cached(make_checker, resolver):
    resolver.fail(CLIENT, "bl.test", DnsFailure("SERVFAIL"))
    checker = make_checker()
    checker.lookup(CLIENT)
    resolver.set(CLIENT, "bl.test", "127.0.0.2")
    assert checker.lookup(CLIENT).listed
    assert resolver.count(query_name(CLIENT, "bl.test")) == 2


def test_answers_are_cached_per_zone_and_address(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.2")
    checker = make_checker(zones=[BL, WL])
    first = checker.lookup(CLIENT)
    second = checker.lookup(CLIENT)
    assert resolver.count(query_name(CLIENT, "bl.test")) == 1
    assert resolver.count(query_name(CLIENT, "wl.test")) == 1
    assert resolver.count(query_name(CLIENT, "bl.test"), "TXT") == 1
    assert [answer.source for answer in first.answers] == [FetchSource.DNS] * 2
    assert all(answer.source is FetchSource.CACHE for answer in second.answers)
    assert second.listed and second.txt == first.txt


def test_nxdomain_is_cached_for_its_negative_ttl(make_checker, resolver):
    cache_clock = FakeTimer()
    resolver.answers[(query_name(CLIENT, "bl.test"), "A")] = DnsAnswer((), 900, nxdomain=True)
    checker = make_checker(cache_timer=cache_clock)
    checker.lookup(CLIENT)
    cache_clock.now += 899
    assert checker.lookup(CLIENT).answers[0].source is FetchSource.CACHE
    cache_clock.now += 1
    result = checker.lookup(CLIENT)
    assert result.answers[0].source is FetchSource.DNS and result.answers[0].nxdomain
    assert resolver.count(query_name(CLIENT, "bl.test")) == 2


def test_a_returning_clients_verdict_is_kept_until_its_first_answer_expires(make_checker,
                                                                            resolver):
    cache_clock = FakeTimer()
    resolver.set(CLIENT, "bl.test", "127.0.0.2", ttl=300)
    resolver.answers[(query_name(CLIENT, "bl.test"), "TXT")] = DnsAnswer(("Listed",), 100)
    checker = make_checker(cache_timer=cache_clock)
    checker.lookup(CLIENT)                  # asked
    checker.lookup(CLIENT)                  # from the cache, and kept
    hits = checker.cache.stats().hits
    cache_clock.now += 99
    kept = checker.lookup(CLIENT)
    assert kept.listed and kept.txt == "Listed"
    assert checker.cache.stats().hits == hits + 2     # A and TXT, as the cache would count
    cache_clock.now += 1                    # the TXT answer's 100 s are over
    again = checker.lookup(CLIENT)
    assert again.listed and again.txt == "Listed"
    assert resolver.count(query_name(CLIENT, "bl.test"), "TXT") == 2
    assert resolver.count(query_name(CLIENT, "bl.test"), "A") == 1


def test_a_client_seen_once_is_not_kept_and_kept_verdicts_are_bounded(make_checker, resolver):
    checker = make_checker()
    checker._verdicts_max = 5
    clients = [f"192.0.2.{index}" for index in range(1, 21)]
    for client in clients:
        checker.lookup(client)
    assert not checker._verdicts            # a storm of new clients keeps nothing
    for client in clients:
        checker.lookup(client)
    assert list(checker._verdicts) == clients[-5:]      # the oldest went first


def test_a_problem_answer_is_never_kept(make_checker, resolver):
    resolver.fail(CLIENT, "bl.test", DnsFailure("SERVFAIL"))
    checker = make_checker()
    for _ in range(3):
        assert checker.lookup(CLIENT).answers[0].status is Status.DNS_FAILURE
    assert resolver.count(query_name(CLIENT, "bl.test")) == 3


def test_concurrent_sessions_for_one_client_share_one_query(make_checker, resolver):
    gate = resolver.block(CLIENT, "bl.test")
    resolver.set(CLIENT, "bl.test", "127.0.0.2")
    checker = make_checker(timeout=5.0, timer=time.monotonic)
    pending = [checker.start(CLIENT) for _ in range(5)]
    gate.set()
    assert all(item.result().listed for item in pending)
    assert resolver.count(query_name(CLIENT, "bl.test")) == 1


def test_result_returns_by_the_deadline_when_a_dns_thread_is_stuck(make_checker, resolver):
    resolver.block(CLIENT, "bl.test")                  # never answers during the test
    resolver.set(CLIENT, "bl2.test", "127.0.0.2")
    checker = make_checker(zones=[BL, BL2], timeout=0.2, timer=time.monotonic)
    started = time.monotonic()
    result = checker.start(CLIENT).result()
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 0.2 + 0.15
    assert statuses(result) == {"bl.test": Status.TIMEOUT, "bl2.test": Status.LISTED}
    assert result.listed


def test_deadline_runs_from_start_not_from_result(make_checker, resolver, clock):
    resolver.block(CLIENT, "bl.test")
    checker = make_checker(timeout=2.0)
    pending = checker.start(CLIENT)
    clock.now += 2.0                # HELO and MAIL FROM took the whole timeout
    started = time.monotonic()
    result = pending.result()
    assert time.monotonic() - started < 0.1
    assert statuses(result) == {"bl.test": Status.TIMEOUT}


def test_result_is_computed_once(make_checker, resolver, caplog, counts):
    resolver.set(CLIENT, "bl.test", "127.255.255.254")
    checker = make_checker(metrics=counts)
    pending = checker.start(CLIENT)
    assert pending.result() is pending.result()
    assert counts.answers == {("bl.test", "zone-error"): 1}


def test_checker_refuses_a_threshold_that_rejects_everyone(make_checker):
    with pytest.raises(ValueError, match="threshold"):
        make_checker(threshold=0)


def test_checker_refuses_a_zone_twice(make_checker):
    with pytest.raises(ValueError, match="twice"):
        make_checker(zones=[BL, Zone.build("BL.test.")])


@pytest.mark.parametrize("zones, workers", [(0, 8), (1, 8), (3, 24), (16, 128), (40, 128)])
def test_default_workers(zones, workers):
    assert default_workers(zones) == workers


def test_report_shows_every_zone(make_checker, resolver):
    resolver.set(CLIENT, "bl.test", "127.0.0.2", txt="see http://example.test/", ttl=120)
    resolver.set(CLIENT, "key123.bl.example", "127.255.255.254")
    checker = make_checker(zones=[BL, SECRET, WL])
    checker.lookup(CLIENT)
    lines = report_lines(checker.lookup(CLIENT))
    text = "\n".join(lines)
    assert lines[0] == ("192.0.2.10: LISTED, blocked using bl.test; see http://example.test/ "
                        "(score 1, threshold 1)")
    assert "key123" not in text
    bl, secret, wl = lines[2:]
    assert bl.split()[:7] == ["bl.test", "1", "listed", "127.0.0.2", "120", "cache",
                              '"see']
    assert secret.split() == ["example-bl", "2", "zone-error", "127.255.255.254", "300", "cache"]
    assert wl.split() == ["wl.test", "-2", "not-listed", "NXDOMAIN", "300", "cache"]


# ----------------------------------------------------------------- health ---

def set_test_points(resolver, zone, v4_2=("127.0.0.2",), v4_1=(), v6_2=(), v6_1=()):
    for (point, _), addresses in zip(TEST_POINTS, (v4_2, v4_1, v6_2, v6_1)):
        name = probe_name((point, None), zone)
        resolver.answers[(name, "A")] = DnsAnswer(tuple(addresses), 300) if addresses else NXDOMAIN


def test_healthy_zone_stays_enabled(make_checker, resolver):
    set_test_points(resolver, "bl.test", v6_2=("127.0.0.2",))
    checker = make_checker()
    [report] = checker.check_health()
    assert (report.health, report.enabled) == (Health.HEALTHY, True)
    assert checker.disabled_zones == frozenset()


def test_zone_listing_the_world_is_disabled_and_re_enabled(make_checker, resolver, caplog):
    caplog.set_level(logging.INFO, logger="relaymilter.dnsbl")
    set_test_points(resolver, "key123.bl.example", v4_1=("127.0.0.2",))
    set_test_points(resolver, "bl.test")
    resolver.set(CLIENT, "key123.bl.example", "127.0.0.2")
    checker = make_checker(zones=[SECRET, BL])
    reports = checker.check_health()
    assert [(r.health, r.enabled) for r in reports] == [(Health.LISTS_THE_WORLD, False),
                                                        (Health.HEALTHY, True)]
    assert checker.disabled_zones == {"example-bl"}
    [error] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert "example-bl" in error.getMessage() and "lists the world" in error.getMessage()
    assert "key123" not in caplog.text

    result = checker.lookup(CLIENT)
    assert statuses(result)["example-bl"] is Status.DISABLED and not result.listed
    assert resolver.count(query_name(CLIENT, "key123.bl.example")) == 0

    checker.check_health()                             # still broken: logged once only
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    set_test_points(resolver, "key123.bl.example")
    caplog.clear()
    [report, _] = checker.check_health()
    assert (report.health, report.enabled) == (Health.HEALTHY, True)
    assert checker.disabled_zones == frozenset()
    assert any(record.levelno == logging.WARNING and "re-enabled" in record.getMessage()
               for record in caplog.records)
    assert checker.lookup(CLIENT).listed


def test_zone_answering_error_codes_for_the_test_point_is_disabled(make_checker, resolver):
    set_test_points(resolver, "bl.test", v4_2=("127.255.255.254",), v4_1=("127.255.255.254",))
    checker = make_checker()
    [report] = checker.check_health()
    assert (report.health, report.enabled) == (Health.ERROR_CODES, False)


def test_zone_listing_the_ipv6_world_is_disabled(make_checker, resolver):
    set_test_points(resolver, "bl.test", v6_1=("127.0.0.2",))
    [report] = make_checker().check_health()
    assert (report.health, report.enabled) == (Health.LISTS_THE_WORLD, False)
    assert "::ffff:7f00:1" in report.detail


def test_unanswered_test_points_keep_the_zone_as_it_was(make_checker, resolver):
    set_test_points(resolver, "bl.test", v4_1=("127.0.0.2",))
    checker = make_checker()
    checker.check_health()
    resolver.answers[(probe_name(TEST_POINTS[0], "bl.test"), "A")] = DnsTimeout("slow")
    resolver.answers[(probe_name(TEST_POINTS[1], "bl.test"), "A")] = DnsTimeout("slow")
    [report] = checker.check_health()
    assert (report.health, report.enabled) == (Health.UNKNOWN, False)


def test_unanswered_ipv6_test_points_are_ignored(make_checker, resolver):
    set_test_points(resolver, "bl.test")
    resolver.answers[(probe_name(TEST_POINTS[2], "bl.test"), "A")] = DnsFailure("SERVFAIL")
    [report] = make_checker().check_health()
    assert (report.health, report.enabled) == (Health.HEALTHY, True)


def test_zone_not_listing_its_test_point_is_kept_and_warned_about_once(make_checker, resolver,
                                                                        caplog):
    caplog.set_level(logging.WARNING, logger="relaymilter.dnsbl")
    set_test_points(resolver, "bl.test", v4_2=())
    checker = make_checker()
    [report] = checker.check_health()
    checker.check_health()
    assert (report.health, report.enabled) == (Health.HEALTHY, True)
    assert len([r for r in caplog.records if "127.0.0.2" in r.getMessage()]) == 1


def test_judge_health_is_pure():
    points = dict.fromkeys(TEST_POINTS, NXDOMAIN)
    points[TEST_POINTS[0]] = DnsAnswer(("127.0.0.2",), 60)
    assert judge_health(BL, points) == (Health.HEALTHY, "")


class SignallingChecker(DnsblChecker):
    """Sets `rounds` after each health round, so a test can wait without polling."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds = threading.Event()

    def check_health(self):
        try:
            return super().check_health()
        finally:
            self.rounds.set()


def test_health_monitor_runs_a_round_at_start_and_stops(resolver):
    set_test_points(resolver, "bl.test", v4_1=("127.0.0.2",))
    checker = SignallingChecker([BL], resolver, LookupCache(timer=FakeTimer()), timeout=2.0)
    monitor = HealthMonitor(checker, interval=3600)
    try:
        monitor.start()
        assert checker.rounds.wait(5)
    finally:
        monitor.stop(timeout=5)
        checker.close()
    assert checker.disabled_zones == {"bl.test"}
    assert not monitor._thread.is_alive()
