"""sqlitestore - the domain policy in one SQLite file: the default Storage backend.

NAME
    sqlitestore - SQLite schema, migrations, writes, reads and the fast load

SYNOPSIS
    store = SQLiteStore("/var/lib/relaymilter/policy.sqlite3")   # or store.open_store()
    store = SQLiteStore(path, create=False)    # StoreError unless the file exists
    store.add_allowlist("192.0.2.0/24")        # the Storage API (store.py)
    policy = store.load_policy()               # DomainPolicy
    store.close()

DESCRIPTION
    SQLiteStore implements store.Storage; store.py describes the entries,
    their validation and the API. What is SQLite's own:

    Storage. One SQLite file in WAL mode, so that readers (the milter's
    watcher) never wait for a writer (the CLI) nor the other way round;
    a writer waits for another writer up to BUSY_TIMEOUT. Writes take the
    lock when they begin (BEGIN IMMEDIATE), so a busy store makes them
    wait, not fail halfway. The schema version is PRAGMA user_version;
    MIGRATIONS[n] takes version n to n + 1, and missing ones are applied
    in one transaction when the store is opened, creating the store on
    first use. A store newer than this code raises StoreError, as does a
    file that is not a policy store (PRAGMA application_id, APPLICATION_ID).
    create=False on a missing file raises StoreMissingError and creates
    nothing. A new store file is made FILE_MODE (0640) whatever the umask
    (it holds user names and customer networks), and SQLite gives its
    -wal and -shm files the mode of the store file.

    User names. Holds and limits are keyed by value_key, the user name
    case folded (entries.user_key, in SQL relaymilter_user_key(), which
    every connection registers for the migrations); value keeps what was
    written. domain_owner keeps owners as written; DomainPolicy folds them.

    Loading. load_policy() reads everything in one read transaction.
    SQLite hands the allowlist over aggregated, one string per family and
    prefix length, in the order of the table's key, which is the order of
    the lookup structure (netindex.py): no Python object per network on
    the way (bench/store_scale.py times a million). data_version() is
    PRAGMA data_version, which moves when another connection commits.

    Errors. Every sqlite3.Error becomes a StoreError naming the file and
    what was being done.

    Threads. A SQLiteStore holds one connection and belongs to the thread
    that made it (sqlite3 refuses other threads: StoreError).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from relaymilter import sqlrecords
from relaymilter.domainpolicy import DomainPolicy
from relaymilter.entries import SECTIONS, Event, Section, user_key
from relaymilter.netindex import NetworkIndex
from relaymilter.store import Storage, StoreError, StoreMissingError

log = logging.getLogger(__name__)

BUSY_TIMEOUT = 5.0                  # seconds a writer waits for another writer
FILE_MODE = 0o640                   # the store holds user names and customer networks
APPLICATION_ID = 0x524D4C50         # "RMLP" in the file header: a policy store

# MIGRATIONS[n] takes the schema from version n to n + 1. Append, never edit.
# One statement ends with ";" at the end of a line (see _statements).
# Network columns keep the canonical text (what people read) and the packed
# address with its prefix length, so that a snapshot loads without parsing.
# The allowlist, the one big table, is keyed in lookup order: family, prefix
# length, then lookup_key, which is the record netindex.from_blocks() reads
# (the address, then the number of its domain, its scope, in 4 big-endian
# bytes). load_policy() gets each family and prefix length as one sorted
# run of records, and SQLite does the conversion.
MIGRATIONS = [
    """
    PRAGMA application_id = 1380797520;
    CREATE TABLE allowlist_scope (
        id     INTEGER PRIMARY KEY CHECK (id BETWEEN 0 AND 4294967295),
        domain TEXT NOT NULL UNIQUE
    );
    CREATE TABLE allowlist (
        family     INTEGER NOT NULL CHECK (family IN (4, 6)),
        prefixlen  INTEGER NOT NULL CHECK (prefixlen BETWEEN 0 AND 128),
        lookup_key BLOB NOT NULL
                   CHECK (length(lookup_key) = CASE family WHEN 4 THEN 8 ELSE 20 END),
        scope      INTEGER NOT NULL REFERENCES allowlist_scope (id),
        network    TEXT NOT NULL,
        comment    TEXT NOT NULL DEFAULT '',
        created    REAL NOT NULL,
        added_by   TEXT NOT NULL,
        PRIMARY KEY (family, prefixlen, lookup_key),
        CHECK (hex(substr(lookup_key, -4)) = printf('%08X', scope))
    ) WITHOUT ROWID;
    CREATE TABLE relay_client (
        network   TEXT NOT NULL PRIMARY KEY,
        packed    BLOB NOT NULL CHECK (length(packed) IN (4, 16)),
        prefixlen INTEGER NOT NULL CHECK (prefixlen BETWEEN 0 AND 128),
        comment   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL,
        added_by  TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE relay_client_domain (
        network TEXT NOT NULL REFERENCES relay_client (network) ON DELETE CASCADE,
        domain  TEXT NOT NULL,
        PRIMARY KEY (network, domain)
    ) WITHOUT ROWID;
    CREATE TABLE hold (
        kind      TEXT NOT NULL CHECK (kind IN ('client', 'user')),
        value     TEXT NOT NULL,
        packed    BLOB,
        prefixlen INTEGER,
        reason    TEXT NOT NULL DEFAULT '',
        comment   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL,
        added_by  TEXT NOT NULL,
        PRIMARY KEY (kind, value),
        CHECK ((kind = 'client') = (packed IS NOT NULL))
    ) WITHOUT ROWID;
    CREATE TABLE rate_limit (
        kind      TEXT NOT NULL CHECK (kind IN ('client', 'user')),
        value     TEXT NOT NULL,
        packed    BLOB,
        prefixlen INTEGER,
        per_hour  INTEGER NOT NULL CHECK (per_hour >= 1),
        comment   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL,
        added_by  TEXT NOT NULL,
        PRIMARY KEY (kind, value)
    ) WITHOUT ROWID;
    CREATE TABLE domain (
        domain    TEXT NOT NULL PRIMARY KEY,
        dnsbl     TEXT NOT NULL DEFAULT 'on' CHECK (dnsbl IN ('on', 'off')),
        threshold INTEGER CHECK (threshold IS NULL OR threshold >= 1),
        comment   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL,
        added_by  TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE domain_owner (
        domain TEXT NOT NULL REFERENCES domain (domain) ON DELETE CASCADE,
        owner  TEXT NOT NULL,
        PRIMARY KEY (domain, owner)
    ) WITHOUT ROWID;
    CREATE INDEX domain_owner_by_owner ON domain_owner (owner);
    """,
    # 2: holds and limits keyed by value_key, the user name case folded
    # (entries.user_key, the SQL function relaymilter_user_key) or the
    # network; value keeps what was written. Of user entries that fold to
    # one key, the newest stays.
    """
    CREATE TABLE hold_v2 (
        kind      TEXT NOT NULL CHECK (kind IN ('client', 'user')),
        value_key TEXT NOT NULL,
        value     TEXT NOT NULL,
        packed    BLOB,
        prefixlen INTEGER,
        reason    TEXT NOT NULL DEFAULT '',
        comment   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL,
        added_by  TEXT NOT NULL,
        PRIMARY KEY (kind, value_key),
        CHECK ((kind = 'client') = (packed IS NOT NULL))
    ) WITHOUT ROWID;
    INSERT INTO hold_v2 (kind, value_key, value, packed, prefixlen, reason, comment, created,
                         added_by)
        SELECT kind, CASE kind WHEN 'user' THEN relaymilter_user_key(value) ELSE value END,
               value, packed, prefixlen, reason, comment, created, added_by
        FROM hold WHERE true ORDER BY created, value
        ON CONFLICT (kind, value_key) DO UPDATE SET value = excluded.value,
            reason = excluded.reason, comment = excluded.comment, created = excluded.created,
            added_by = excluded.added_by;
    DROP TABLE hold;
    ALTER TABLE hold_v2 RENAME TO hold;
    CREATE TABLE rate_limit_v2 (
        kind      TEXT NOT NULL CHECK (kind IN ('client', 'user')),
        value_key TEXT NOT NULL,
        value     TEXT NOT NULL,
        packed    BLOB,
        prefixlen INTEGER,
        per_hour  INTEGER NOT NULL CHECK (per_hour >= 1),
        comment   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL,
        added_by  TEXT NOT NULL,
        PRIMARY KEY (kind, value_key)
    ) WITHOUT ROWID;
    INSERT INTO rate_limit_v2 (kind, value_key, value, packed, prefixlen, per_hour, comment,
                               created, added_by)
        SELECT kind, CASE kind WHEN 'user' THEN relaymilter_user_key(value) ELSE value END,
               value, packed, prefixlen, per_hour, comment, created, added_by
        FROM rate_limit WHERE true ORDER BY created, value
        ON CONFLICT (kind, value_key) DO UPDATE SET value = excluded.value,
            per_hour = excluded.per_hour, comment = excluded.comment,
            created = excluded.created, added_by = excluded.added_by;
    DROP TABLE rate_limit;
    ALTER TABLE rate_limit_v2 RENAME TO rate_limit;
    """,
    # 3: holds that end by themselves (unix time; NULL = until removed).
    """
    ALTER TABLE hold ADD COLUMN expires REAL;
    """,
    # 4: the history of every change (Storage.history()).
    """
    CREATE TABLE history (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        section TEXT NOT NULL,
        entry   TEXT NOT NULL,
        detail  TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX history_at ON history (at);
    """,
    # 5: allowlist entries and relay clients that end by themselves.
    """
    ALTER TABLE allowlist ADD COLUMN expires REAL;
    ALTER TABLE relay_client ADD COLUMN expires REAL;
    """,
    # 6: limits of several rates: recipients per hour (now optional) and per
    # day, messages per hour and per day; one at least.
    """
    CREATE TABLE rate_limit_v6 (
        kind      TEXT NOT NULL CHECK (kind IN ('client', 'user')),
        value_key TEXT NOT NULL,
        value     TEXT NOT NULL,
        packed    BLOB,
        prefixlen INTEGER,
        per_hour  INTEGER CHECK (per_hour >= 1),
        per_day   INTEGER CHECK (per_day >= 1),
        messages_per_hour INTEGER CHECK (messages_per_hour >= 1),
        messages_per_day  INTEGER CHECK (messages_per_day >= 1),
        comment   TEXT NOT NULL DEFAULT '',
        created   REAL NOT NULL,
        added_by  TEXT NOT NULL,
        PRIMARY KEY (kind, value_key),
        CHECK (coalesce(per_hour, per_day, messages_per_hour, messages_per_day) IS NOT NULL)
    ) WITHOUT ROWID;
    INSERT INTO rate_limit_v6 (kind, value_key, value, packed, prefixlen, per_hour, comment,
                               created, added_by)
        SELECT kind, value_key, value, packed, prefixlen, per_hour, comment, created, added_by
        FROM rate_limit;
    DROP TABLE rate_limit;
    ALTER TABLE rate_limit_v6 RENAME TO rate_limit;
    """,
    # 7: holds that refuse every recipient of a client (a relay prober).
    """
    ALTER TABLE hold ADD COLUMN scope TEXT NOT NULL DEFAULT 'relay'
        CHECK (scope IN ('relay', 'all'));
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class SQLiteStore(Storage):
    """See the module docstring. One connection; use it from one thread only."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True) -> None:
        self.path = os.fspath(path)
        if create:
            self._create_private()
        elif not os.path.exists(self.path):
            raise StoreMissingError(f"{self.path}: cannot open: no policy store there")
        self._tighten()
        # A URI so that create=False can say "must exist" (mode=rw).
        uri = pathlib.Path(self.path).absolute().as_uri() + ("?mode=rwc" if create else "?mode=rw")
        try:
            self._connection = sqlite3.connect(uri, uri=True, isolation_level=None,
                                               timeout=BUSY_TIMEOUT)
            self._connection.create_function("relaymilter_user_key", 1, user_key,
                                             deterministic=True)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: cannot open: {error}") from None
        try:
            self._setup()
        except BaseException:
            self._connection.close()
            raise

    def close(self) -> None:
        with self._errors("cannot close"):
            self._connection.close()

    def _create_private(self) -> None:
        """Create a missing store file FILE_MODE (or tighter, by the umask), whatever
        the umask; SQLite gives its -wal and -shm files the same mode. Created
        by root in a directory of another user (/var/lib/relaymilter), it
        becomes that user's, for the daemon to read and write."""
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 FILE_MODE)
        except FileExistsError:
            return
        except OSError as error:
            raise StoreError(f"{self.path}: cannot create: {error.strerror}") from None
        try:
            if os.geteuid() == 0:
                directory = os.stat(os.path.dirname(os.path.abspath(self.path)))
                if directory.st_uid != 0:
                    os.fchown(descriptor, directory.st_uid, directory.st_gid)
        finally:
            os.close(descriptor)

    def _tighten(self) -> None:
        """A store made readable by others (an older relaymilter, a copy) becomes
        FILE_MODE, its -wal and -shm files too; said once, on the way."""
        for path in (self.path, self.path + "-wal", self.path + "-shm"):
            try:
                mode = os.stat(path).st_mode & 0o777
            except OSError:
                continue                    # no such file: nothing to tighten
            if not mode & ~FILE_MODE:
                continue
            try:
                os.chmod(path, mode & FILE_MODE)
            except OSError as error:        # not ours to change: say so, go on
                log.warning("%s is mode %04o, readable beyond its owner and group, and "
                            "cannot be changed: %s", path, mode, error.strerror)
                continue
            log.warning("%s was mode %04o, readable beyond its owner and group: now %04o",
                        path, mode, mode & FILE_MODE)

    # --------------------------------------------------------- schema ---

    def _setup(self) -> None:
        with self._errors("cannot open"):
            connection = self._connection
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            connection.execute("PRAGMA foreign_keys = ON")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL mode (journal mode {mode})")
            if self.schema_version() < SCHEMA_VERSION:
                self._migrate()
            self._check_schema()

    def schema_version(self) -> int:
        """PRAGMA user_version: the number of MIGRATIONS applied."""
        with self._errors("cannot read"):
            return self._connection.execute("PRAGMA user_version").fetchone()[0]

    def _check_schema(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this "
                             f"relaymilter understands ({SCHEMA_VERSION}); upgrade relaymilter")
        application = self._connection.execute("PRAGMA application_id").fetchone()[0]
        if application != APPLICATION_ID:
            raise StoreError(f"{self.path}: not a relaymilter policy store "
                             f"(application id {application:#x})")

    def _migrate(self) -> None:
        with self._transaction("cannot create or upgrade") as connection:
            # Read again under the write lock: another process may have
            # migrated since we looked.
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and connection.execute(
                    "SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StoreError(f"{self.path}: not a relaymilter policy store "
                                 "(it has tables of its own)")
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[number]):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {number + 1}")
            if version < SCHEMA_VERSION:
                log.info("policy store %s: schema version %d -> %d", self.path, version,
                         SCHEMA_VERSION)

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: {doing}: {error}") from error

    @contextlib.contextmanager
    def _transaction(self, doing: str, begin: str = "BEGIN IMMEDIATE"
                     ) -> Iterator[sqlite3.Connection]:
        """One transaction; rolled back on any exception. Writes take the lock
        at BEGIN (IMMEDIATE), so a busy store makes them wait, not fail later."""
        connection = self._connection
        with self._errors(doing):
            connection.execute(begin)
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    # --------------------------------------------------------- writes ---

    def _write_records(self, records: Mapping[str, list[tuple]], replace: bool,
                       event: Event) -> None:
        with self._transaction("cannot write") as connection:
            cursor = connection.cursor()
            if replace:
                sqlrecords.clear(cursor)
            for name, section_records in records.items():
                sqlrecords.write(cursor, SECTIONS[name], section_records, "?")
            sqlrecords.write_event(cursor, event, "?")

    def _delete_record(self, section: Section, key: tuple, event: Event,
                       ended_by: float | None = None) -> bool:
        with self._transaction("cannot write") as connection:
            cursor = connection.cursor()
            deleted = sqlrecords.delete(cursor, section, key, "?", ended_by)
            if deleted:
                sqlrecords.write_event(cursor, event, "?")
            return deleted

    def _read_history(self, since: float | None) -> list[dict[str, Any]]:
        with self._transaction("cannot read", "BEGIN") as connection:
            return sqlrecords.read_events(connection.cursor(), since, "?")

    # ---------------------------------------------------------- reads ---

    def _read_sections(self, names: Iterable[str],
                       ended_by: float | None = None) -> dict[str, list[dict[str, Any]]]:
        with self._transaction("cannot read", "BEGIN") as connection:
            return sqlrecords.read_sections(connection.cursor(), names, ended_by, "?")

    def data_version(self) -> int:
        """PRAGMA data_version: moves when another connection has committed."""
        with self._errors("cannot read"):
            return self._connection.execute("PRAGMA data_version").fetchone()[0]

    def load_policy(self) -> DomainPolicy:
        """Everything decisions need, read in one transaction.

        The big tables come aggregated by SQLite (group_concat), in key
        order: a million allowlist networks reach Python as a few byte
        strings per prefix length, not as a million rows (netindex.py).
        """
        now = time.time()
        with self._transaction("cannot read", "BEGIN") as connection:
            allowlist = NetworkIndex.from_blocks(
                (family, prefixlen, bytes.fromhex(records))
                for family, prefixlen, records in connection.execute(
                    "SELECT family, prefixlen, group_concat(hex(lookup_key), '') "
                    "FROM allowlist WHERE expires IS NULL OR expires > ? "
                    "GROUP BY family, prefixlen", (now,)))
            allowlist_ends = connection.execute(
                "SELECT min(expires) FROM allowlist WHERE expires > ?", (now,)).fetchone()[0]
            # Both group_concat() see the rows in the same order.
            ids, names = connection.execute(
                "SELECT group_concat(id, ' '), group_concat(domain, ' ') "
                "FROM allowlist_scope").fetchone()
            scopes = {} if ids is None else dict(zip(sqlrecords.names_of(names),
                                                     map(int, ids.split(" "))))
            domains = [(dnsbl, threshold, sqlrecords.names_of(names)) for dnsbl, threshold, names
                       in connection.execute("SELECT dnsbl, threshold, group_concat(domain, ' ') "
                                             "FROM domain GROUP BY dnsbl, threshold")]
            owners = [(owner, sqlrecords.names_of(names)) for owner, names
                      in connection.execute("SELECT owner, group_concat(domain, ' ') "
                                            "FROM domain_owner GROUP BY owner")]
            return DomainPolicy.from_rows(
                allowlist, scopes,
                *(connection.execute(query).fetchall() for query in sqlrecords.POLICY_ROWS),
                domains, owners, allowlist_ends)


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration script, for execute() one at a time.

    Not executescript(): it commits any open transaction first, and a
    migration must run inside the one that re-read user_version.
    """
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"migration ends inside a statement: {pending.strip()[:60]!r}")
