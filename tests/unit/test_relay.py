"""relay.py: the relay verdict, trick by trick, client by client."""

import ipaddress

import pytest

from relaymilter.address import parse_recipient
from relaymilter.relay import RelayRules, Trust, client_trust, is_local_domain, relay_verdict

RULES = RelayRules.build(
    local_domains=["local.test", ".hosted.test", "straße.test", "strasse.test"],
    trusted_networks=["127.0.0.0/8", "::1/128", "2001:db8:1::/48", "::ffff:198.51.100.0/120"],
    own_literals=["192.0.2.10"],
)
UNTRUSTED_IP = ipaddress.ip_address("192.0.2.50")


def verdict(recipient, resolved=None, rules=RULES):
    """The verdict for an untrusted client: is the recipient ours?"""
    return relay_verdict(parse_recipient(recipient), resolved, rules)


LOCAL_RECIPIENTS = [
    ("<user@local.test>", "local-domain"),
    ("<USER@LOCAL.TEST>", "local-domain"),
    ("<user@Local.Test.>", "local-domain"),
    ("user@local.test", "local-domain"),
    ('<"john doe"@local.test>', "local-domain"),
    ("<user@a.hosted.test>", "local-domain"),
    ("<user@deep.a.HOSTED.test>", "local-domain"),
    ("<user@straße.test>", "local-domain"),
    ("<user@XN--STRAE-OQA.test>", "local-domain"),
    ("<user@[192.0.2.10]>", "own-literal"),
    ("<postmaster>", "postmaster"),
    ("<POSTMASTER>", "postmaster"),
    ("<postmaster@local.test>", "postmaster"),
    ("<PostMaster@LOCAL.TEST.>", "postmaster"),
]


@pytest.mark.parametrize("recipient, reason", LOCAL_RECIPIENTS)
def test_untrusted_client_may_send_to_local_recipients(recipient, reason):
    result = verdict(recipient)
    assert (result.allowed, result.reason.word) == (True, reason)


RELAY_ATTEMPTS = [
    # recipient, reason: each from an untrusted client
    ("<user@remote.test>", "remote-domain"),
    ("<user@remote.test.>", "remote-domain"),
    ("<USER@REMOTE.TEST>", "remote-domain"),
    ("<user@local.test.remote.test>", "remote-domain"),
    ("<user@notlocal.test>", "remote-domain"),
    ("<user@hosted.test>", "remote-domain"),          # ".x" means subdomains only
    ("<user@evilhosted.test>", "remote-domain"),
    ("<user@straße.test.remote.test>", "remote-domain"),
    ("user@remote.test", "remote-domain"),
    ("<postmaster@remote.test>", "remote-domain"),
    # percent hack
    ("<user%remote.test@local.test>", "percent-hack"),
    ("<user%remote.test>", "percent-hack"),
    ("<user%local.test@local.test>", "percent-hack"),
    ("<postmaster%remote.test@local.test>", "percent-hack"),
    ('<"user%remote.test"@local.test>', "percent-hack"),
    # bang paths
    ("<remote.test!user@local.test>", "bang-path"),
    ("<remote.test!user>", "bang-path"),
    ("<remote.test!postmaster>", "bang-path"),
    ('<"remote.test!user"@local.test>', "bang-path"),
    # "@" inside the local part
    ('<"user@remote.test"@local.test>', "at-in-local-part"),
    ("<user\\@remote.test@local.test>", "at-in-local-part"),
    ("<user@remote.test@local.test>", "at-in-local-part"),
    ("<user@local.test@remote.test>", "at-in-local-part"),
    # source routes
    ("<@local.test:user@remote.test>", "source-route"),
    ("<@remote.test:user@local.test>", "source-route"),
    ("<@remote.test:postmaster@local.test>", "source-route"),
    ("<@a.test,@local.test:user@local.test>", "source-route"),
    # address literals
    ("<user@[192.0.2.99]>", "foreign-literal"),
    ("<user@[127.0.0.1]>", "foreign-literal"),
    ("<user@[IPv6:2001:db8::1]>", "foreign-literal"),
    ("<user@[192.0.2.1O]>", "malformed-domain"),
    ("<user@[1.2.3]>", "malformed-domain"),
    # missing, empty, malformed or mapped domains
    ("<user>", "no-domain"),
    ('<"postmaster">', "no-domain"),
    ("<user@>", "empty-domain"),
    ("<user@local..test>", "malformed-domain"),
    ("<user@.local.test>", "malformed-domain"),
    ("<user@-local.test>", "malformed-domain"),
    ("<user@local.test..>", "malformed-domain"),
    ("<user@ｌｏｃａｌ.test>", "mapped-domain"),
    ("<user@local\u3002test>", "mapped-domain"),
]


@pytest.mark.parametrize("recipient, reason", RELAY_ATTEMPTS)
def test_untrusted_relay_attempt_is_denied(recipient, reason):
    result = verdict(recipient)
    assert (result.allowed, result.reason.word) == (False, reason)


