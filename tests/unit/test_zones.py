"""zones.py: codes, zones, classification, the verdict; and that the module stays pure."""

import ipaddress
import subprocess
import sys

import pytest

from relaymilter.cache import FetchSource
from relaymilter.zones import (
    DEFAULT_CODES, MAX_ZONE_NAME_LENGTH, PROBLEMS, Status, Zone, ZoneAnswer,
    classify, is_error_code, normalise_zone_name, parse_codes, summarise,
)

BL = Zone.build("bl.test", weight=1, codes=["127.0.0.2-127.0.0.11"], display_name="bl.test")
BL2 = Zone.build("bl2.test", weight=1)
SECRET = Zone.build("KEY123.bl.example.", weight=2, display_name="example-bl")
WL = Zone.build("wl.test", weight=-2)
CLIENT_IP = ipaddress.ip_address("192.0.2.10")


# ------------------------------------------------------------------ codes ---

def test_parse_codes_reads_ranges_single_addresses_and_networks():
    codes = parse_codes(["127.0.0.2-127.0.0.11", "127.0.0.20", "127.0.1.0/24"])
    zone = Zone("z", "z", 1, codes)
    listed = ["127.0.0.2", "127.0.0.11", "127.0.0.20", "127.0.1.0", "127.0.1.255"]
    not_listed = ["127.0.0.1", "127.0.0.12", "127.0.0.19", "127.0.0.21", "127.0.2.0"]
    assert all(zone.lists(ipaddress.IPv4Address(code)) for code in listed)
    assert not any(zone.lists(ipaddress.IPv4Address(code)) for code in not_listed)
    assert [str(code) for code in codes] == ["127.0.0.2-127.0.0.11", "127.0.0.20",
                                             "127.0.1.0-127.0.1.255"]


@pytest.mark.parametrize("entry, reason", [
    ("127.0.0.11-127.0.0.2", "empty range"),
    ("10.0.0.1", "outside 127.0.0.0/8"),
    ("126.255.255.255-127.0.0.5", "outside 127.0.0.0/8"),
    ("127.255.255.254", "overlaps 127.255.255.0/24"),
    ("127.255.0.0-127.255.255.0", "overlaps 127.255.255.0/24"),
    ("127.0.0.0/8", "overlaps 127.255.255.0/24"),
    ("127.0.0.1/24", "not an IPv4"),
    ("127.0.0.x", "not an IPv4"),
    ("::1", "not an IPv4"),
    ("", "not an IPv4"),
])
def test_parse_codes_refuses_codes_that_could_never_list(entry, reason):
    with pytest.raises(ValueError, match=reason):
        parse_codes([entry])


def test_parse_codes_refuses_a_bare_string():
    with pytest.raises(ValueError, match="list"):
        parse_codes("127.0.0.2")


def test_parse_codes_refuses_an_empty_list():
    with pytest.raises(ValueError, match="never list"):
        parse_codes([])


def test_default_codes_are_loopback_minus_the_error_range():
    zone = Zone.build("bl.test")
    assert zone.codes == DEFAULT_CODES
    assert zone.lists(ipaddress.IPv4Address("127.0.0.0"))
    assert zone.lists(ipaddress.IPv4Address("127.255.254.255"))
    assert not zone.lists(ipaddress.IPv4Address("127.255.255.0"))


# ------------------------------------------------------------------ zones ---

def test_zone_build_normalises_the_name_and_defaults_display_name():
    zone = Zone.build("Zen.Spamhaus.ORG.")
    assert (zone.name, zone.display_name, zone.weight) == ("zen.spamhaus.org", "zen.spamhaus.org", 1)


def test_display_name_hides_a_key_in_the_zone_name():
    assert (SECRET.name, SECRET.display_name) == ("key123.bl.example", "example-bl")


