"""pgstore.py: what is PostgreSQL's own, beyond the Storage contract (test_storage_contract.py)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from relaymilter import pgstore
from relaymilter.openstore import open_store
from relaymilter.pgstore import SCHEMA, PostgresStore
from relaymilter.store import StoreError, StoreMissingError, StoreUnavailableError


def test_the_store_lives_in_a_schema_of_its_own_beside_other_tables(postgres_url):
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE hold (customer text)")      # someone else's
    with open_store(postgres_url) as store:
        store.add_hold("user", "alice", reason="phished")
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM public.hold").fetchone()[0] == 0
        assert connection.execute(f"SELECT value FROM {SCHEMA}.hold").fetchall() == [("alice",)]


def test_opening_without_create_finds_no_store_and_makes_none(postgres_url):
    with pytest.raises(StoreMissingError):
        open_store(postgres_url, create=False)
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                                  (SCHEMA,)).fetchone()[0] == 0


def test_a_server_that_cannot_be_reached_is_unavailable_and_the_password_never_shown(postgres):
    url = postgres.url("x").replace(f"port={postgres.port}", "port=1") + "&password=hunter2"
    with pytest.raises(StoreUnavailableError) as caught:
        open_store(url)
    assert "hunter2" not in str(caught.value) and "password=***" in str(caught.value)


def test_a_missing_database_is_an_error_naming_it(postgres):
    with pytest.raises(StoreError, match="nosuchdb"):
        open_store(postgres.url("nosuchdb"))


def test_a_schema_newer_than_this_code_is_refused(postgres_url, monkeypatch):
    with open_store(postgres_url):
        pass
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"UPDATE {SCHEMA}.meta SET schema_version = schema_version + 1")
    with pytest.raises(StoreError, match="newer than this relaymilter understands"):
        open_store(postgres_url)


def test_a_foreign_schema_of_the_same_name_is_not_taken_over(postgres_url):
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {SCHEMA}")
        connection.execute(f"CREATE TABLE {SCHEMA}.other (n integer)")
    with pytest.raises(StoreError, match="not a relaymilter policy store"):
        open_store(postgres_url)


def test_processes_that_open_a_new_store_at_once_create_it_once(postgres_url):
    errors: list[Exception] = []

    def open_one() -> None:
        try:
            with open_store(postgres_url) as store:
                store.add_allowlist("192.0.2.0/24")
        except Exception as error:          # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with open_store(postgres_url) as store:
        assert store.schema_version() == pgstore.SCHEMA_VERSION
        assert [entry["network"] for entry in store.list_allowlist()] == ["192.0.2.0/24"]


def test_every_write_moves_data_version_and_notifies_listeners(postgres_url):
    with open_store(postgres_url) as store, \
            psycopg.connect(postgres_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {pgstore.CHANNEL}")
        before = store.data_version()
        store.add_hold("client", "192.0.2.7")
        store.remove_hold("client", "192.0.2.7")
        assert store.data_version() == before + 2
        assert len(list(listener.notifies(timeout=2, stop_after=2))) == 2


def test_a_server_gone_mid_life_is_unavailable_and_a_new_store_works_when_it_returns():
    from postgres_instance import PostgresInstance

    with PostgresInstance() as server:
        url = server.create_database("policy")
        store = PostgresStore(url)
        store.add_allowlist("192.0.2.0/24")
        server.stop()
        with pytest.raises(StoreUnavailableError):
            store.data_version()
        with pytest.raises(StoreUnavailableError):
            open_store(url)
        server.start()
        with open_store(url) as again:
            assert [entry["network"] for entry in again.list_allowlist()] == ["192.0.2.0/24"]
        store.close()
