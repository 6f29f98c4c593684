"""The Storage contract: what every domain policy backend must do.

One suite, run once per backend in BACKENDS, through openstore.open_store()
and the Storage API only: entries, canonical forms, validation, import
and export, change detection, and the DomainPolicy a store loads. What
one backend does its own way is tested beside it (test_sqlitestore.py);
DomainPolicy without a store in test_domainpolicy.py.
"""

import ipaddress
import itertools
import json
import time

import pytest

from relaymilter.domainpolicy import DomainDnsbl, DomainPolicy, Hold, RelayClient
from relaymilter.limits import RATE_NAMES, Limit
from relaymilter.openstore import open_store
from relaymilter.store import FORMAT, StoreInputError, default_actor


def ip(text):
    return ipaddress.ip_address(text)


# Backend -> location(request, name): where the test's store called name
# is, empty before the test (a SQLite file in tmp_path; a database of its
# own on the session's private PostgreSQL).
def sqlite_location(request, name):
    return request.getfixturevalue("tmp_path") / f"{name}.sqlite3"


def postgresql_location(request, name):
    server = request.getfixturevalue("postgres")
    database = f"contract_{next(_databases)}_{name}"
    request.addfinalizer(lambda: server.drop_database(database))
    return server.create_database(database)


_databases = itertools.count(1)
BACKENDS = {"sqlite": sqlite_location, "postgresql": postgresql_location}


@pytest.fixture(params=sorted(BACKENDS))
def location(request):
    """location(name="policy") -> where the store called name is, for open_store();
    the same name gives the same store within a test."""
    made: dict[str, object] = {}

    def where(name="policy"):
        if name not in made:
            made[name] = BACKENDS[request.param](request, name)
        return made[name]
    return where


@pytest.fixture
def storage(location):
    with open_store(location()) as opened:
        yield opened


def document(**sections):
    return {"format": FORMAT, "version": 1, **sections}


def test_reopening_keeps_the_entries(location):
    with open_store(location()) as storage:
        storage.add_allowlist("192.0.2.0/24")
        version = storage.schema_version()
    with open_store(location()) as storage:
        assert [entry["network"] for entry in storage.list_allowlist()] == ["192.0.2.0/24"]
        assert storage.schema_version() == version


# ----------------------------------------------------------- entries ---

def test_every_entry_records_comment_creation_time_and_who_added_it(storage):
    before = time.time()
    storage.add_allowlist("192.0.2.0/24", comment="partner MX", added_by="carol")
    (entry,) = storage.list_allowlist()
    assert entry == {"network": "192.0.2.0/24", "domain": "", "comment": "partner MX",
                     "created": entry["created"], "added_by": "carol", "expires": None}
    assert before <= entry["created"] <= time.time()


def test_added_by_defaults_to_the_sudo_user(storage, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "dave")
    assert default_actor() == "dave"
    storage.add_hold("user", "mallory")
    assert storage.list_holds()[0]["added_by"] == "dave"


