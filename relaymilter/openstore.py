"""openstore - open the domain policy store at a location, whatever its backend.

NAME
    openstore - open_store(): the one place that picks a Storage backend

SYNOPSIS
    with open_store("/var/lib/relaymilter/policy.sqlite3") as store:
        policy = store.load_policy()
    store = open_store("postgresql://relaymilter@db.example/mail")
    store = open_store(path, create=False)     # StoreError unless it exists

DESCRIPTION
    A location (storelocation.py) is a libpq URL, postgresql://... or
    postgres://... (pgstore.py, the store a fleet shares), or else the
    path of a SQLite file (sqlitestore.py, the embedded default). Everything else talks
    to the Storage interface (store.py).

    Its own module, above the backends: a backend imports store.py to
    implement Storage, so the code that picks backends cannot live there
    without an import cycle. The backend is imported when a store is
    opened, so that a process that never opens one loads no database
    module, and one without psycopg installed runs on SQLite.
"""

from __future__ import annotations

import os

from relaymilter.store import Storage, StoreError
from relaymilter.storelocation import display_location, is_url


def open_store(location: str | os.PathLike, *, create: bool = True) -> Storage:
    """The Storage at location, the store created there unless create is False.

    StoreError when it cannot be opened (StoreUnavailableError: try later).
    """
    if is_url(location):
        try:
            from relaymilter.pgstore import PostgresStore
        except ImportError as error:
            raise StoreError(f"{display_location(location)}: a PostgreSQL store needs psycopg "
                             f"3 (Debian: apt install python3-psycopg; pip: "
                             f"relaymilter[postgresql]): {error}") from None
        return PostgresStore(str(location), create=create)
    from relaymilter.sqlitestore import SQLiteStore
    return SQLiteStore(location, create=create)
