"""store.py: schema and migrations, entries, canonical forms, import/export, snapshots.

Real SQLite files in tmp_path; no mocks.
"""

import ipaddress
import sqlite3
import threading
import time

import pytest

from relaymilter import store as store_module
from relaymilter.store import (EMPTY_POLICY, FORMAT, SCHEMA_VERSION, DomainDnsbl, Hold,
                               PolicySnapshot, PolicyStore, RelayClient, StoreError,
                               StoreInputError, default_actor)


def ip(text):
    return ipaddress.ip_address(text)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "policy.sqlite3"


@pytest.fixture
def store(path):
    with PolicyStore(path) as opened:
        yield opened


def document(**sections):
    return {"format": FORMAT, "version": 1, **sections}


# ------------------------------------------------------------ schema ---

def test_first_open_creates_the_store_at_the_current_schema_version(path):
    assert not path.exists()
    with PolicyStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"allowlist", "relay_client", "hold", "rate_limit", "domain"} <= tables
    raw.close()


def test_reopening_keeps_the_entries(path):
    with PolicyStore(path) as store:
        store.add_allowlist("192.0.2.0/24")
    with PolicyStore(path) as store:
        assert [entry["network"] for entry in store.list_allowlist()] == ["192.0.2.0/24"]
        assert store.schema_version() == SCHEMA_VERSION


def test_an_empty_file_is_migrated(path):
    path.write_bytes(b"")
    with PolicyStore(path, create=False) as store:
        assert store.schema_version() == SCHEMA_VERSION


def test_create_false_refuses_a_missing_store_and_creates_nothing(path):
    with pytest.raises(StoreError, match="cannot open"):
        PolicyStore(path, create=False)
    assert not path.exists()


def test_missing_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match=str(tmp_path / "nowhere")):
        PolicyStore(tmp_path / "nowhere" / "policy.sqlite3")


def test_a_store_newer_than_the_code_is_refused(path):
    PolicyStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer than this relaymilter"):
        PolicyStore(path)


def test_a_foreign_database_is_refused_and_left_alone(path):
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE mine (x)")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="not a relaymilter policy store"):
        PolicyStore(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
    raw.close()


def test_a_file_that_is_not_sqlite_is_a_store_error(path):
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        PolicyStore(path)


def test_migrations_run_in_order_in_one_transaction(path, monkeypatch):
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS
                        + ["CREATE TABLE extra (x);\nCREATE TABLE broken (;\n"])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError):
        PolicyStore(path)
    raw = sqlite3.connect(path)
    # The failed second migration took the first one down with it.
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
    assert raw.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    raw.close()


def test_an_older_store_is_upgraded_on_open(path, monkeypatch):
    PolicyStore(path).close()
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS
                        + ["CREATE TABLE extra (x);\n"])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with PolicyStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION + 1
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM extra").fetchone()[0] == 0
    raw.close()


def test_a_store_belongs_to_the_thread_that_opened_it(store):
    errors = []
    worker = threading.Thread(target=lambda: _catch(errors, store.list_allowlist))
    worker.start()
    worker.join()
    assert len(errors) == 1 and isinstance(errors[0], StoreError)


def _catch(errors, call):
    try:
        call()
    except Exception as error:   # the test inspects it
        errors.append(error)


# ----------------------------------------------------------- entries ---

def test_every_entry_records_comment_creation_time_and_who_added_it(store):
    before = time.time()
    store.add_allowlist("192.0.2.0/24", comment="partner MX", added_by="carol")
    (entry,) = store.list_allowlist()
    assert entry == {"network": "192.0.2.0/24", "domain": "", "comment": "partner MX",
                     "created": entry["created"], "added_by": "carol"}
    assert before <= entry["created"] <= time.time()


def test_added_by_defaults_to_the_sudo_user(store, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "dave")
    assert default_actor() == "dave"
    store.add_hold("user", "mallory")
    assert store.list_holds()[0]["added_by"] == "dave"


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
def test_networks_are_stored_in_canonical_form(store, written, canonical):
    store.add_allowlist(written)
    assert store.list_allowlist()[0]["network"] == canonical
    assert store.remove_allowlist(canonical)
    assert store.list_allowlist() == []


