"""domainpolicy.py: the immutable domain policy, without any store.

The lookups of a domain policy loaded from a store are part of the
Storage contract (test_storage_contract.py).
"""

import ipaddress
import subprocess
import sys

import pytest

from relaymilter.domainpolicy import EMPTY_POLICY, DomainPolicy, Hold
from relaymilter.store import StoreInputError


def ip(text):
    return ipaddress.ip_address(text)


def test_empty_policy_counts_no_entries():
    assert EMPTY_POLICY.counts == {"allowlist": 0, "relay_clients": 0, "holds": 0,
                                   "limits": 0, "domains": 0}


def test_empty_policy_allows_and_restricts_nothing():
    assert EMPTY_POLICY.held(ip("192.0.2.1"), "alice") is None
    assert EMPTY_POLICY.relay_client(ip("192.0.2.1")) is None
    assert EMPTY_POLICY.owned_domains("alice") is None
    assert not EMPTY_POLICY.allowlisted(ip("192.0.2.1"), "example.com")
    assert EMPTY_POLICY.domain_dnsbl("example.com") is None
    assert EMPTY_POLICY.limit("user", "bob") is None


def test_domain_policy_from_a_document_needs_no_header():
    policy = DomainPolicy.from_document({"holds": [{"kind": "user", "value": "eve"}]})
    assert policy.held(None, "eve") == Hold("user", "eve", "")
    with pytest.raises(StoreInputError):
        DomainPolicy.from_document({"holds": [{"kind": "user"}]})


def test_a_domain_policy_from_a_document_never_changes():
    policy = DomainPolicy.from_document({"holds": [{"kind": "user", "value": "eve"}]})
    with pytest.raises(AttributeError):
        policy._user_holds = {}
    with pytest.raises(AttributeError):
        del policy._user_holds
    assert policy.held(None, "eve") == Hold("user", "eve", "")


def test_the_engine_side_imports_no_database_module():
    # The engine imports domainpolicy, the milter's watcher storewatch:
    # sqlite3 comes only with a store that is opened (store.open_store).
    code = ("import sys, relaymilter.domainpolicy, relaymilter.store, relaymilter.storewatch; "
            "print(sorted(name for name in ('sqlite3', '_sqlite3', 'relaymilter.sqlitestore') "
            "if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_user_holds_limits_and_owners_match_the_login_whatever_its_case():
    policy = DomainPolicy.from_document({
        "holds": [{"kind": "user", "value": "Zed@Example.COM", "reason": "phished"}],
        "limits": [{"kind": "user", "value": "CAROL", "per_hour": 5}],
        "domains": [{"domain": "cust.example", "owners": ["Alice"]},
                    {"domain": "other.example", "owners": ["alice"]}]})
    assert policy.held(None, "zed@example.com") == Hold("user", "Zed@Example.COM", "phished")
    assert policy.limit("user", "carol").per_hour == 5
    assert policy.owned_domains("ALICE") == frozenset({"cust.example", "other.example"})
    assert policy.held(None, "zed@example.org") is None


def test_from_rows_merges_owners_spelt_in_several_cases():
    from relaymilter.netindex import NetworkIndex
    policy = DomainPolicy.from_rows(NetworkIndex.from_blocks(()), {}, (), (), (), (), (),
                                    [("Bob", ["a.example"]), ("bob", ["b.example"])])
    assert policy.owned_domains("BOB") == frozenset({"a.example", "b.example"})


@pytest.mark.parametrize("network, wide", [
    ("0.0.0.0/0", True), ("10.0.0.0/7", True), ("10.0.0.0/8", False), ("::/0", True),
    ("2001:db8::/31", True), ("2001:db8::/32", False), ("::/64", True),
    ("::ffff:0:0/96", True), ("::ffff:10.0.0.0/104", False), ("::1/128", False)])
def test_too_wide_is_wider_than_8_or_32_or_every_ipv4_mapped_address(network, wide):
    from relaymilter.address import parse_network
    from relaymilter.entries import too_wide
    assert too_wide(parse_network(network)) is wide
