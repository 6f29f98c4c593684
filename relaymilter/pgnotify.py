"""pgnotify - PostgreSQL says when the shared policy store changed.

NAME
    pgnotify - ChangeListener: LISTEN on the store's channel, wake the watcher

SYNOPSIS
    listener = ChangeListener("postgresql://...", wake=runtime_wake)
    listener.start()        # a daemon thread
    listener.stop()

DESCRIPTION
    Every write to a PostgreSQL store sends NOTIFY on pgstore.CHANNEL as it
    commits. A ChangeListener holds one connection that LISTENs there and
    calls wake() for each change, so the runtime's watcher reads the new
    policy at once instead of at its next poll. Polling stays: a listener
    that cannot connect, or loses its connection, costs only speed; it
    tries again every RETRY seconds and calls wake() once it listens
    again (a change may have come meanwhile). Its errors are logged at
    DEBUG only: the watcher already reports a store it cannot read.

    The wait is select() on the connection's socket and libpq's
    consume_input()/notifies(), which every psycopg 3 release has (the
    timeout of Connection.notifies() came in 3.2; Debian 12 has 3.1).
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable

import psycopg

from relaymilter.pgstore import CHANNEL, CONNECT_TIMEOUT

log = logging.getLogger(__name__)

RETRY = 5.0                 # seconds between two attempts to listen
TICK = 1.0                  # seconds a wait lasts before stop() is looked at


class ChangeListener:
    """See the module docstring."""

    def __init__(self, url: str, wake: Callable[[], None]) -> None:
        self.url = url
        self._wake = wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="relaymilter-pgnotify",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=TICK + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (psycopg.Error, OSError) as error:
                log.debug("not listening for policy store changes: %s", error)
            self._stop.wait(RETRY)

    def _listen(self) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                             application_name="relaymilter-listen") as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            self._wake()                # what changed while nobody listened
            pgconn = connection.pgconn
            while not self._stop.is_set():
                readable, _, _ = select.select([connection.fileno()], [], [], TICK)
                if not readable:
                    continue
                pgconn.consume_input()
                if pgconn.status != psycopg.pq.ConnStatus.OK:
                    raise psycopg.OperationalError("connection lost")
                changed = False
                while pgconn.notifies() is not None:
                    changed = True
                if changed:
                    self._wake()