@pytest.mark.parametrize("written, canonical", [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
])
def test_domains_are_stored_in_canonical_form(store, written, canonical):
    store.add_allowlist("192.0.2.1", written)
    store.set_domain(written)
    store.add_relay_client("198.51.100.0/24", [written])
    assert store.list_allowlist()[0]["domain"] == canonical
    assert store.list_domains()[0]["domain"] == canonical
    assert store.list_relay_clients()[0]["sender_domains"] == [canonical]


def test_adding_an_existing_key_replaces_the_entry(store):
    store.add_allowlist("192.0.2.0/24", "example.com", comment="old", added_by="carol")
    store.add_allowlist("192.0.2.9/24", "EXAMPLE.com", comment="new", added_by="dave")
    (entry,) = store.list_allowlist()
    assert (entry["comment"], entry["added_by"]) == ("new", "dave")


def test_the_same_network_may_be_allowlisted_globally_and_per_domain(store):
    store.add_allowlist("192.0.2.0/24")
    store.add_allowlist("192.0.2.0/24", "a.example")
    store.add_allowlist("192.0.2.0/24", "b.example")
    assert [entry["domain"] for entry in store.list_allowlist()] == ["", "a.example", "b.example"]
    assert store.remove_allowlist("192.0.2.0/24", "a.example")
    assert not store.remove_allowlist("192.0.2.0/24", "a.example")
    assert [entry["domain"] for entry in store.list_allowlist()] == ["", "b.example"]


def test_an_allowlist_domain_can_go_and_come_back(store):
    store.add_allowlist("192.0.2.0/24", "example.com")
    assert store.remove_allowlist("192.0.2.0/24", "example.com")
    assert not store.remove_allowlist("192.0.2.0/24", "never-listed.example")
    assert not store.load_snapshot().allowlisted(ip("192.0.2.1"), "example.com")
    store.add_allowlist("198.51.100.0/24", "example.com")
    policy = store.load_snapshot()
    assert policy.allowlisted(ip("198.51.100.1"), "example.com")
    assert not policy.allowlisted(ip("192.0.2.1"), "example.com")


def test_lists_are_sorted_by_address_not_text(store):
    for network in ("10.0.0.0/8", "9.0.0.0/8", "2001:db8::/32", "192.0.2.0/24", "10.0.0.0/16"):
        store.add_relay_client(network)
    assert [entry["network"] for entry in store.list_relay_clients()] == [
        "9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16", "192.0.2.0/24", "2001:db8::/32"]


def test_relay_client_sender_domains_are_replaced_with_the_entry(store):
    store.add_relay_client("198.51.100.0/24", ["b.example", "a.example", "A.example"])
    assert store.list_relay_clients()[0]["sender_domains"] == ["a.example", "b.example"]
    store.add_relay_client("198.51.100.0/24", ["c.example"])
    assert store.list_relay_clients()[0]["sender_domains"] == ["c.example"]
    store.add_relay_client("198.51.100.0/24")
    assert store.list_relay_clients()[0]["sender_domains"] == []


def test_removing_a_relay_client_removes_its_sender_domains(store, path):
    store.add_relay_client("198.51.100.0/24", ["a.example"])
    assert store.remove_relay_client("198.51.100.7/24")
    assert not store.remove_relay_client("198.51.100.0/24")
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM relay_client_domain").fetchone()[0] == 0
    raw.close()


def test_holds_for_clients_and_users(store):
    store.add_hold("client", "203.0.113.5", reason="spam run")
    store.add_hold("user", "alice", reason="phished")
    store.add_hold("user", "Alice")     # user names are compared exactly
    assert [(entry["kind"], entry["value"], entry["reason"]) for entry in store.list_holds()] == [
        ("client", "203.0.113.5/32", "spam run"), ("user", "Alice", ""),
        ("user", "alice", "phished")]
    assert store.remove_hold("client", "203.0.113.5/32")
    assert store.remove_hold("user", " alice ")
    assert not store.remove_hold("user", "alice")


