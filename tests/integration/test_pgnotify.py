"""pgnotify.py: a change to a PostgreSQL store wakes the watcher, across a server restart."""

from __future__ import annotations

import threading

from postgres_instance import PostgresInstance
from relaymilter import pgnotify
from relaymilter.openstore import open_store
from relaymilter.pgnotify import ChangeListener


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    def next(self, timeout: float = 5.0) -> bool:
        woken = self.event.wait(timeout)
        self.event.clear()
        return woken


def test_every_committed_write_wakes_the_watcher(postgres_url):
    with open_store(postgres_url) as store:
        wakes = Wakes()
        listener = ChangeListener(postgres_url, wakes)
        listener.start()
        try:
            assert wakes.next()                 # listening: one wake to catch up
            store.add_hold("user", "alice")
            assert wakes.next()
            assert not wakes.next(timeout=1.5)  # nothing changed, nothing said
            store.remove_hold("user", "alice")
            assert wakes.next()
        finally:
            listener.stop()


def test_a_listener_that_lost_its_server_listens_again_when_it_returns(monkeypatch):
    monkeypatch.setattr(pgnotify, "RETRY", 0.2)
    with PostgresInstance() as server:
        url = server.create_database("policy")
        with open_store(url):
            pass
        wakes = Wakes()
        listener = ChangeListener(url, wakes)
        listener.start()
        try:
            assert wakes.next()
            server.stop()
            server.start()
            assert wakes.next(timeout=10)       # listening again: the catch-up wake
            with open_store(url) as store:
                store.add_allowlist("192.0.2.0/24")
            assert wakes.next()
        finally:
            listener.stop()