@pytest.mark.parametrize("client, trust", [
    ("127.0.0.1", Trust.TRUSTED_NETWORK),
    ("::1", Trust.TRUSTED_NETWORK),
    ("::ffff:127.0.0.1", Trust.TRUSTED_NETWORK),       # v4-mapped
    ("2001:db8:1:ff::9", Trust.TRUSTED_NETWORK),
    ("198.51.100.7", Trust.TRUSTED_NETWORK),           # network written v4-mapped
    ("2001:db8:2::9", Trust.UNTRUSTED),
    ("192.0.2.50", Trust.UNTRUSTED),
    ("::ffff:192.0.2.50", Trust.UNTRUSTED),
    (None, Trust.UNTRUSTED),                           # unknown address: never trusted
])
def test_trust_comes_from_the_client_address(client, trust):
    address = ipaddress.ip_address(client) if client else None
    assert client_trust(address, None, RULES) is trust


def test_empty_auth_macro_is_not_authentication():
    assert client_trust(UNTRUSTED_IP, "", RULES) is Trust.UNTRUSTED


def test_authentication_is_ignored_when_not_trusted_by_config():
    rules = RelayRules.build(local_domains=["local.test"], trust_authenticated=False)
    assert client_trust(UNTRUSTED_IP, "alice", rules) is Trust.UNTRUSTED


@pytest.mark.parametrize("resolved, allowed, reason", [
    (None, True, "local-domain"),
    ("user@local.test", True, "local-domain"),
    ("user@LOCAL.TEST.", True, "local-domain"),
    ("user", True, "local-domain"),                 # Sendmail's local mailer: no domain
    ("user@remote.test", False, "mta-resolves-remote"),
    ("user@[192.0.2.99]", False, "mta-resolves-remote"),
    ("user@[192.0.2.10]", True, "local-domain"),
    ("user@bad..test", False, "mta-resolves-remote"),
    ("us\udcffer@local.test", False, "mta-resolves-remote"),   # macro was not UTF-8
    ("\udcff", False, "mta-resolves-remote"),
])
def test_mta_resolution_must_agree_that_the_recipient_is_local(resolved, allowed, reason):
    result = verdict("<user@local.test>", resolved=resolved)
    assert (result.allowed, result.reason.word) == (allowed, reason)


def test_remote_recipient_is_denied_whatever_the_mta_resolved():
    assert verdict("<user@remote.test>", resolved="user@local.test").allowed is False


def test_bare_postmaster_is_accepted_even_if_the_mta_appends_its_own_domain():
    assert verdict("<postmaster>", resolved="postmaster@mx.elsewhere.test").allowed is True


@pytest.mark.parametrize("domain, local", [
    ("local.test", True), ("x.hosted.test", True), ("hosted.test", False),
    ("xhosted.test", False), ("test", False), ("xn--strae-oqa.test", True),
])
def test_is_local_domain_handles_exact_and_subdomain_patterns(domain, local):
    assert is_local_domain(domain, RULES) is local


@pytest.mark.parametrize("bad", [["local..test"], ["-x.test"], [".."]])
def test_bad_domain_patterns_are_refused(bad):
    with pytest.raises(ValueError, match="not a domain"):
        RelayRules.build(local_domains=bad)


@pytest.mark.parametrize("bad", [["10.0.0.0/33"], ["not-a-net"], ["::1/129"]])
def test_bad_networks_are_refused(bad):
    with pytest.raises(ValueError, match="not an IP network"):
        RelayRules.build(trusted_networks=bad)


ONLY_IDNA_2008 = RelayRules.build(local_domains=["straße.test", "ς.test"])


def test_idna_2003_resolution_of_a_local_idn_is_refused_unless_listed():
    # Postfix reports user@straße.test as user@strasse.test (IDNA 2003).
    assert verdict("<user@straße.test>", resolved="user@strasse.test",
                   rules=ONLY_IDNA_2008).allowed is False
    assert verdict("<user@straße.test>", resolved="user@strasse.test").allowed


@pytest.mark.parametrize("recipient", ["<user@straße.test>", "<user@STRAẞE.test>",
                                       "<user@xn--strae-oqa.test>", "<user@ς.test>"])
def test_a_local_idn_whose_mta_reading_is_not_local_is_refused_without_rcpt_addr(recipient):
    # The policy service has no {rcpt_addr}: our own reading of the twins is the lock.
    result = verdict(recipient, rules=ONLY_IDNA_2008)
    assert (result.allowed, result.reason.word) == (False, "mta-resolves-remote")


def test_the_ascii_twin_of_a_listed_idn_stays_remote_unless_listed():
    assert verdict("<user@strasse.test>", rules=ONLY_IDNA_2008).allowed is False


def test_mta_readings_name_the_idna_2003_and_case_folded_forms():
    from relaymilter.address import mta_readings, normalise_domain
    assert mta_readings(normalise_domain("straße.test")) == ("strasse.test",)
    assert mta_readings(normalise_domain("ς.test")) == (normalise_domain("σ.test"),)
    assert mta_readings(normalise_domain("bücher.test")) == ()
    assert mta_readings("local.test") == ()


def test_transitional_variant_names_the_idna_2003_form():
    from relaymilter.address import normalise_domain, transitional_variant
    assert transitional_variant(normalise_domain("straße.test")) == "strasse.test"
    assert transitional_variant(normalise_domain("bücher.test")) is None
    assert transitional_variant("local.test") is None