def test_limits_have_a_default_per_kind_and_overrides(store):
    store.set_limit("user", None, 500)
    store.set_limit("user", "bob", 50)
    store.set_limit("client", "", 1000)
    store.set_limit("client", "192.0.2.0/24", 100)
    assert [(entry["kind"], entry["value"], entry["per_hour"])
            for entry in store.list_limits()] == [
        ("client", "", 1000), ("client", "192.0.2.0/24", 100), ("user", "", 500),
        ("user", "bob", 50)]
    store.set_limit("user", None, 600)
    assert store.list_limits()[2]["per_hour"] == 600
    assert store.remove_limit("user", None)
    assert store.remove_limit("client", "192.0.2.1/24")
    assert not store.remove_limit("user", "")


def test_domains_keep_dnsbl_threshold_and_owners(store, path):
    store.set_domain("example.com", dnsbl="off", owners=["bob", "alice"], comment="big one")
    store.set_domain("example.net", threshold=3)
    assert [(entry["domain"], entry["dnsbl"], entry["threshold"], entry["owners"])
            for entry in store.list_domains()] == [
        ("example.com", "off", None, ["alice", "bob"]), ("example.net", "on", 3, [])]
    assert store.remove_domain("EXAMPLE.com")
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM domain_owner").fetchone()[0] == 0
    raw.close()


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
def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(store, call, message):
    store.add_allowlist("192.0.2.0/24", comment="before")
    store.set_domain("example.com", owners=["alice"])
    before = store.export()
    with pytest.raises(StoreInputError, match=message):
        call(store)
    assert store.export() == before


# ---------------------------------------------------- import, export ---

def populate(store):
    store.add_allowlist("192.0.2.0/24", comment="global")
    store.add_allowlist("198.51.100.7", "example.com", added_by="carol")
    store.add_allowlist("2001:db8::/48", "bücher.example")
    store.add_relay_client("203.0.113.0/24", ["example.com"], comment="web farm")
    store.add_relay_client("2001:db8:1::/64")
    store.add_hold("client", "203.0.113.66", reason="compromised")
    store.add_hold("user", "mallory", reason="phished")
    store.set_limit("user", None, 500)
    store.set_limit("user", "bob", 5000)
    store.set_limit("client", "203.0.113.0/25", 100)
    store.set_domain("example.com", dnsbl="off", owners=["alice", "bob"])
    store.set_domain("example.net", threshold=2)


def test_export_then_import_into_an_empty_store_reproduces_it(store, tmp_path):
    populate(store)
    exported = store.export()
    assert exported["format"] == FORMAT and exported["version"] == 1
    with PolicyStore(tmp_path / "copy.sqlite3") as copy:
        counts = copy.import_policy(exported)
        assert copy.export() == exported
    assert counts == {"allowlist": 3, "relay_clients": 2, "holds": 2, "limits": 3,
                      "domains": 2}


def test_import_survives_a_json_round_trip(store, tmp_path):
    import json
    populate(store)
    exported = store.export()
    with PolicyStore(tmp_path / "copy.sqlite3") as copy:
        copy.import_policy(json.loads(json.dumps(exported)))
        assert copy.export() == exported


def test_import_without_created_or_added_by_stamps_now_and_the_actor(store, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "frank")
    before = time.time()
    store.import_policy(document(holds=[{"kind": "user", "value": "eve"}]))
    (entry,) = store.list_holds()
    assert entry["added_by"] == "frank" and entry["created"] >= before


def test_import_merges_by_default_and_replace_starts_from_nothing(store):
    populate(store)
    store.import_policy(document(allowlist=[{"network": "10.0.0.0/8"}]))
    assert len(store.list_allowlist()) == 4
    counts = store.import_policy(document(allowlist=[{"network": "10.0.0.0/8"}]),
                                 replace=True)
    assert counts["allowlist"] == 1
    exported = store.export()
    assert [entry["network"] for entry in exported["allowlist"]] == ["10.0.0.0/8"]
    for section in ("relay_clients", "holds", "limits", "domains"):
        assert exported[section] == []