def test_added_by_falls_back_to_the_login_name(monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("LOGNAME", "erin")
    assert default_actor() == "erin"


@pytest.mark.parametrize("written, canonical", [
    ("192.0.2.7/24", "192.0.2.0/24"),
    ("192.0.2.7", "192.0.2.7/32"),
    (" 10.0.0.0/8 ", "10.0.0.0/8"),
    ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
    ("::ffff:192.0.2.1", "192.0.2.1/32"),
    ("2001:DB8:0:0::1", "2001:db8::1/128"),
    ("2001:db8::1/48", "2001:db8::/48"),
])
def test_networks_are_stored_in_canonical_form(storage, written, canonical):
    storage.add_allowlist(written)
    assert storage.list_allowlist()[0]["network"] == canonical
    assert storage.remove_allowlist(canonical)
    assert storage.list_allowlist() == []


@pytest.mark.parametrize("written, canonical", [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
])
def test_domains_are_stored_in_canonical_form(storage, written, canonical):
    storage.add_allowlist("192.0.2.1", written)
    storage.set_domain(written)
    storage.add_relay_client("198.51.100.0/24", [written])
    assert storage.list_allowlist()[0]["domain"] == canonical
    assert storage.list_domains()[0]["domain"] == canonical
    assert storage.list_relay_clients()[0]["sender_domains"] == [canonical]


def test_adding_an_existing_key_replaces_the_entry(storage):
    storage.add_allowlist("192.0.2.0/24", "example.com", comment="old", added_by="carol")
    storage.add_allowlist("192.0.2.9/24", "EXAMPLE.com", comment="new", added_by="dave")
    (entry,) = storage.list_allowlist()
    assert (entry["comment"], entry["added_by"]) == ("new", "dave")


def test_the_same_network_may_be_allowlisted_globally_and_per_domain(storage):
    storage.add_allowlist("192.0.2.0/24")
    storage.add_allowlist("192.0.2.0/24", "a.example")
    storage.add_allowlist("192.0.2.0/24", "b.example")
    assert [entry["domain"] for entry in storage.list_allowlist()] == ["", "a.example", "b.example"]
    assert storage.remove_allowlist("192.0.2.0/24", "a.example")
    assert not storage.remove_allowlist("192.0.2.0/24", "a.example")
    assert [entry["domain"] for entry in storage.list_allowlist()] == ["", "b.example"]


def test_an_allowlist_domain_can_go_and_come_back(storage):
    storage.add_allowlist("192.0.2.0/24", "example.com")
    assert storage.remove_allowlist("192.0.2.0/24", "example.com")
    assert not storage.remove_allowlist("192.0.2.0/24", "never-listed.example")
    assert not storage.load_policy().allowlisted(ip("192.0.2.1"), "example.com")
    storage.add_allowlist("198.51.100.0/24", "example.com")
    policy = storage.load_policy()
    assert policy.allowlisted(ip("198.51.100.1"), "example.com")
    assert not policy.allowlisted(ip("192.0.2.1"), "example.com")


def test_lists_are_sorted_by_address_not_text(storage):
    for network in ("10.0.0.0/8", "9.0.0.0/8", "2001:db8::/32", "192.0.2.0/24", "10.0.0.0/16"):
        storage.add_relay_client(network)
    assert [entry["network"] for entry in storage.list_relay_clients()] == [
        "9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16", "192.0.2.0/24", "2001:db8::/32"]


def test_relay_client_sender_domains_are_replaced_with_the_entry(storage):
    storage.add_relay_client("198.51.100.0/24", ["b.example", "a.example", "A.example"])
    assert storage.list_relay_clients()[0]["sender_domains"] == ["a.example", "b.example"]
    storage.add_relay_client("198.51.100.0/24", ["c.example"])
    assert storage.list_relay_clients()[0]["sender_domains"] == ["c.example"]
    storage.add_relay_client("198.51.100.0/24")
    assert storage.list_relay_clients()[0]["sender_domains"] == []


def test_removing_a_relay_client_removes_its_sender_domains(storage):
    storage.add_relay_client("198.51.100.0/24", ["a.example"])
    assert storage.remove_relay_client("198.51.100.7/24")
    assert not storage.remove_relay_client("198.51.100.0/24")
    assert storage.list_relay_clients() == []
    storage.add_relay_client("198.51.100.0/24")
    assert storage.list_relay_clients()[0]["sender_domains"] == []


def test_holds_for_clients_and_users(storage):
    storage.add_hold("client", "203.0.113.5", reason="spam run")
    storage.add_hold("user", "alice", reason="phished")
    storage.add_hold("user", "bob")
    assert [(entry["kind"], entry["value"], entry["reason"]) for entry in storage.list_holds()] == [
        ("client", "203.0.113.5/32", "spam run"), ("user", "alice", "phished"),
        ("user", "bob", "")]
    assert storage.remove_hold("client", "203.0.113.5/32")
    assert storage.remove_hold("user", " alice ")
    assert not storage.remove_hold("user", "alice")


def test_a_hold_with_an_end_is_in_force_until_then_and_the_policy_says_when(storage):
    now = time.time()
    storage.add_hold("user", "alice", reason="phished", expires=now + 3600)
    storage.add_hold("client", "203.0.113.0/24", expires=now + 60)
    storage.add_hold("user", "bob", expires=now - 1)          # already over
    storage.add_hold("user", "carol")
    assert [entry["expires"] for entry in storage.list_holds()] == [
        pytest.approx(now + 60), pytest.approx(now + 3600), pytest.approx(now - 1), None]
    policy = storage.load_policy()
    assert policy.held(None, "alice").expires == pytest.approx(now + 3600)
    assert policy.held(ip("203.0.113.9"), None) is not None
    assert policy.held(None, "bob") is None and policy.held(None, "carol") is not None
    assert policy.next_expiry == pytest.approx(now + 60)
    exported = storage.export()
    assert [row["expires"] for row in exported["holds"]][1] == pytest.approx(now + 3600)


def test_allowlist_entries_and_relay_clients_may_end_by_themselves(storage, monkeypatch):
    now = time.time()
    storage.add_allowlist("192.0.2.0/24", expires=now + 60)
    storage.add_allowlist("198.51.100.0/24", "example.com", expires=now - 1)   # over
    storage.add_relay_client("203.0.113.0/24", expires=now + 30)
    storage.add_relay_client("203.0.113.64/26", expires=now - 1)               # over
    assert [entry["expires"] for entry in storage.list_allowlist()] == [
        pytest.approx(now + 60), pytest.approx(now - 1)]
    policy = storage.load_policy()
    assert policy.allowlisted(ip("192.0.2.9"), "example.org")
    assert not policy.allowlisted(ip("198.51.100.9"), "example.com")
    assert policy.relay_client(ip("203.0.113.70")).network == "203.0.113.0/24"
    assert policy.next_expiry == pytest.approx(now + 30)
    assert policy.counts["allowlist"] == 1 and policy.counts["relay_clients"] == 1
    later = now + 31
    monkeypatch.setattr(time, "time", lambda: later)
    assert policy.relay_client(ip("203.0.113.70")) is None     # ended: no relaying
    exported = storage.export()
    assert exported["relay_clients"][0]["expires"] == pytest.approx(now + 30)


def test_a_client_hold_may_block_everything(storage):
    storage.add_hold("client", "192.0.2.77", reason="relay probing", scope="all",
                     expires=time.time() + 60)
    storage.add_hold("client", "198.51.100.0/24")
    assert [(hold["value"], hold["scope"]) for hold in storage.list_holds()] == [
        ("192.0.2.77/32", "all"), ("198.51.100.0/24", "relay")]
    policy = storage.load_policy()
    assert policy.blocked(ip("192.0.2.77")).reason == "relay probing"
    assert policy.blocked(ip("198.51.100.9")) is None
    assert policy.held(ip("198.51.100.9"), None) is not None
    with pytest.raises(StoreInputError, match="only a client hold may block everything"):
        storage.add_hold("user", "alice", scope="all")
    with pytest.raises(StoreInputError, match="scope must be 'relay' or 'all'"):
        storage.add_hold("client", "192.0.2.1", scope="some")
    document = storage.export()
    storage.import_policy(document, replace=True)
    assert storage.export()["holds"] == document["holds"]


def test_ended_entries_are_removed_once_with_their_end_in_the_history(location):
    now = time.time()
    with open_store(location()) as storage:
        storage.add_hold("user", "alice", expires=now + 100)
        storage.add_hold("user", "bob")
        storage.add_allowlist("192.0.2.0/24", "example.com", expires=now + 50)
        storage.add_relay_client("203.0.113.0/24", expires=now + 200)
        assert storage.remove_ended(now + 40) == []
        with open_store(location()) as other:       # another process, another host
            assert other.remove_ended(now + 150) == [
                ("allowlist", "192.0.2.0/24 for example.com"), ("holds", "user alice")]
        assert storage.remove_ended(now + 150) == []
        assert [entry["value"] for entry in storage.list_holds()] == ["bob"]
        assert storage.list_allowlist() == []
        assert len(storage.list_relay_clients()) == 1
        storage.add_hold("user", "alice", expires=now + 1000)   # written again: stays
        assert storage.remove_ended(now + 150) == []
        ended = [(event["at"], event["actor"], event["entry"])
                 for event in storage.history() if event["action"] == "expire"]
    assert ended == [(pytest.approx(now + 50), "relaymilter", "192.0.2.0/24 for example.com"),
                     (pytest.approx(now + 100), "relaymilter", "user alice")]


def test_a_hold_that_ends_while_the_policy_is_in_force_stops_counting(storage, monkeypatch):
    storage.add_hold("user", "alice", expires=time.time() + 60)
    policy = storage.load_policy()
    assert policy.held(None, "alice") is not None
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    assert policy.held(None, "alice") is None


def test_user_names_differing_in_case_are_one_hold_shown_as_last_written(storage):
    storage.add_hold("user", "Zed@Example.COM", reason="phished")
    storage.add_hold("user", "ZED@example.com", reason="phished again")
    assert [(entry["value"], entry["reason"]) for entry in storage.list_holds()] == [
        ("ZED@example.com", "phished again")]
    assert storage.load_policy().held(None, "zed@example.com").reason == "phished again"
    assert storage.remove_hold("user", "zed@EXAMPLE.com")
    assert storage.list_holds() == []


def test_user_limits_and_owners_ignore_case(storage):
    storage.set_limit("user", "Carol", 5)
    storage.set_limit("user", "CAROL", 7)
    assert [(entry["value"], entry["per_hour"]) for entry in storage.list_limits()] == [
        ("CAROL", 7)]
    storage.set_domain("cust.example", owners=["Alice", "alice", "Bob"])
    assert storage.list_domains()[0]["owners"] == ["Alice", "Bob"]
    policy = storage.load_policy()
    assert policy.limit("user", "carol").per_hour == 7
    assert policy.owned_domains("ALICE") == frozenset({"cust.example"})
    assert storage.remove_limit("user", "carol")


def test_relay_clients_wider_than_8_or_32_need_force(storage):
    from relaymilter.store import WideNetworkError
    for network in ("0.0.0.0/0", "10.0.0.0/7", "::/0", "2001::/31", "::ffff:0:0/96", "::/80"):
        with pytest.raises(WideNetworkError, match="open relay"):
            storage.add_relay_client(network)
    assert storage.list_relay_clients() == []
    storage.add_relay_client("10.0.0.0/8")
    storage.add_relay_client("2001:db8::/32")
    storage.add_relay_client("0.0.0.0/0", force=True)
    assert [entry["network"] for entry in storage.list_relay_clients()] == [
        "0.0.0.0/0", "10.0.0.0/8", "2001:db8::/32"]


def test_import_of_a_wide_relay_client_names_the_row_unless_forced(storage):
    from relaymilter.store import WideNetworkError
    wide = document(relay_clients=[{"network": "192.0.2.0/24"}, {"network": "::/0"}])
    with pytest.raises(WideNetworkError, match="relay_clients row 2: relay client ::/0"):
        storage.import_policy(wide)
    assert storage.list_relay_clients() == []
    assert storage.import_policy(wide, force=True)["relay_clients"] == 2


def test_import_changes_tell_what_an_import_would_do_and_write_nothing(storage):
    storage.add_hold("user", "alice", reason="phished")
    storage.add_hold("user", "bob")
    storage.add_allowlist("192.0.2.0/24", "example.com")
    wanted = document(holds=[{"kind": "user", "value": "ALICE", "reason": "phished"},
                             {"kind": "user", "value": "bob", "reason": "new reason"},
                             {"kind": "client", "value": "203.0.113.0/24"}])
    assert storage.import_changes(wanted, replace=True) == {
        "allowlist": {"added": [], "replaced": [], "removed": ["192.0.2.0/24 for example.com"]},
        "relay_clients": {"added": [], "replaced": [], "removed": []},
        "holds": {"added": ["client 203.0.113.0/24"],
                  "replaced": ["user ALICE", "user bob"], "removed": []},
        "limits": {"added": [], "replaced": [], "removed": []},
        "domains": {"added": [], "replaced": [], "removed": []}}
    assert storage.import_changes(wanted)["allowlist"]["removed"] == []
    assert len(storage.list_holds()) == 2 and len(storage.list_allowlist()) == 1


def test_entry_finds_the_entry_of_a_key(storage):
    storage.add_hold("user", "Zed", reason="phished")
    assert storage.entry("holds", kind="user", value="zed")["reason"] == "phished"
    assert storage.entry("holds", kind="client", value="192.0.2.1") is None
    storage.add_relay_client("192.0.2.0/24", ["a.example"])
    assert storage.entry("relay_clients", network="192.0.2.7/24")["sender_domains"] == [
        "a.example"]


def test_limits_have_a_default_per_kind_and_overrides(storage):
    storage.set_limit("user", None, 500)
    storage.set_limit("user", "bob", 50)
    storage.set_limit("client", "", 1000)
    storage.set_limit("client", "192.0.2.0/24", 100)
    assert [(entry["kind"], entry["value"], entry["per_hour"])
            for entry in storage.list_limits()] == [
        ("client", "", 1000), ("client", "192.0.2.0/24", 100), ("user", "", 500),
        ("user", "bob", 50)]
    storage.set_limit("user", None, 600)
    assert storage.list_limits()[2]["per_hour"] == 600
    assert storage.remove_limit("user", None)
    assert storage.remove_limit("client", "192.0.2.1/24")
    assert not storage.remove_limit("user", "")


def test_a_limit_keeps_every_rate_and_needs_one(storage):
    storage.set_limit("user", "bob", per_day=2000, messages_per_hour=40)
    storage.set_limit("client", "192.0.2.0/24", 100, messages_per_day=300)
    assert [{name: entry[name] for name in RATE_NAMES} for entry in storage.list_limits()] == [
        {"per_hour": 100, "per_day": None, "messages_per_hour": None, "messages_per_day": 300},
        {"per_hour": None, "per_day": 2000, "messages_per_hour": 40, "messages_per_day": None}]
    policy = storage.load_policy()
    assert policy.limit("user", "BOB") == Limit(per_day=2000, messages_per_hour=40)
    assert policy.limit("client", "192.0.2.9") == Limit(100, None, None, 300)
    with pytest.raises(StoreInputError, match="a limit needs one rate at least"):
        storage.set_limit("user", "carol")
    with pytest.raises(StoreInputError, match="messages_per_day must be a whole number"):
        storage.set_limit("user", "carol", messages_per_day=0)
    document = storage.export()
    storage.import_policy(document, replace=True)
    assert storage.export()["limits"] == document["limits"]


def test_domains_keep_dnsbl_threshold_and_owners(storage):
    storage.set_domain("example.com", dnsbl="off", owners=["bob", "alice"], comment="big one")
    storage.set_domain("example.net", threshold=3)
    assert [(entry["domain"], entry["dnsbl"], entry["threshold"], entry["owners"])
            for entry in storage.list_domains()] == [
        ("example.com", "off", None, ["alice", "bob"]), ("example.net", "on", 3, [])]
    assert storage.remove_domain("EXAMPLE.com")
    assert [entry["domain"] for entry in storage.list_domains()] == ["example.net"]
    storage.set_domain("example.com")
    assert storage.list_domains()[0]["owners"] == []
    assert storage.load_policy().owned_domains("alice") is None


@pytest.mark.parametrize("call, message", [
    (lambda s: s.add_allowlist("10.0.0.0/33"), "'10.0.0.0/33' is not an IP network"),
    (lambda s: s.add_allowlist("example.com"), "is not an IP network"),
    (lambda s: s.add_allowlist("10.0.0.0/8", "exa mple.com"), "is not a domain"),
    (lambda s: s.add_allowlist("10.0.0.0/8", comment="two\nlines"), "control characters"),
    (lambda s: s.add_allowlist("10.0.0.0/8", added_by="two words"), "added_by"),
    (lambda s: s.add_relay_client("10.0.0.0/8", "example.com"), "must be a list"),
    (lambda s: s.add_relay_client("10.0.0.0/8", ["ok.example", "-bad-.example"]),
     "is not a domain"),
    (lambda s: s.add_hold("group", "x"), "kind must be 'client' or 'user'"),
    (lambda s: s.add_hold("user", "two words"), "not a valid user name"),
    (lambda s: s.add_hold("user", ""), "needs a value"),
    (lambda s: s.add_hold("user", "x" * 256), "not a valid user name"),
    (lambda s: s.add_hold("client", "alice"), "is not an IP network"),
    (lambda s: s.set_limit("user", "bob", 0), "per_hour must be a whole number"),
    (lambda s: s.set_limit("user", "bob", True), "per_hour must be a whole number"),
    (lambda s: s.set_limit("user", "bob", "10"), "per_hour must be a whole number"),
    (lambda s: s.set_domain("example.com", dnsbl="maybe"), "dnsbl must be 'on' or 'off'"),
    (lambda s: s.set_domain("example.com", threshold=0), "threshold must be"),
    (lambda s: s.set_domain("example.com", owners=["ok", "not ok"]), "not a valid user"),
    (lambda s: s.remove_allowlist("10.0.0.0/33"), "is not an IP network"),
])
def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(storage, call, message):
    storage.add_allowlist("192.0.2.0/24", comment="before")
    storage.set_domain("example.com", owners=["alice"])
    before = storage.export()
    with pytest.raises(StoreInputError, match=message):
        call(storage)
    assert storage.export() == before


# ---------------------------------------------------- import, export ---

def populate(storage):
    storage.add_allowlist("192.0.2.0/24", comment="global")
    storage.add_allowlist("198.51.100.7", "example.com", added_by="carol")
    storage.add_allowlist("2001:db8::/48", "bücher.example")
    storage.add_relay_client("203.0.113.0/24", ["example.com"], comment="web farm")
    storage.add_relay_client("2001:db8:1::/64")
    storage.add_hold("client", "203.0.113.66", reason="compromised")
    storage.add_hold("user", "mallory", reason="phished")
    storage.set_limit("user", None, 500)
    storage.set_limit("user", "bob", 5000)
    storage.set_limit("client", "203.0.113.0/25", 100)
    storage.set_domain("example.com", dnsbl="off", owners=["alice", "bob"])
    storage.set_domain("example.net", threshold=2)


def test_export_then_import_into_an_empty_store_reproduces_it(storage, location):
    populate(storage)
    exported = storage.export()
    assert exported["format"] == FORMAT and exported["version"] == 1
    with open_store(location("copy")) as copy:
        counts = copy.import_policy(exported)
        assert copy.export() == exported
    assert counts == {"allowlist": 3, "relay_clients": 2, "holds": 2, "limits": 3,
                      "domains": 2}


def test_import_survives_a_json_round_trip(storage, location):
    populate(storage)
    exported = storage.export()
    with open_store(location("copy")) as copy:
        copy.import_policy(json.loads(json.dumps(exported)))
        assert copy.export() == exported


def test_import_without_created_or_added_by_stamps_now_and_the_actor(storage, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "frank")
    before = time.time()
    storage.import_policy(document(holds=[{"kind": "user", "value": "eve"}]))
    (entry,) = storage.list_holds()
    assert entry["added_by"] == "frank" and entry["created"] >= before


def test_import_merges_by_default_and_replace_starts_from_nothing(storage):
    populate(storage)
    storage.import_policy(document(allowlist=[{"network": "10.0.0.0/8"}]))
    assert len(storage.list_allowlist()) == 4
    counts = storage.import_policy(document(allowlist=[{"network": "10.0.0.0/8"}]),
                                 replace=True)
    assert counts["allowlist"] == 1
    exported = storage.export()
    assert [entry["network"] for entry in exported["allowlist"]] == ["10.0.0.0/8"]
    for section in ("relay_clients", "holds", "limits", "domains"):
        assert exported[section] == []


def test_import_replaces_an_existing_entry_and_its_lists(storage):
    storage.add_relay_client("203.0.113.0/24", ["a.example", "b.example"])
    storage.import_policy(document(relay_clients=[
        {"network": "203.0.113.0/24", "sender_domains": ["c.example"]}]))
    assert storage.list_relay_clients()[0]["sender_domains"] == ["c.example"]


def test_a_later_import_row_for_the_same_key_wins(storage):
    storage.import_policy(document(domains=[
        {"domain": "example.com", "owners": ["alice"]},
        {"domain": "EXAMPLE.COM", "owners": ["bob"], "dnsbl": "off"}]))
    (entry,) = storage.list_domains()
    assert (entry["owners"], entry["dnsbl"]) == (["bob"], "off")


def test_a_bad_row_at_position_10000_names_itself_and_nothing_is_applied(storage):
    populate(storage)
    before = storage.export()
    rows = [{"network": f"10.{n >> 8 & 255}.{n & 255}.0/24", "domain": f"d{n % 100}.example"}
            for n in range(10010)]
    rows[9999] = {"network": "10.0.0.0/33"}
    with pytest.raises(StoreInputError,
                       match=r"allowlist row 10000: '10.0.0.0/33' is not an IP network"):
        storage.import_policy(document(allowlist=rows))
    assert storage.export() == before
    with pytest.raises(StoreInputError):
        storage.import_policy(document(allowlist=rows), replace=True)
    assert storage.export() == before


def test_a_big_import_over_existing_entries_replaces_them_as_a_small_one_does(storage):
    storage.add_allowlist("10.0.1.0/24", "d1.example", comment="by hand")
    rows = [{"network": f"10.0.{n}.0/24", "domain": f"d{n % 7}.example", "comment": "bulk"}
            for n in range(256)] * 6         # 1,536 rows, each key six times
    rows += [{"network": "10.0.1.0/24", "domain": "d1.example", "comment": "last word"}]
    assert storage.import_policy(document(allowlist=rows))["allowlist"] == 256
    entries = storage.list_allowlist()
    assert len(entries) == 256      # the entry made by hand is one of the import's keys
    comments = {(entry["network"], entry["domain"]): entry["comment"] for entry in entries}
    assert comments[("10.0.1.0/24", "d1.example")] == "last word"
    assert storage.load_policy().allowlisted(ip("10.0.200.9"), "d4.example")


def test_twenty_thousand_rows_import_whole_through_the_bulk_path(storage):
    # Its speed is bench/store_scale.py's; here, that the bulk path (COPY on
    # PostgreSQL) writes every row as a single write would.
    rows = [{"network": f"10.{n >> 8 & 255}.{n & 255}.0/24", "domain": f"d{n % 100}.example",
             "comment": "bulk", "expires": None if n % 2 else 4e9 + n} for n in range(20000)]
    assert storage.import_policy(document(allowlist=rows))["allowlist"] == 20000
    listed = {(entry["network"], entry["domain"]): entry for entry in storage.list_allowlist()}
    assert len(listed) == 20000
    assert (listed[("10.78.31.0/24", "d99.example")]["comment"],      # n = 19999
            listed[("10.78.31.0/24", "d99.example")]["expires"]) == ("bulk", None)
    assert listed[("10.78.30.0/24", "d98.example")]["expires"] == 4e9 + 19998
    policy = storage.load_policy()
    assert policy.allowlisted(ip("10.78.31.200"), "d99.example")
    assert not policy.allowlisted(ip("10.78.31.200"), "d98.example")


@pytest.mark.parametrize("bad, message", [
    ([], "a policy document is a JSON object"),
    ({"version": 1}, "format"),
    ({"format": "something-else", "version": 1}, "format"),
    ({"format": FORMAT, "version": 2}, "version 2 is newer"),
    ({"format": FORMAT, "version": "1"}, "version"),
    (document(allowlists=[]), "unknown section 'allowlists'"),
    (document(allowlist={"network": "10.0.0.0/8"}), "allowlist must be a list"),
    (document(allowlist=["10.0.0.0/8"]), "allowlist row 1: an entry is a JSON object"),
    (document(holds=[{"kind": "user", "value": "eve", "until": 5}]),
     "holds row 1: unknown key 'until'"),
    (document(limits=[{"kind": "user", "value": "eve"}]),
     "limits row 1: a limit needs one rate at least"),
    (document(domains=[{"domain": "example.com", "created": "yesterday"}]),
     "domains row 1: created must be a unix time"),
    (document(domains=[{"domain": "a.example"}, {"domain": "b.example", "owners": "bob"}]),
     "domains row 2: owners must be a list"),
])
def test_a_bad_document_is_refused_with_a_clear_message(storage, bad, message):
    populate(storage)
    before = storage.export()
    with pytest.raises(StoreInputError, match=message):
        storage.import_policy(bad)
    assert storage.export() == before


# ----------------------------------------------------------- history ---

def test_every_change_is_in_the_history_with_when_who_and_what(storage):
    started = time.time()
    storage.add_hold("user", "Alice", reason="phished", added_by="jane")
    storage.add_allowlist("192.0.2.7/24", "Example.COM")
    assert not storage.remove_hold("user", "nobody")            # nothing removed, no event
    assert storage.remove_hold("user", " alice ", by="panel")
    storage.import_policy(document(domains=[{"domain": "a.example"}]), replace=True)
    events = storage.history()
    assert [(event["actor"], event["action"], event["section"], event["entry"])
            for event in events] == [
        ("jane", "add", "holds", "user Alice"),
        (default_actor(), "add", "allowlist", "192.0.2.0/24 for example.com"),
        ("panel", "remove", "holds", "user alice"),
        (default_actor(), "import --replace", "policy", "1 entries")]
    assert json.loads(events[0]["detail"]) == {"reason": "phished", "scope": "relay"}
    assert json.loads(events[3]["detail"])["domains"] == 1
    assert all(started - 1 <= event["at"] <= time.time() for event in events)
    assert storage.history(since=events[2]["at"]) == events[2:]
    assert storage.history(since=time.time() + 60) == []


def test_a_refused_write_leaves_no_trace_in_the_history(storage):
    with pytest.raises(StoreInputError):
        storage.import_policy(document(allowlist=[{"network": "bad"}]))
    with pytest.raises(StoreInputError):
        storage.add_hold("user", "alice", added_by="two words")
    assert storage.history() == []


# ------------------------------------------------------ data_version ---

def test_data_version_moves_when_another_connection_commits(location):
    with open_store(location()) as watcher, open_store(location()) as writer:
        first = watcher.data_version()
        assert watcher.data_version() == first
        watcher.load_policy()
        assert watcher.data_version() == first
        writer.add_allowlist("192.0.2.0/24")
        second = watcher.data_version()
        assert second != first
        assert watcher.data_version() == second


def test_a_failed_import_does_not_move_data_version(location):
    with open_store(location()) as watcher, open_store(location()) as writer:
        first = watcher.data_version()
        with pytest.raises(StoreInputError):
            writer.import_policy(document(allowlist=[{"network": "bad"}]))
        assert watcher.data_version() == first


# ------------------------------------------- the domain policy loaded ---

@pytest.fixture
def policy(storage):
    populate(storage)
    return storage.load_policy()


def test_a_loaded_domain_policy_counts_entries_per_section(policy):
    assert policy.counts == {"allowlist": 3, "relay_clients": 2, "holds": 2, "limits": 3,
                             "domains": 2}


def test_global_allowlist_entry_holds_for_every_recipient_domain(policy):
    assert policy.allowlisted(ip("192.0.2.9"), "example.com")
    assert policy.allowlisted(ip("192.0.2.9"), "anything.example")
    assert policy.allowlisted(ip("192.0.2.9"), None)
    assert policy.allowlisted(ip("::ffff:192.0.2.9"), "example.com")


def test_scoped_allowlist_entry_holds_for_exactly_its_domain(policy):
    assert policy.allowlisted(ip("198.51.100.7"), "example.com")
    assert not policy.allowlisted(ip("198.51.100.7"), "sub.example.com")
    assert not policy.allowlisted(ip("198.51.100.7"), "example.net")
    assert not policy.allowlisted(ip("198.51.100.7"), None)
    assert not policy.allowlisted(ip("198.51.100.8"), "example.com")
    assert policy.allowlisted(ip("2001:db8::5"), "xn--bcher-kva.example")


def test_no_client_address_is_never_allowlisted(policy):
    assert not policy.allowlisted(None, "example.com")


def test_client_holds_match_by_containment_and_come_before_user_holds(policy):
    assert policy.held(ip("203.0.113.66"), None) == Hold("client", "203.0.113.66/32",
                                                         "compromised")
    assert policy.held(ip("203.0.113.66"), "mallory").kind == "client"
    assert policy.held(ip("203.0.113.67"), "mallory") == Hold("user", "mallory", "phished")
    assert policy.held(ip("203.0.113.67"), "Mallory") == Hold("user", "mallory", "phished")
    assert policy.held(ip("203.0.113.67"), "mallory2") is None
    assert policy.held(None, None) is None
    assert policy.held(None, "") is None


def test_relay_client_is_the_longest_matching_network(storage):
    storage.add_relay_client("203.0.113.0/24")
    storage.add_relay_client("203.0.113.128/25", ["Example.com"])
    policy = storage.load_policy()
    assert policy.relay_client(ip("203.0.113.200")) == RelayClient(
        "203.0.113.128/25", frozenset({"example.com"}))
    assert policy.relay_client(ip("203.0.113.5")) == RelayClient("203.0.113.0/24", frozenset())
    assert policy.relay_client(ip("203.0.114.5")) is None
    assert policy.relay_client(None) is None


def test_owned_domains_are_none_for_a_user_owning_nothing(policy):
    assert policy.owned_domains("alice") == frozenset({"example.com"})
    assert policy.owned_domains("carol") is None
    assert policy.owned_domains(None) is None


def test_domain_dnsbl_settings(policy):
    assert policy.domain_dnsbl("example.com") == DomainDnsbl(False, None)
    assert policy.domain_dnsbl("example.net") == DomainDnsbl(True, 2)
    assert policy.domain_dnsbl("example.org") is None
    assert policy.domain_dnsbl(None) is None


def test_limit_is_the_override_else_the_default_else_none(policy):
    assert policy.limit("user", "bob").per_hour == 5000
    assert policy.limit("user", "carol").per_hour == 500
    assert policy.limit("user", None).per_hour == 500
    assert policy.limit("client", "203.0.113.5").per_hour == 100
    assert policy.limit("client", ip("203.0.113.5")).per_hour == 100
    assert policy.limit("client", "203.0.113.0/26").per_hour == 100
    assert policy.limit("client", "203.0.113.0/24") is None     # wider than the override
    assert policy.limit("client", "203.0.113.200") is None
    assert policy.limit("client", "unknown") is None
    with pytest.raises(ValueError):
        policy.limit("domain", "example.com")


def test_a_user_limit_is_its_own_else_its_domain_s_else_the_default(storage):
    storage.set_limit("user", None, 50)
    storage.set_limit("user", "@example.com", 200)
    storage.set_limit("user", "Bob@Example.com", 999)
    policy = storage.load_policy()
    assert policy.limit("user", "bob@example.com").per_hour == 999
    assert policy.limit("user", "Alice@EXAMPLE.COM").per_hour == 200
    assert policy.limit("user", "carol@sub.example.com").per_hour == 50     # no parent domains
    assert policy.limit("user", "dave").per_hour == 50
    assert policy.limit("user", "@example.com").per_hour == 200


def test_client_limit_falls_back_to_the_client_default(storage):
    storage.set_limit("client", None, 1000)
    storage.set_limit("client", "10.0.0.0/8", 10)
    storage.set_limit("client", "10.1.0.0/16", 20)
    policy = storage.load_policy()
    assert policy.limit("client", "10.1.2.3").per_hour == 20
    assert policy.limit("client", "10.2.2.3").per_hour == 10
    assert policy.limit("client", "192.0.2.1").per_hour == 1000


def test_a_loaded_domain_policy_never_changes(storage, policy):
    with pytest.raises(AttributeError):
        policy._allowlist = None
    storage.remove_allowlist("192.0.2.0/24")
    storage.add_hold("user", "bob")
    assert policy.allowlisted(ip("192.0.2.9"), "example.com")
    assert policy.held(None, "bob") is None
    fresh = storage.load_policy()
    assert not fresh.allowlisted(ip("192.0.2.9"), "example.com")
    assert fresh.held(None, "bob") == Hold("user", "bob", "")


def test_domain_policy_from_a_document_answers_as_one_loaded_from_the_store(storage, policy):
    from_document = DomainPolicy.from_document(storage.export())
    probes = [ip(text) for text in ("192.0.2.9", "198.51.100.7", "2001:db8::5",
                                    "203.0.113.66", "203.0.113.5", "2001:db8:1::9", "10.0.0.1")]
    for client in probes:
        for domain in (None, "example.com", "xn--bcher-kva.example"):
            assert from_document.allowlisted(client, domain) == policy.allowlisted(client,
                                                                                  domain)
        assert from_document.held(client, "mallory") == policy.held(client, "mallory")
        assert from_document.relay_client(client) == policy.relay_client(client)
        assert from_document.limit("client", client) == policy.limit("client", client)
    assert from_document.counts == policy.counts
