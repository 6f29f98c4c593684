"""openstore - open the domain policy store at a location, whatever its backend.

NAME
    openstore - open_store(): the one place that picks a Storage backend

SYNOPSIS
    with open_store("/var/lib/relaymilter/policy.sqlite3") as store:
        policy = store.load_policy()
    store = open_store(path, create=False)     # StoreError unless it exists

DESCRIPTION
    A location is the path of a SQLite file (sqlitestore.py) today; the
    backend of a URL (postgresql://...) will be chosen here. Everything
    else talks to the Storage interface (store.py).

    Its own module, above the backends: a backend imports store.py to
    implement Storage, so the code that picks backends cannot live there
    without an import cycle. The backend is imported when a store is
    opened, so that a process that never opens one loads no database
    module.
"""

from __future__ import annotations

import os

from relaymilter.store import Storage


def open_store(location: str | os.PathLike, *, create: bool = True) -> Storage:
    """The Storage at location, the store created there unless create is False.

    StoreError when it cannot be opened.
    """
    from relaymilter.sqlitestore import SQLiteStore
    return SQLiteStore(location, create=create)