def test_import_replaces_an_existing_entry_and_its_lists(store):
    store.add_relay_client("203.0.113.0/24", ["a.example", "b.example"])
    store.import_policy(document(relay_clients=[
        {"network": "203.0.113.0/24", "sender_domains": ["c.example"]}]))
    assert store.list_relay_clients()[0]["sender_domains"] == ["c.example"]


def test_a_later_import_row_for_the_same_key_wins(store):
    store.import_policy(document(domains=[
        {"domain": "example.com", "owners": ["alice"]},
        {"domain": "EXAMPLE.COM", "owners": ["bob"], "dnsbl": "off"}]))
    (entry,) = store.list_domains()
    assert (entry["owners"], entry["dnsbl"]) == (["bob"], "off")


def test_a_bad_row_at_position_10000_names_itself_and_nothing_is_applied(store):
    populate(store)
    before = store.export()
    rows = [{"network": f"10.{n >> 8 & 255}.{n & 255}.0/24", "domain": f"d{n % 100}.example"}
            for n in range(10010)]
    rows[9999] = {"network": "10.0.0.0/33"}
    with pytest.raises(StoreInputError,
                       match=r"allowlist row 10000: '10.0.0.0/33' is not an IP network"):
        store.import_policy(document(allowlist=rows))
    assert store.export() == before
    with pytest.raises(StoreInputError):
        store.import_policy(document(allowlist=rows), replace=True)
    assert store.export() == before


def test_ten_thousand_rows_import_in_well_under_two_seconds(store):
    rows = [{"network": f"10.{n >> 8 & 255}.{n & 255}.0/24", "domain": f"d{n % 100}.example",
             "comment": "bulk"} for n in range(20000)]
    started = time.perf_counter()
    counts = store.import_policy(document(allowlist=rows))
    elapsed = time.perf_counter() - started
    assert counts["allowlist"] == 20000
    assert elapsed < 2.0, f"{elapsed:.2f}s for 20,000 rows"


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
    (document(limits=[{"kind": "user", "value": "eve"}]), "limits row 1: 'per_hour' is missing"),
    (document(domains=[{"domain": "example.com", "created": "yesterday"}]),
     "domains row 1: created must be a unix time"),
    (document(domains=[{"domain": "a.example"}, {"domain": "b.example", "owners": "bob"}]),
     "domains row 2: owners must be a list"),
])
def test_a_bad_document_is_refused_with_a_clear_message(store, bad, message):
    populate(store)
    before = store.export()
    with pytest.raises(StoreInputError, match=message):
        store.import_policy(bad)
    assert store.export() == before


# ------------------------------------------------------ data_version ---

def test_data_version_moves_when_another_connection_commits(path):
    with PolicyStore(path) as watcher, PolicyStore(path) as writer:
        first = watcher.data_version()
        assert watcher.data_version() == first
        watcher.load_snapshot()
        assert watcher.data_version() == first
        writer.add_allowlist("192.0.2.0/24")
        second = watcher.data_version()
        assert second != first
        assert watcher.data_version() == second


def test_a_failed_import_does_not_move_data_version(path):
    with PolicyStore(path) as watcher, PolicyStore(path) as writer:
        first = watcher.data_version()
        with pytest.raises(StoreInputError):
            writer.import_policy(document(allowlist=[{"network": "bad"}]))
        assert watcher.data_version() == first


# ---------------------------------------------------------- snapshot ---

@pytest.fixture
def policy(store):
    populate(store)
    return store.load_snapshot()


def test_snapshot_counts_entries_per_section(policy):
    assert policy.counts == {"allowlist": 3, "relay_clients": 2, "holds": 2, "limits": 3,
                             "domains": 2}
    assert EMPTY_POLICY.counts == {"allowlist": 0, "relay_clients": 0, "holds": 0,
                                   "limits": 0, "domains": 0}


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
    assert policy.held(ip("203.0.113.67"), "Mallory") is None
    assert policy.held(None, None) is None
    assert policy.held(None, "") is None


