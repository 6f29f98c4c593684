"""sqlitestore.py: what is SQLite's own, beyond the Storage contract.

Schema, migrations, application id, WAL, files that are not stores, the
thread rule, the rows the tables keep, busy writers. Real SQLite files in
tmp_path; no mocks. The behaviour every backend shares is in
test_storage_contract.py.
"""

import sqlite3
import threading

import pytest

from relaymilter import sqlitestore
from relaymilter.openstore import open_store
from relaymilter.sqlitestore import SCHEMA_VERSION, SQLiteStore
from relaymilter.store import FORMAT, StoreError


@pytest.fixture
def path(tmp_path):
    return tmp_path / "policy.sqlite3"


@pytest.fixture
def store(path):
    with SQLiteStore(path) as opened:
        yield opened


def document(**sections):
    return {"format": FORMAT, "version": 1, **sections}


def count_rows(path, table):
    raw = sqlite3.connect(path)
    try:
        return raw.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        raw.close()


def test_open_store_opens_a_path_as_a_sqlite_store(path):
    with open_store(path) as store:
        assert isinstance(store, SQLiteStore)
        assert store.path == str(path)


# ------------------------------------------------------------ schema ---

def test_first_open_creates_the_store_at_the_current_schema_version(path):
    assert not path.exists()
    with SQLiteStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"allowlist", "relay_client", "hold", "rate_limit", "domain"} <= tables
    raw.close()


def test_reopening_keeps_the_schema_version(path):
    SQLiteStore(path).close()
    with SQLiteStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION


def test_an_empty_file_is_migrated(path):
    path.write_bytes(b"")
    with SQLiteStore(path, create=False) as store:
        assert store.schema_version() == SCHEMA_VERSION


def test_create_false_refuses_a_missing_store_and_creates_nothing(path):
    with pytest.raises(StoreError, match="cannot open"):
        SQLiteStore(path, create=False)
    assert not path.exists()


def test_missing_directory_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match=str(tmp_path / "nowhere")):
        SQLiteStore(tmp_path / "nowhere" / "policy.sqlite3")


def test_a_store_newer_than_the_code_is_refused(path):
    SQLiteStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer than this relaymilter"):
        SQLiteStore(path)


def test_a_foreign_database_is_refused_and_left_alone(path):
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE mine (x)")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="not a relaymilter policy store"):
        SQLiteStore(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
    raw.close()


def test_a_file_that_is_not_sqlite_is_a_store_error(path):
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(path)


def test_migrations_run_in_order_in_one_transaction(path, monkeypatch):
    monkeypatch.setattr(sqlitestore, "MIGRATIONS", sqlitestore.MIGRATIONS
                        + ["CREATE TABLE extra (x);\nCREATE TABLE broken (;\n"])
    monkeypatch.setattr(sqlitestore, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError):
        SQLiteStore(path)
    raw = sqlite3.connect(path)
    # The failed second migration took the first one down with it.
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
    assert raw.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    raw.close()


def test_an_older_store_is_upgraded_on_open(path, monkeypatch):
    SQLiteStore(path).close()
    monkeypatch.setattr(sqlitestore, "MIGRATIONS", sqlitestore.MIGRATIONS
                        + ["CREATE TABLE extra (x);\n"])
    monkeypatch.setattr(sqlitestore, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with SQLiteStore(path) as store:
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


# ------------------------------------------------------- table rows ---

def test_removing_a_relay_client_deletes_its_sender_domain_rows(store, path):
    store.add_relay_client("198.51.100.0/24", ["a.example"])
    assert store.remove_relay_client("198.51.100.7/24")
    assert count_rows(path, "relay_client_domain") == 0


def test_removing_a_domain_deletes_its_owner_rows(store, path):
    store.set_domain("example.com", dnsbl="off", owners=["bob", "alice"], comment="big one")
    assert store.remove_domain("EXAMPLE.com")
    assert count_rows(path, "domain_owner") == 0


# -------------------------------------------------------- concurrency ---

def test_writers_and_readers_in_other_connections_never_see_database_locked(path):
    SQLiteStore(path).close()
    errors = []
    done = threading.Event()
    loads = []

    def writer(offset):
        try:
            with SQLiteStore(path) as store:
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
            with SQLiteStore(path) as store:
                while not done.is_set():
                    store.data_version()
                    seen.append(store.load_policy().counts["allowlist"])
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
    with SQLiteStore(path) as store:
        assert store.load_policy().counts["allowlist"] == 300
        assert len(store.list_holds()) == 6


# ------------------------------------------- upgrades of older stores ---

def version_1_store(path):
    """A store as relaymilter wrote it at schema version 1, user names case-sensitive."""
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("BEGIN")
    for statement in sqlitestore._statements(sqlitestore.MIGRATIONS[0]):
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    rows = [("client", "192.0.2.0/24", bytes([192, 0, 2, 0]), 24, "infected", 1.0),
            ("user", "Zed@Example.COM", None, None, "phished", 2.0),
            ("user", "zed@example.com", None, None, "older", 1.0),
            ("user", "alice", None, None, "", 3.0)]
    raw.executemany("INSERT INTO hold (kind, value, packed, prefixlen, reason, created, added_by)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'root')", rows)
    raw.executemany("INSERT INTO rate_limit (kind, value, per_hour, created, added_by) "
                    "VALUES (?, ?, ?, ?, 'root')",
                    [("user", "", 500, 1.0), ("user", "Carol", 5, 1.0), ("user", "CAROL", 9, 2.0)])
    raw.execute("INSERT INTO domain (domain, created, added_by) VALUES ('cust.example', 1, 'x')")
    raw.execute("INSERT INTO domain_owner VALUES ('cust.example', 'Bob')")
    raw.execute("COMMIT")
    raw.close()


def test_a_version_1_store_is_upgraded_keeping_entries_and_the_newest_of_one_user(path):
    version_1_store(path)
    with SQLiteStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION >= 2
        assert [(entry["kind"], entry["value"], entry["reason"])
                for entry in store.list_holds()] == [
            ("client", "192.0.2.0/24", "infected"), ("user", "Zed@Example.COM", "phished"),
            ("user", "alice", "")]
        assert [(entry["value"], entry["per_hour"]) for entry in store.list_limits()] == [
            ("", 500), ("CAROL", 9)]
        policy = store.load_policy()
        assert policy.held(None, "zed@example.com").reason == "phished"
        assert policy.held(None, "ALICE").value == "alice"
        assert policy.limit("user", "carol").per_hour == 9
        assert policy.owned_domains("bob") == frozenset({"cust.example"})
        store.add_hold("user", "ZED@EXAMPLE.COM", reason="again")
        assert len(store.list_holds()) == 3
        assert store.remove_hold("user", "zed@example.com")
        assert store.remove_hold("client", "192.0.2.0/24")


# -------------------------------------------------------- permissions ---

@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_a_new_store_and_its_wal_and_shm_are_not_readable_by_others(path, umask):
    import os
    import stat
    old = os.umask(umask)
    try:
        with SQLiteStore(path) as store:
            store.add_hold("user", "alice")
            modes = {suffix: stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
                     for suffix in ("", "-wal", "-shm")}
    finally:
        os.umask(old)
    assert modes == {"": 0o640, "-wal": 0o640, "-shm": 0o640}


def test_a_missing_store_with_create_false_is_a_store_missing_error(path):
    from relaymilter.store import StoreMissingError
    with pytest.raises(StoreMissingError):
        SQLiteStore(path, create=False)
    assert not path.exists()