@pytest.mark.parametrize("kwargs, reason", [
    (dict(name=""), "empty zone name"),
    (dict(name="bad..name"), "not a DNS name"),
    (dict(name="x" * 64 + ".test"), "not a DNS name"),
    (dict(name=".".join(["abcdefgh"] * 22)), "too long"),
    (dict(name="bl.test", weight=1.5), "integer"),
    (dict(name="bl.test", weight=True), "integer"),
    (dict(name="bl.test", display_name=" "), "display_name"),
    (dict(name="bl.test", display_name="a\nb"), "display_name"),
    (dict(name="bl.test", codes=["10.0.0.1"]), "outside"),
])
def test_zone_build_refuses_bad_values(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        Zone.build(**kwargs)


# --------------------------------------------------------- classification ---

@pytest.mark.parametrize("addresses, status", [
    ((), Status.NOT_LISTED),
    (("127.0.0.2",), Status.LISTED),
    (("127.0.0.11",), Status.LISTED),
    (("127.0.0.20", "127.0.0.4"), Status.LISTED),
    (("127.0.0.20",), Status.NOT_LISTED),                # 127/8 but not in codes
    (("127.0.0.1",), Status.NOT_LISTED),
    (("127.255.255.254",), Status.ZONE_ERROR),           # Spamhaus: public resolver
    (("127.255.255.252",), Status.ZONE_ERROR),
    (("127.255.255.0",), Status.ZONE_ERROR),
    (("10.0.0.1",), Status.ZONE_ERROR),                  # outside 127/8
    (("0.0.0.0",), Status.ZONE_ERROR),
    (("127.0.0.2", "127.255.255.254"), Status.ZONE_ERROR),
    (("not-an-address",), Status.ZONE_ERROR),
])
def test_classify(addresses, status):
    assert classify(BL, addresses) is status


def test_error_codes_are_zone_errors_even_with_default_codes():
    zone = Zone.build("any.test")
    assert classify(zone, ["127.255.255.254"]) is Status.ZONE_ERROR
    assert classify(zone, ["10.0.0.1"]) is Status.ZONE_ERROR
    assert classify(zone, ["127.255.254.1"]) is Status.LISTED


# ---------------------------------------------------------------- weights ---

def answer(zone, status=Status.LISTED, txt=None):
    return ZoneAnswer(zone, status, ("127.0.0.2",) if status is Status.LISTED else (), 300,
                      txt=txt)


def test_one_listing_at_threshold_lists():
    result = summarise(CLIENT_IP, [answer(BL, txt="see web"), answer(WL, Status.NOT_LISTED)], 1)
    assert (result.score, result.listed, result.reply_zone, result.txt) == (1, True, "bl.test",
                                                                            "see web")


def test_allowlist_outweighs_a_listing():
    result = summarise(CLIENT_IP, [answer(BL), answer(WL)], 1)
    assert (result.score, result.listed, result.reply_zone, result.txt) == (-1, False, None, None)


def test_allowlist_does_not_outweigh_enough_listings():
    result = summarise(CLIENT_IP, [answer(BL), answer(SECRET), answer(BL2), answer(WL)], 1)
    assert (result.score, result.listed) == (2, True)


def test_score_below_threshold_does_not_list():
    result = summarise(CLIENT_IP, [answer(BL), answer(BL2, Status.NOT_LISTED)], 2)
    assert (result.score, result.listed) == (1, False)
    result = summarise(CLIENT_IP, [answer(BL), answer(BL2)], 2)
    assert (result.score, result.listed) == (2, True)


@pytest.mark.parametrize("status", [Status.NOT_LISTED, Status.ZONE_ERROR, Status.TIMEOUT,
                                    Status.DNS_FAILURE, Status.DISABLED])
def test_only_listings_contribute(status):
    result = summarise(CLIENT_IP, [ZoneAnswer(SECRET, status), ZoneAnswer(WL, status)], 1)
    assert (result.score, result.listed) == (0, False)


def test_reply_names_the_heaviest_listing_zone_by_display_name():
    result = summarise(CLIENT_IP, [answer(BL, txt="bl"), answer(SECRET, txt="secret")], 1)
    assert (result.reply_zone, result.txt) == ("example-bl", "secret")


def test_reply_names_the_first_zone_on_a_tie():
    result = summarise(CLIENT_IP, [answer(BL2, txt="two"), answer(BL, txt="one")], 1)
    assert (result.reply_zone, result.txt) == ("bl2.test", "two")


def test_no_answers_is_not_listed():
    result = summarise(CLIENT_IP, [], 1)
    assert (result.score, result.listed, result.reply_zone, result.answers) == (0, False, None, ())


def test_a_listing_allowlist_is_never_the_reply_zone():
    heavy = Zone.build("heavy.test", weight=3)
    result = summarise(CLIENT_IP, [answer(WL), answer(heavy, txt="heavy")], 1)
    assert (result.score, result.listed, result.reply_zone, result.txt) == (1, True,
                                                                            "heavy.test", "heavy")


def test_only_a_listing_contributes_its_weight():
    assert answer(SECRET).contribution == 2
    assert answer(WL).contribution == -2
    assert ZoneAnswer(SECRET, Status.TIMEOUT).contribution == 0


def test_a_zone_answer_says_where_it_came_from():
    assert ZoneAnswer(BL, Status.DISABLED).source is None           # never asked
    assert ZoneAnswer(BL, Status.LISTED, source=FetchSource.CACHE).source is FetchSource.CACHE


@pytest.mark.parametrize("address, error", [
    ("127.0.0.2", False), ("127.255.254.255", False), ("127.255.255.0", True),
    ("127.255.255.254", True), ("126.255.255.255", True), ("10.0.0.1", True),
])
def test_is_error_code(address, error):
    assert is_error_code(ipaddress.IPv4Address(address)) is error


def test_problems_are_the_statuses_that_say_the_zone_failed_us():
    assert PROBLEMS == {Status.ZONE_ERROR, Status.TIMEOUT, Status.DNS_FAILURE}
    assert Status.DISABLED not in PROBLEMS      # the health check logs those itself


# ------------------------------------------------------------- zone names ---

@pytest.mark.parametrize("name, normalised", [
    ("Zen.Spamhaus.ORG.", "zen.spamhaus.org"),
    ("  bl.test  ", "bl.test"),
    ("b\u00fccher.example", "b\u00fccher.example"),     # an IDN label, kept as written
    ("_under.score.test", "_under.score.test"),         # DNS labels are not host names
    ("x" * 63 + ".test", "x" * 63 + ".test"),
])
def test_normalise_zone_name_accepts(name, normalised):
    assert normalise_zone_name(name) == normalised


@pytest.mark.parametrize("name, reason", [
    ("", "empty zone name"),
    (".", "empty zone name"),
    ("bl..test", "a label is empty"),
    (".bl.test", "a label is empty"),
    ("x" * 64 + ".test", "over 63 octets"),
    ("\u00fc" * 60 + ".test", "over 63 octets"),        # short, but not as an A-label
])
def test_normalise_zone_name_refuses(name, reason):
    with pytest.raises(ValueError, match=reason):
        normalise_zone_name(name)


def test_the_longest_zone_name_leaves_room_for_an_ipv6_query_name():
    longest = "a." * 94 + "z"
    assert len(longest) == MAX_ZONE_NAME_LENGTH
    assert normalise_zone_name(longest) == longest
    assert len("0." * 32 + longest) <= 253
    with pytest.raises(ValueError, match="too long"):
        normalise_zone_name("b" + longest)


# ------------------------------------------------------------------ purity ---

def test_importing_zones_loads_no_dns_library_and_no_socket():
    # The engine and the config read these types; neither may pull in DNS or sockets.
    code = "import sys, relaymilter.zones; print(*sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "relaymilter.zones" in loaded
    assert not [name for name in loaded if name in ("socket", "dns", "relaymilter.dnsbl")
                or name.startswith("dns.")]
