"""address.py: what an envelope recipient says, read the way an MTA reads it."""

import ipaddress

import pytest

from relaymilter.address import (AddressSyntaxError, Trick, normalise_domain, parse_recipient,
                                 resolved_domain)


@pytest.mark.parametrize("text, local_part, domain", [
    ("<user@example.com>", "user", "example.com"),
    ("user@example.com", "user", "example.com"),
    ("  <user@example.com>  ", "user", "example.com"),
    ("<User.Name+tag@Example.COM>", "User.Name+tag", "example.com"),
    ("<user@example.com.>", "user", "example.com"),
    ('<"john doe"@example.com>', "john doe", "example.com"),
    ('<"a\\"b"@example.com>', 'a"b', "example.com"),
    ("<user@straße.example>", "user", "xn--strae-oqa.example"),
    ("<user@XN--STRAE-OQA.example>", "user", "xn--strae-oqa.example"),
    ("<josé@example.com>", "josé", "example.com"),
])
def test_plain_addresses_parse_to_normalised_parts(text, local_part, domain):
    recipient = parse_recipient(text)
    assert recipient.local_part == local_part
    assert recipient.domain == domain
    assert recipient.tricks == frozenset()


@pytest.mark.parametrize("text, trick", [
    ("<user%remote.example@local.example>", Trick.PERCENT_HACK),
    ("<remote.example!user@local.example>", Trick.BANG_PATH),
    ('<"user@remote.example"@local.example>', Trick.AT_IN_LOCAL_PART),
    ("<user\\@remote.example@local.example>", Trick.AT_IN_LOCAL_PART),
    ("<user@remote.example@local.example>", Trick.AT_IN_LOCAL_PART),
    ("<@local.example:user@remote.example>", Trick.SOURCE_ROUTE),
    ("<user>", Trick.NO_DOMAIN),
    ("<user@>", Trick.EMPTY_DOMAIN),
    ("<user@local..example>", Trick.MALFORMED_DOMAIN),
    ("<user@[192.0.2.300]>", Trick.MALFORMED_DOMAIN),
    ("<user@ｌｏｃａｌ.example>", Trick.MAPPED_DOMAIN),
    ("<user@local\u3002example>", Trick.MAPPED_DOMAIN),
])
def test_each_trick_is_named(text, trick):
    assert trick in parse_recipient(text).tricks


def test_mta_splits_at_last_at_so_domain_is_the_last_one():
    recipient = parse_recipient("<user@local.example@remote.example>")
    assert recipient.domain == "remote.example"
    assert recipient.local_part == "user@local.example"


def test_source_route_domains_are_kept_in_order():
    recipient = parse_recipient("<@One.example,@two.example.:user@three.example>")
    assert recipient.route == ("one.example", "two.example")
    assert recipient.domain == "three.example"


@pytest.mark.parametrize("text, literal", [
    ("<user@[192.0.2.1]>", ipaddress.ip_address("192.0.2.1")),
    ("<user@[IPv6:2001:db8::1]>", ipaddress.ip_address("2001:db8::1")),
    ("<user@[ipv6:2001:DB8::1]>", ipaddress.ip_address("2001:db8::1")),
])
def test_address_literals_are_parsed(text, literal):
    recipient = parse_recipient(text)
    assert recipient.literal == literal
    assert recipient.domain is None
    assert recipient.tricks == frozenset()


@pytest.mark.parametrize("text", [
    "<postmaster>", "<POSTMASTER>", "<Postmaster>",
])
def test_bare_postmaster_is_recognised(text):
    assert parse_recipient(text).is_bare_postmaster


@pytest.mark.parametrize("text", [
    "<postmaster@local.example>", "<postmaster%remote@local.example>", '<"postmaster">',
    "<user>", "<remote!postmaster>",
])
def test_other_postmaster_forms_are_not_bare_postmaster(text):
    assert not parse_recipient(text).is_bare_postmaster


@pytest.mark.parametrize("text, reason", [
    ("<user@local.example", "unbalanced"),
    ("user@local.example>", "unbalanced"),
    ("<user@local.example>x", "unbalanced"),
    ("<>", "empty"),
    ("", "empty"),
    ("<us\x00er@local.example>", "control"),
    ("<user@local.example>\r\nRCPT TO:<x@remote.example>", "control"),
    ("<user@loc\udcffal.example>", "not UTF-8"),
    ("<" + "a" * 4000 + "@local.example>", "too long"),
    ("<" + "a" * 300 + "@local.example>", "too long"),
    ("<user name@local.example>", "not allowed"),
    ("<user(comment)@local.example>", "not allowed"),
    ('<"unterminated@local.example>', "unterminated"),
    ('<a"b"@local.example>', "quote"),
    ('<"a"b@local.example>', "after quoted"),
    ("<@local.example>", "source route"),
    ("<@local.example,user@local.example>", "source route"),
    ("<user@local.example,user@remote.example>", "not allowed"),
    ("<<user@local.example>>", "angle bracket"),
    ("<@local.example:>", "empty local part"),
])
def test_garbage_is_a_syntax_error_with_a_reason(text, reason):
    with pytest.raises(AddressSyntaxError, match=reason):
        parse_recipient(text)


def test_idna2008_keeps_sharp_s_distinct_from_ss():
    # IDNA 2003 (Python's built-in codec) would map straße to strasse.
    assert normalise_domain("straße.example") != normalise_domain("strasse.example")
    assert normalise_domain("STRASSE.example") == "strasse.example"


@pytest.mark.parametrize("text", ["", ".", "a..b", "-a.example", "a_b.example", "a" * 64 + ".example",
                                  "\u2615\ufe0f.example"])
def test_invalid_domains_are_refused(text):
    with pytest.raises(ValueError):
        normalise_domain(text)


@pytest.mark.parametrize("text, expected", [
    ("user@Remote.Example", ("remote.example", None)),
    ("<user@remote.example>", ("remote.example", None)),
    ("user", (None, None)),
    ("user@[192.0.2.1]", (None, ipaddress.ip_address("192.0.2.1"))),
])
def test_resolved_domain_reads_the_mta_resolution(text, expected):
    assert resolved_domain(text) == expected


def test_resolved_domain_refuses_a_malformed_domain():
    with pytest.raises(ValueError):
        resolved_domain("user@bad..example")