def test_relay_client_is_the_longest_matching_network(store):
    store.add_relay_client("203.0.113.0/24")
    store.add_relay_client("203.0.113.128/25", ["Example.com"])
    policy = store.load_snapshot()
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
    assert policy.limit("user", "bob") == 5000
    assert policy.limit("user", "carol") == 500
    assert policy.limit("user", None) == 500
    assert policy.limit("client", "203.0.113.5") == 100
    assert policy.limit("client", ip("203.0.113.5")) == 100
    assert policy.limit("client", "203.0.113.0/26") == 100
    assert policy.limit("client", "203.0.113.0/24") is None     # wider than the override
    assert policy.limit("client", "203.0.113.200") is None
    assert policy.limit("client", "unknown") is None
    assert EMPTY_POLICY.limit("user", "bob") is None
    with pytest.raises(ValueError):
        policy.limit("domain", "example.com")


def test_client_limit_falls_back_to_the_client_default(store):
    store.set_limit("client", None, 1000)
    store.set_limit("client", "10.0.0.0/8", 10)
    store.set_limit("client", "10.1.0.0/16", 20)
    policy = store.load_snapshot()
    assert policy.limit("client", "10.1.2.3") == 20
    assert policy.limit("client", "10.2.2.3") == 10
    assert policy.limit("client", "192.0.2.1") == 1000


def test_empty_policy_allows_and_restricts_nothing():
    assert EMPTY_POLICY.held(ip("192.0.2.1"), "alice") is None
    assert EMPTY_POLICY.relay_client(ip("192.0.2.1")) is None
    assert EMPTY_POLICY.owned_domains("alice") is None
    assert not EMPTY_POLICY.allowlisted(ip("192.0.2.1"), "example.com")
    assert EMPTY_POLICY.domain_dnsbl("example.com") is None


def test_a_snapshot_never_changes(store, policy):
    with pytest.raises(AttributeError):
        policy._allowlist = None
    store.remove_allowlist("192.0.2.0/24")
    store.add_hold("user", "bob")
    assert policy.allowlisted(ip("192.0.2.9"), "example.com")
    assert policy.held(None, "bob") is None
    fresh = store.load_snapshot()
    assert not fresh.allowlisted(ip("192.0.2.9"), "example.com")
    assert fresh.held(None, "bob") == Hold("user", "bob", "")


def test_snapshot_from_a_document_answers_as_one_loaded_from_the_store(store, policy):
    from_document = PolicySnapshot.from_document(store.export())
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


def test_snapshot_from_a_document_needs_no_header():
    policy = PolicySnapshot.from_document({"holds": [{"kind": "user", "value": "eve"}]})
    assert policy.held(None, "eve") == Hold("user", "eve", "")
    with pytest.raises(StoreInputError):
        PolicySnapshot.from_document({"holds": [{"kind": "user"}]})


# -------------------------------------------------------- concurrency ---

def test_writers_and_readers_in_other_connections_never_see_database_locked(path):
    PolicyStore(path).close()
    errors = []
    done = threading.Event()
    loads = []

    def writer(offset):
        try:
            with PolicyStore(path) as store:
                for n in range(150):
                    store.add_allowlist(f"10.{offset}.{n}.0/24", "example.com")
                    if n % 50 == 0:
                        store.import_policy(document(holds=[
                            {"kind": "user", "value": f"u{offset}-{n}"}]))
        except Exception as error:     # collected for the assertion below
            errors.append(error)

    def reader():
        seen = []
        loads.append(seen)
        try:
            with PolicyStore(path) as store:
                while not done.is_set():
                    store.data_version()
                    seen.append(store.load_snapshot().counts["allowlist"])
                    store.export()
        except Exception as error:
            errors.append(error)

    writers = [threading.Thread(target=writer, args=(offset,)) for offset in (1, 2)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert errors == []
    for seen in loads:      # entries are only added: no snapshot goes back in time
        assert seen and seen == sorted(seen)
    with PolicyStore(path) as store:
        assert store.load_snapshot().counts["allowlist"] == 300
        assert len(store.list_holds()) == 6
