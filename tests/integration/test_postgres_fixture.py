"""postgres_instance.py: the private PostgreSQL the fleet tests run against."""

from __future__ import annotations

import os
import socket

import psycopg
import pytest

from postgres_instance import PostgresInstance


def test_each_test_gets_an_empty_database_of_its_own(postgres, postgres_url):
    with psycopg.connect(postgres_url) as connection:
        name = connection.execute("SELECT current_database()").fetchone()[0]
        tables = connection.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
            "('pg_catalog', 'information_schema')").fetchone()[0]
    assert name.startswith("test_") and tables == 0
    assert postgres_url != postgres.url()


def test_the_server_listens_on_its_unix_socket_only(postgres):
    assert postgres.socket_path.is_socket()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", postgres.port))


def test_the_server_runs_as_an_unprivileged_user(postgres):
    pid = postgres.pid
    assert os.stat(f"/proc/{pid}").st_uid != 0


def test_data_outlives_a_stop_and_a_kill():
    with PostgresInstance() as server:
        url = server.create_database("kept")
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("CREATE TABLE t (n integer)")
            connection.execute("INSERT INTO t VALUES (1)")
        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        server.start()
        server.kill()
        assert not server.running
        server.start()
        with psycopg.connect(url) as connection:
            assert connection.execute("SELECT n FROM t").fetchall() == [(1,)]
    assert not server.directory.exists()
