"""store - the per-domain policy: SQLite on disk, an immutable snapshot in memory.

NAME
    store - policy store schema, migrations, writes, reads and snapshots

SYNOPSIS
    store = PolicyStore("/var/lib/relaymilter/policy.sqlite3")
    store.add_allowlist("192.0.2.0/24", "example.com", comment="their backup MX")
    store.add_hold("user", "alice", reason="password phished")
    store.set_limit("user", None, 500)             # the default of every SASL user
    counts = store.import_policy(json.load(stream))   # one transaction, all or nothing
    version = store.data_version()     # moves when another connection commits
    policy = store.load_snapshot()     # PolicySnapshot: immutable, shared by threads
    policy.allowlisted(ip_address("192.0.2.7"), "example.com")    # True
    store.close()

DESCRIPTION
    Entries, each with a comment, its creation time (unix time) and who
    added it (added_by, default: default_actor()):

    allowlist      a client network never refused for a DNSBL listing, for
                   every recipient domain (domain "") or for one. It never
                   opens relaying.
    relay_clients  a client network allowed to relay; with sender_domains,
                   only for MAIL FROM in one of those domains.
    holds          a client network (kind "client") or SASL user ("user")
                   whose relaying is suspended, with a reason.
    limits         recipients per hour a SASL user ("user") or a relaying
                   client ("client") may send out; value "" is the default
                   of its kind, any other value an override.
    domains        a hosted domain: DNSBL "on" or "off" for its recipients,
                   its own DNSBL threshold (or none), and its owners, the
                   SASL users that may send as this domain.

    Canonical forms, so that one entry has one spelling: networks as
    address.parse_network reads them, host bits cleared (192.0.2.7/24 is
    192.0.2.0/24), a bare address as /32 or /128, IPv4-mapped IPv6 as
    IPv4; domains as address.normalise_domain gives them (lower case,
    A-labels); user names stripped, 1 to 255 printable characters without
    spaces, compared exactly. Bad input raises StoreInputError, whose
    message says what is wrong, and changes nothing.

    Writes. Each write is one transaction. Adding an entry whose key
    exists replaces it, creation time and added_by included: the entry is
    what was last said, by whom, when. import_policy() validates every row
    of a whole document (the shape export() writes) before it writes one,
    then applies them all in one transaction; a bad row is named by section
    and row number and nothing is applied.

    Storage. One SQLite file in WAL mode, so that readers (the milter's
    watcher) never wait for a writer (the CLI) nor the other way round;
    a writer waits for another writer up to BUSY_TIMEOUT. The schema
    version is PRAGMA user_version; MIGRATIONS[n] takes version n to n + 1,
    and missing ones are applied in one transaction when the store is
    opened, creating the store on first use. A store newer than this code
    raises StoreError, as does a file that is not a policy store.

    Snapshots. load_snapshot() reads everything in one read transaction
    into a PolicySnapshot, which keeps only what decisions need (no
    comments) in compact lookup structures (netindex.py) and never
    changes. SQLite hands the allowlist over aggregated, one string per
    family and prefix length, in the order of the table's key, which is
    the order of the lookup structure: no Python object per network on the
    way (bench/store_scale.py times a million). data_version() is the
    cheap way to know whether to load again.

    Threads. A PolicyStore holds one SQLite connection and belongs to the
    thread that made it (sqlite3 refuses other threads); give every thread
    its own. A PolicySnapshot may be read by any number of threads.
"""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import logging
import math
import os
import pathlib
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from relaymilter.address import IPAddress, IPNetwork, normalise_domain, parse_network
from relaymilter.netindex import TAG_BYTES, NetworkIndex


log = logging.getLogger(__name__)

FORMAT = "relaymilter-policy"
FORMAT_VERSION = 1
SECTIONS = ("allowlist", "relay_clients", "holds", "limits", "domains")
KINDS = ("client", "user")
BUSY_TIMEOUT = 5.0                  # seconds a writer waits for another writer
APPLICATION_ID = 0x524D4C50         # "RMLP" in the file header: a policy store
MAX_NAME_LENGTH = 255
MAX_TEXT_LENGTH = 1000              # comments and reasons
MAX_COUNT = 2**31 - 1               # per_hour and threshold

# MIGRATIONS[n] takes the schema from version n to n + 1. Append, never edit.
# One statement ends with ";" at the end of a line (see _statements).
# Network columns keep the canonical text (what people read) and the packed
# address with its prefix length, so that a snapshot loads without parsing.
# The allowlist, the one big table, is keyed in lookup order: family, prefix
# length, then lookup_key, which is the record netindex.from_blocks() reads
# (the address, then the number of its domain, its scope, in 4 big-endian
# bytes). load_snapshot() gets each family and prefix length as one sorted
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
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be opened, read or written; the message says which and why."""


class StoreInputError(ValueError):
    """An entry or import document is not valid; nothing was changed."""


def default_actor() -> str:
    """Who is adding entries: $SUDO_USER, else the login name, else the uid."""
    name = os.environ.get("SUDO_USER", "").strip()
    if not name:
        try:
            name = getpass.getuser().strip()
        except (OSError, KeyError):     # no login name and no passwd entry for the uid
            name = ""
    return name if _is_user_name(name) else str(os.getuid())


# ----------------------------------------------------------- canonical forms ---

def canonical_network(value: Any) -> IPNetwork:
    """"192.0.2.7/24" -> 192.0.2.0/24 (an address is /32 or /128); StoreInputError."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network,
                          ipaddress.IPv4Address, ipaddress.IPv6Address)):
        value = str(value)
    if not isinstance(value, str):
        raise StoreInputError(f"{value!r} is not an IP network")
    try:
        return parse_network(value)
    except ValueError as error:
        raise StoreInputError(str(error)) from None


def canonical_domain(value: Any) -> str:
    """"Example.COM." -> "example.com", IDN as A-labels; StoreInputError."""
    if not isinstance(value, str):
        raise StoreInputError(f"{value!r} is not a domain")
    try:
        return normalise_domain(value.strip())
    except ValueError as error:
        raise StoreInputError(f"{value!r} is not a domain ({error})") from None


def canonical_user(value: Any, field: str = "user name") -> str:
    """A SASL user name, stripped; StoreInputError unless 1-255 printable, no spaces."""
    name = value.strip() if isinstance(value, str) else None
    if name is None or not _is_user_name(name):
        raise StoreInputError(f"{value!r} is not a valid {field} "
                              f"(1 to {MAX_NAME_LENGTH} printable characters, no spaces)")
    return name


def _is_user_name(name: str) -> bool:
    return (0 < len(name) <= MAX_NAME_LENGTH and name.isprintable()
            and not any(char.isspace() for char in name))


def _kind(value: Any) -> str:
    if value not in KINDS:
        raise StoreInputError(f"kind must be 'client' or 'user', not {value!r}")
    return value


def _text(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise StoreInputError(f"{field} must be text, not {value!r}")
    if len(value) > MAX_TEXT_LENGTH:
        raise StoreInputError(f"{field} is longer than {MAX_TEXT_LENGTH} characters")
    if not value.isprintable():     # a newline would break list output and log lines
        raise StoreInputError(f"{field} must not hold control characters: {value!r}")
    return value.strip()


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise StoreInputError(f"{field} must be a whole number from 1 to {MAX_COUNT}, "
                              f"not {value!r}")
    return value


def _names(value: Any, field: str, canonical: Callable[[Any], str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise StoreInputError(f"{field} must be a list, not {value!r}")
    return tuple(sorted({canonical(item) for item in value}))


def _stamp(row: Mapping[str, Any], now: float, actor: str) -> tuple[float, str]:
    created = row.get("created")
    if created is None:
        created = now
    elif (isinstance(created, bool) or not isinstance(created, (int, float))
          or not math.isfinite(created) or created < 0):
        raise StoreInputError(f"created must be a unix time, not {created!r}")
    added_by = row.get("added_by")
    added_by = actor if added_by in (None, "") else canonical_user(added_by, "added_by")
    return float(created), added_by


def _client_value(kind: str, value: Any, field: str) -> tuple[str, bytes | None, int | None]:
    """A hold's or limit's value: (canonical text, packed, prefix length)."""
    if kind == "client":
        network = canonical_network(value)
        return str(network), network.network_address.packed, network.prefixlen
    return canonical_user(value, field), None, None


# ------------------------------------------------------------------ records ---
# One validated entry each, in table column order (list fields last).

class _Allow(NamedTuple):
    family: int
    prefixlen: int
    packed: bytes
    domain: str             # "" = every domain; the table has its scope number
    network: str
    comment: str
    created: float
    added_by: str


class _RelayClient(NamedTuple):
    network: str
    packed: bytes
    prefixlen: int
    comment: str
    created: float
    added_by: str
    sender_domains: tuple[str, ...]


class _Hold(NamedTuple):
    kind: str
    value: str
    packed: bytes | None
    prefixlen: int | None
    reason: str
    comment: str
    created: float
    added_by: str


class _Limit(NamedTuple):
    kind: str
    value: str
    packed: bytes | None
    prefixlen: int | None
    per_hour: int
    comment: str
    created: float
    added_by: str


class _Domain(NamedTuple):
    domain: str
    dnsbl: str
    threshold: int | None
    comment: str
    created: float
    added_by: str
    owners: tuple[str, ...]


def _allow_record(row: Mapping[str, Any], now: float, actor: str) -> _Allow:
    network = canonical_network(row.get("network"))
    domain = row.get("domain")
    domain = "" if domain in (None, "") else canonical_domain(domain)
    return _Allow(network.version, network.prefixlen, network.network_address.packed, domain,
                  str(network), _text(row.get("comment"), "comment"), *_stamp(row, now, actor))


def _relay_client_record(row: Mapping[str, Any], now: float, actor: str) -> _RelayClient:
    network = canonical_network(row.get("network"))
    domains = _names(row.get("sender_domains"), "sender_domains", canonical_domain)
    return _RelayClient(str(network), network.network_address.packed, network.prefixlen,
                        _text(row.get("comment"), "comment"), *_stamp(row, now, actor),
                        domains)


def _hold_record(row: Mapping[str, Any], now: float, actor: str) -> _Hold:
    kind = _kind(row.get("kind"))
    value = row.get("value")
    if value in (None, ""):
        raise StoreInputError(f"a {kind} hold needs a value (the client network or user name)")
    return _Hold(kind, *_client_value(kind, value, "user name"),
                 _text(row.get("reason"), "reason"), _text(row.get("comment"), "comment"),
                 *_stamp(row, now, actor))


def _limit_record(row: Mapping[str, Any], now: float, actor: str) -> _Limit:
    kind = _kind(row.get("kind"))
    value = row.get("value")
    value_columns = ("", None, None) if value in (None, "") else \
        _client_value(kind, value, "user name")
    return _Limit(kind, *value_columns, _count(row.get("per_hour"), "per_hour"),
                  _text(row.get("comment"), "comment"), *_stamp(row, now, actor))


def _domain_record(row: Mapping[str, Any], now: float, actor: str) -> _Domain:
    domain = canonical_domain(row.get("domain"))
    dnsbl = row.get("dnsbl")
    dnsbl = "on" if dnsbl is None else dnsbl
    if dnsbl not in ("on", "off"):
        raise StoreInputError(f"dnsbl must be 'on' or 'off', not {dnsbl!r}")
    threshold = row.get("threshold")
    threshold = None if threshold is None else _count(threshold, "threshold")
    owners = _names(row.get("owners"), "owners", canonical_user)
    return _Domain(domain, dnsbl, threshold, _text(row.get("comment"), "comment"),
                   *_stamp(row, now, actor), owners)


@dataclass(frozen=True)
class _Section:
    """How one kind of entry is validated, stored and listed."""

    name: str                       # key in export documents and counts
    table: str
    record: Callable[[Mapping[str, Any], float, str], tuple]
    required: tuple[str, ...]       # row keys an import row must have
    fields: tuple[str, ...]         # row keys, in list()/export order
    key_columns: tuple[str, ...]    # the record's first fields, its key
    columns: tuple[str, ...]        # table columns = the record's first fields
    order: str                      # ORDER BY of list()
    child: tuple[str, str, str] | None = None     # (table, column, list field)

    @property
    def key_length(self) -> int:
        return len(self.key_columns)

    def key(self, record: tuple) -> tuple:
        return record[:self.key_length]


_STAMP_FIELDS = ("comment", "created", "added_by")
_SECTIONS = {section.name: section for section in (
    # The allowlist's table differs from its records (scope, lookup_key):
    # _write_allowlist() and remove_allowlist() know how.
    _Section("allowlist", "allowlist", _allow_record, ("network",),
             ("network", "domain") + _STAMP_FIELDS, ("family", "prefixlen", "packed", "domain"),
             _Allow._fields, "domain, family, lookup_key, prefixlen"),
    _Section("relay_clients", "relay_client", _relay_client_record, ("network",),
             ("network", "sender_domains") + _STAMP_FIELDS, ("network",),
             _RelayClient._fields[:-1], "length(packed), packed, prefixlen",
             ("relay_client_domain", "domain", "sender_domains")),
    _Section("holds", "hold", _hold_record, ("kind", "value"),
             ("kind", "value", "reason") + _STAMP_FIELDS, ("kind", "value"), _Hold._fields,
             "kind, length(packed), packed, prefixlen, value"),
    _Section("limits", "rate_limit", _limit_record, ("kind", "per_hour"),
             ("kind", "value", "per_hour") + _STAMP_FIELDS, ("kind", "value"), _Limit._fields,
             "kind, value != '', length(packed), packed, prefixlen, value"),
    _Section("domains", "domain", _domain_record, ("domain",),
             ("domain", "dnsbl", "threshold", "owners") + _STAMP_FIELDS, ("domain",),
             _Domain._fields[:-1], "domain", ("domain_owner", "owner", "owners")),
)}


def _record(section: _Section, row: Any, now: float, actor: str) -> tuple:
    """An import row -> a record; StoreInputError for unknown, missing or bad fields."""
    if not isinstance(row, Mapping):
        raise StoreInputError(f"an entry is a JSON object, not {row!r}")
    unknown = sorted(set(row) - set(section.fields))
    if unknown:
        raise StoreInputError(f"unknown key {unknown[0]!r} (keys: {', '.join(section.fields)})")
    missing = [field for field in section.required if row.get(field) is None]
    if missing:
        raise StoreInputError(f"{missing[0]!r} is missing")
    return section.record(row, now, actor)


def _validate_document(document: Any, now: float, actor: str,
                       header: bool = True) -> dict[str, list[tuple]]:
    """Every section's records, one per key (a later row wins), sorted by key."""
    if not isinstance(document, Mapping):
        raise StoreInputError("a policy document is a JSON object")
    unknown = sorted(set(document) - {"format", "version", *SECTIONS})
    if unknown:
        raise StoreInputError(f"unknown section {unknown[0]!r} in the policy document "
                              f"(sections: {', '.join(SECTIONS)})")
    if header or "format" in document:
        if document.get("format") != FORMAT:
            raise StoreInputError(f"not a policy document: \"format\" must be {FORMAT!r}, "
                                  f"not {document.get('format')!r}")
    if header or "version" in document:
        version = document.get("version")
        if isinstance(version, int) and not isinstance(version, bool) \
                and version > FORMAT_VERSION:
            raise StoreInputError(f"policy document version {version} is newer than this "
                                  f"relaymilter reads ({FORMAT_VERSION})")
        if version != FORMAT_VERSION:
            raise StoreInputError(f"\"version\" must be {FORMAT_VERSION}, not {version!r}")
    validated = {}
    for name in SECTIONS:
        section = _SECTIONS[name]
        rows = document.get(name)
        if rows is None:
            rows = []
        if not isinstance(rows, list):
            raise StoreInputError(f"{name} must be a list of entries")
        by_key: dict[tuple, tuple] = {}
        for number, row in enumerate(rows, 1):
            try:
                record = _record(section, row, now, actor)
            except StoreInputError as error:
                raise StoreInputError(f"{name} row {number}: {error}") from None
            by_key[section.key(record)] = record
        # Inserting in key order fills the tables' B-trees front to back.
        validated[name] = [by_key[key] for key in sorted(by_key)]
    return validated


# -------------------------------------------------------------------- store ---

class PolicyStore:
    """See the module docstring. One connection; use it from one thread only."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True) -> None:
        self.path = os.fspath(path)
        # A URI so that create=False can say "must exist" (mode=rw).
        uri = pathlib.Path(self.path).absolute().as_uri() + ("?mode=rwc" if create else "?mode=rw")
        try:
            self._connection = sqlite3.connect(uri, uri=True, isolation_level=None,
                                               timeout=BUSY_TIMEOUT)
        except sqlite3.Error as error:
            raise StoreError(f"{self.path}: cannot open: {error}") from None
        try:
            self._setup()
        except BaseException:
            self._connection.close()
            raise

    def __enter__(self) -> "PolicyStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._connection.close()

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

    def _put(self, name: str, **fields: Any) -> None:
        section = _SECTIONS[name]
        record = section.record(fields, time.time(), default_actor())
        with self._transaction("cannot write") as connection:
            _write(connection, section, [record])

    def _delete(self, name: str, key: tuple) -> bool:
        section = _SECTIONS[name]
        where = " AND ".join(f"{column} = ?" for column in section.key_columns)
        with self._transaction("cannot write") as connection:
            # Children go by ON DELETE CASCADE (foreign_keys is on).
            cursor = connection.execute(f"DELETE FROM {section.table} WHERE {where}", key)
            return cursor.rowcount > 0

    def add_allowlist(self, network: str, domain: str | None = None, comment: str = "",
                      added_by: str | None = None) -> None:
        """Never refuse clients in network for a DNSBL listing: for recipients in
        domain, or for every recipient (domain None or "")."""
        self._put("allowlist", network=network, domain=domain, comment=comment,
                  added_by=added_by)

    def remove_allowlist(self, network: str, domain: str | None = None) -> bool:
        """False when there was no such entry. The domain's scope number stays
        (finding out whether another entry uses it would read the whole table)."""
        entry = _allow_record({"network": network, "domain": domain}, 0.0, "-")  # the key only
        with self._transaction("cannot write") as connection:
            scope = connection.execute("SELECT id FROM allowlist_scope WHERE domain = ?",
                                       (entry.domain,)).fetchone()
            if scope is None:
                return False
            return connection.execute(
                "DELETE FROM allowlist WHERE family = ? AND prefixlen = ? AND lookup_key = ?",
                (entry.family, entry.prefixlen, _lookup_key(entry.packed, scope[0]))
            ).rowcount > 0

    def add_relay_client(self, network: str, sender_domains: Iterable[str] = (),
                         comment: str = "", added_by: str | None = None) -> None:
        """Let clients in network relay; with sender_domains, only for MAIL FROM
        in one of them."""
        self._put("relay_clients", network=network, sender_domains=sender_domains,
                  comment=comment, added_by=added_by)

    def remove_relay_client(self, network: str) -> bool:
        return self._delete("relay_clients", (str(canonical_network(network)),))

    def add_hold(self, kind: str, value: str, reason: str = "", comment: str = "",
                 added_by: str | None = None) -> None:
        """Suspend relaying for a client network (kind "client") or SASL user ("user")."""
        self._put("holds", kind=kind, value=value, reason=reason, comment=comment,
                  added_by=added_by)

    def remove_hold(self, kind: str, value: str) -> bool:
        kind = _kind(kind)
        return self._delete("holds", (kind, _client_value(kind, value, "user name")[0]))

    def set_limit(self, kind: str, value: str | None, per_hour: int, comment: str = "",
                  added_by: str | None = None) -> None:
        """Recipients per hour for a user or client network; value None or "" sets
        the default of the kind."""
        self._put("limits", kind=kind, value=value, per_hour=per_hour, comment=comment,
                  added_by=added_by)

    def remove_limit(self, kind: str, value: str | None) -> bool:
        kind = _kind(kind)
        value = "" if value in (None, "") else _client_value(kind, value, "user name")[0]
        return self._delete("limits", (kind, value))

    def set_domain(self, domain: str, dnsbl: str = "on", threshold: int | None = None,
                   owners: Iterable[str] = (), comment: str = "",
                   added_by: str | None = None) -> None:
        """A hosted domain: DNSBL on or off for its recipients, its own DNSBL
        threshold, the SASL users that own it as a sender domain."""
        self._put("domains", domain=domain, dnsbl=dnsbl, threshold=threshold, owners=owners,
                  comment=comment, added_by=added_by)

    def remove_domain(self, domain: str) -> bool:
        return self._delete("domains", (canonical_domain(domain),))

    def import_policy(self, document: Any, replace: bool = False) -> dict[str, int]:
        """Apply an export()-shaped document in one transaction: entries per section.

        Every row is validated first; a bad one raises StoreInputError naming
        its section and number, and nothing is written. replace=True deletes
        every entry first, in the same transaction.
        """
        validated = _validate_document(document, time.time(), default_actor())
        with self._transaction("cannot import") as connection:
            if replace:
                for section in _SECTIONS.values():
                    if section.child:
                        connection.execute(f"DELETE FROM {section.child[0]}")
                    connection.execute(f"DELETE FROM {section.table}")
                connection.execute("DELETE FROM allowlist_scope")
            for name, records in validated.items():
                _write(connection, _SECTIONS[name], records)
        return {name: len(records) for name, records in validated.items()}

    # ---------------------------------------------------------- reads ---

    def list_allowlist(self) -> list[dict[str, Any]]:
        """By domain ("" = global first), then by network."""
        return self._list("allowlist")

    def list_relay_clients(self) -> list[dict[str, Any]]:
        return self._list("relay_clients")

    def list_holds(self) -> list[dict[str, Any]]:
        return self._list("holds")

    def list_limits(self) -> list[dict[str, Any]]:
        """By kind, the default (value "") first."""
        return self._list("limits")

    def list_domains(self) -> list[dict[str, Any]]:
        return self._list("domains")

    def _list(self, name: str) -> list[dict[str, Any]]:
        with self._transaction("cannot read", "BEGIN") as connection:
            return _read_section(connection, _SECTIONS[name])

    def export(self) -> dict[str, Any]:
        """Every entry, read in one transaction; import_policy() reads it back."""
        with self._transaction("cannot read", "BEGIN") as connection:
            document: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION}
            for name in SECTIONS:
                document[name] = _read_section(connection, _SECTIONS[name])
            return document

    def data_version(self) -> int:
        """Changes when another connection has committed since the last call."""
        with self._errors("cannot read"):
            return self._connection.execute("PRAGMA data_version").fetchone()[0]

    def load_snapshot(self) -> "PolicySnapshot":
        """Everything decisions need, read in one transaction.

        The big tables come aggregated by SQLite (group_concat), in key
        order: a million allowlist networks reach Python as a few byte
        strings per prefix length, not as a million rows (netindex.py).
        """
        with self._transaction("cannot read", "BEGIN") as connection:
            allowlist = NetworkIndex.from_blocks(
                (family, prefixlen, bytes.fromhex(records))
                for family, prefixlen, records in connection.execute(
                    "SELECT family, prefixlen, group_concat(hex(lookup_key), '') "
                    "FROM allowlist GROUP BY family, prefixlen"))
            # Both group_concat() see the rows in the same order.
            ids, names = connection.execute(
                "SELECT group_concat(id, ' '), group_concat(domain, ' ') "
                "FROM allowlist_scope").fetchone()
            scopes = {} if ids is None else dict(zip(_names_of(names), map(int, ids.split(" "))))
            domains = [(dnsbl, threshold, _names_of(names)) for dnsbl, threshold, names
                       in connection.execute("SELECT dnsbl, threshold, group_concat(domain, ' ') "
                                             "FROM domain GROUP BY dnsbl, threshold")]
            owners = [(owner, _names_of(names)) for owner, names
                      in connection.execute("SELECT owner, group_concat(domain, ' ') "
                                            "FROM domain_owner GROUP BY owner")]
            return _build_snapshot(
                allowlist, scopes,
                connection.execute("SELECT network, packed, prefixlen FROM relay_client"),
                connection.execute("SELECT network, domain FROM relay_client_domain"),
                connection.execute("SELECT kind, value, packed, prefixlen, reason FROM hold"),
                connection.execute(
                    "SELECT kind, value, packed, prefixlen, per_hour FROM rate_limit"),
                domains, owners)


def _names_of(joined: str) -> list[str]:
    """group_concat(name, ' ') -> names, each one string object however often it is
    used (interned): canonical domains and user names hold no space."""
    return list(map(sys.intern, joined.split(" ")))


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


def _write(connection: sqlite3.Connection, section: _Section, records: list[tuple]) -> None:
    """Insert or replace records (and their lists) inside the caller's transaction."""
    if not records:
        return
    if section.name == "allowlist":
        _write_allowlist(connection, records)
        return
    columns = section.columns
    updates = ", ".join(f"{column} = excluded.{column}" for column in columns
                        if column not in section.key_columns)
    connection.executemany(
        f"INSERT INTO {section.table} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(section.key_columns)}) DO UPDATE SET {updates}",
        (record[:len(columns)] for record in records))
    if section.child is None:
        return
    child_table, child_column = section.child[0], section.child[1]
    parent = section.key_columns[0]
    connection.executemany(f"DELETE FROM {child_table} WHERE {parent} = ?",
                           (record[:1] for record in records))
    connection.executemany(f"INSERT INTO {child_table} ({parent}, {child_column}) VALUES (?, ?)",
                           ((record[0], item) for record in records for item in record[-1]))


def _lookup_key(packed: bytes, scope: int) -> bytes:
    return packed + scope.to_bytes(TAG_BYTES, "big")


def _write_allowlist(connection: sqlite3.Connection, records: list[_Allow]) -> None:
    scopes = {}
    for domain in sorted({entry.domain for entry in records}):
        connection.execute("INSERT OR IGNORE INTO allowlist_scope (domain) VALUES (?)", (domain,))
        scopes[domain] = connection.execute("SELECT id FROM allowlist_scope WHERE domain = ?",
                                            (domain,)).fetchone()[0]
    connection.executemany(
        "INSERT INTO allowlist (family, prefixlen, lookup_key, scope, network, comment, created, "
        "added_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (family, prefixlen, lookup_key) DO UPDATE SET "
        "comment = excluded.comment, created = excluded.created, added_by = excluded.added_by",
        ((entry.family, entry.prefixlen, _lookup_key(entry.packed, scopes[entry.domain]),
          scopes[entry.domain], entry.network, entry.comment, entry.created, entry.added_by)
         for entry in records))


def _read_section(connection: sqlite3.Connection, section: _Section) -> list[dict[str, Any]]:
    plain = [field for field in section.fields if section.child is None
             or field != section.child[2]]
    source = section.table
    if section.name == "allowlist":
        source = "allowlist JOIN allowlist_scope ON allowlist_scope.id = allowlist.scope"
    entries = [dict(zip(plain, row)) for row in connection.execute(
        f"SELECT {', '.join(plain)} FROM {source} ORDER BY {section.order}")]
    if section.child is not None:
        child_table, child_column, field = section.child
        parent = section.key_columns[0]
        lists: dict[str, list[str]] = {}
        for key, item in connection.execute(
                f"SELECT {parent}, {child_column} FROM {child_table} "
                f"ORDER BY {parent}, {child_column}"):
            lists.setdefault(key, []).append(item)
        for entry in entries:
            entry[field] = lists.get(entry[parent], [])
        # Key order as in section.fields.
        entries = [{name: entry[name] for name in section.fields} for entry in entries]
    return entries


# ----------------------------------------------------------------- snapshot ---

@dataclass(frozen=True, slots=True)
class Hold:
    """A suspension in force: kind "client" (value: the network) or "user"."""

    kind: str
    value: str
    reason: str


@dataclass(frozen=True, slots=True)
class RelayClient:
    """A network allowed to relay; sender_domains empty = any MAIL FROM."""

    network: str
    sender_domains: frozenset[str]


@dataclass(frozen=True, slots=True)
class DomainDnsbl:
    """A hosted domain's DNSBL setting; threshold None = the configured one."""

    enabled: bool
    threshold: int | None


class PolicySnapshot:
    """The store's entries, as decisions read them. Immutable: share it freely.

    Make one with PolicyStore.load_snapshot() or, without SQLite (tests),
    PolicySnapshot.from_document(); EMPTY_POLICY has no entries.
    Client addresses are ipaddress objects (IPv4-mapped IPv6 is IPv4);
    domains are normalised (address.normalise_domain) by the caller.
    """

    __slots__ = ("_allowlist", "_scopes", "_global_scopes", "_relay_index", "_relay_clients",
                 "_hold_index", "_client_holds", "_user_holds", "_default_limits",
                 "_user_limits", "_client_limit_index", "_client_limits", "_domains",
                 "_owned", "_counts")

    def __init__(self, **parts: Any) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, parts.pop(name[1:]))
        if parts:
            raise TypeError(f"unknown snapshot parts: {', '.join(sorted(parts))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a PolicySnapshot never changes")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a PolicySnapshot never changes")

    def __repr__(self) -> str:
        return "<PolicySnapshot " + ", ".join(
            f"{count} {kind}" for kind, count in self._counts.items()) + ">"

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> "PolicySnapshot":
        """A snapshot of an export()-shaped document ("format", "version" optional).

        Validated exactly as import_policy() validates (StoreInputError).
        """
        records = _validate_document(document, time.time(), "snapshot", header=False)
        allowlist = records["allowlist"]
        scopes = {domain: number for number, domain
                  in enumerate(sorted({entry.domain for entry in allowlist}))}
        index = NetworkIndex.from_packed((entry.packed, entry.prefixlen, scopes[entry.domain])
                                         for entry in allowlist)
        relay, domains = records["relay_clients"], records["domains"]
        settings: dict[tuple[str, int | None], list[str]] = {}
        owners: dict[str, list[str]] = {}
        for entry in domains:
            settings.setdefault((entry.dnsbl, entry.threshold), []).append(entry.domain)
            for owner in entry.owners:
                owners.setdefault(owner, []).append(entry.domain)
        return _build_snapshot(
            index, scopes,
            ((entry.network, entry.packed, entry.prefixlen) for entry in relay),
            ((entry.network, domain) for entry in relay for domain in entry.sender_domains),
            ((entry.kind, entry.value, entry.packed, entry.prefixlen, entry.reason)
             for entry in records["holds"]),
            ((entry.kind, entry.value, entry.packed, entry.prefixlen, entry.per_hour)
             for entry in records["limits"]),
            [(dnsbl, threshold, names) for (dnsbl, threshold), names in settings.items()],
            list(owners.items()))

    @property
    def counts(self) -> dict[str, int]:
        """Entries per section (allowlist, relay_clients, ...), for logs."""
        return dict(self._counts)

    def held(self, client: IPAddress | None, user: str | None) -> Hold | None:
        """The hold on the client (longest network holding it), else on the user."""
        if client is not None:
            tag = self._hold_index.longest(client)
            if tag is not None:
                return self._client_holds[tag]
        if user:
            return self._user_holds.get(user)
        return None

    def relay_client(self, client: IPAddress | None) -> RelayClient | None:
        """The relay client entry of the longest network holding client, or None."""
        if client is None:
            return None
        tag = self._relay_index.longest(client)
        return None if tag is None else self._relay_clients[tag]

    def owned_domains(self, user: str | None) -> frozenset[str] | None:
        """The sender domains user owns; None when it owns none (unrestricted)."""
        return self._owned.get(user) if user else None

    def allowlisted(self, client: IPAddress | None, recipient_domain: str | None) -> bool:
        """A global entry, or one for exactly recipient_domain, holds client."""
        if client is None:
            return False
        scope = self._scopes.get(recipient_domain) if recipient_domain else None
        wanted = self._global_scopes if scope is None else self._global_scopes + (scope,)
        return bool(wanted) and self._allowlist.matches(client, wanted)

    def domain_dnsbl(self, recipient_domain: str | None) -> DomainDnsbl | None:
        """The domain's DNSBL setting; None when the domain has no entry."""
        return self._domains.get(recipient_domain) if recipient_domain else None

    def limit(self, kind: str, value: str | IPAddress | None) -> int | None:
        """Recipients per hour: value's own limit, else the kind's default, else None.

        kind "user": value is the SASL user name. kind "client": value is an
        address or network (text or ipaddress); the longest limit network
        holding it counts. A value that is neither gets the default.
        """
        if kind == "user":
            if value:
                own = self._user_limits.get(value)
                if own is not None:
                    return own
        elif kind == "client":
            if value and self._client_limits:
                own = self._client_limit(value)
                if own is not None:
                    return own
        else:
            raise ValueError(f"limit kind must be 'client' or 'user', not {kind!r}")
        return self._default_limits.get(kind)

    def _client_limit(self, value: str | IPAddress) -> int | None:
        if isinstance(value, str):
            try:
                value = ipaddress.ip_address(value)
            except ValueError:
                try:
                    value = parse_network(value)
                except ValueError:
                    return None
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            # A network's limit is that of a limit network containing it whole.
            for tag in self._client_limit_index.tags(value.network_address):
                prefixlen, per_hour = self._client_limits[tag]
                if prefixlen <= value.prefixlen:
                    return per_hour
            return None
        tag = self._client_limit_index.longest(value)
        return None if tag is None else self._client_limits[tag][1]


def _build_snapshot(allowlist: NetworkIndex, scopes: Mapping[str, int],
                    relay_clients: Iterable[tuple[str, bytes, int]],
                    relay_client_domains: Iterable[tuple[str, str]],
                    holds: Iterable[tuple[str, str, bytes | None, int | None, str]],
                    limits: Iterable[tuple[str, str, bytes | None, int | None, int]],
                    domains: Iterable[tuple[str, int | None, list[str]]],
                    owners: Iterable[tuple[str, list[str]]]) -> PolicySnapshot:
    """One snapshot from the allowlist index (tags: scopes[domain], "" = every
    domain) and rows shaped as load_snapshot() selects them."""
    sender_domains: dict[str, set[str]] = {}
    for network, domain in relay_client_domains:
        sender_domains.setdefault(network, set()).add(domain)
    relay_entries = list(relay_clients)
    relay_list = tuple(RelayClient(network, frozenset(sender_domains.get(network, ())))
                       for network, _, _ in relay_entries)
    relay_index = NetworkIndex.from_packed(
        (packed, prefixlen, tag) for tag, (_, packed, prefixlen) in enumerate(relay_entries))

    client_holds: list[tuple[Hold, bytes, int]] = []
    user_holds: dict[str, Hold] = {}
    for kind, value, packed, prefixlen, reason in holds:
        if kind == "client":
            client_holds.append((Hold(kind, value, reason), packed, prefixlen))
        else:
            user_holds[value] = Hold(kind, value, reason)
    hold_index = NetworkIndex.from_packed(
        (packed, prefixlen, tag) for tag, (_, packed, prefixlen) in enumerate(client_holds))

    default_limits: dict[str, int] = {}
    user_limits: dict[str, int] = {}
    client_limits: list[tuple[bytes, int, int]] = []
    for kind, value, packed, prefixlen, per_hour in limits:
        if value == "":
            default_limits[kind] = per_hour
        elif kind == "client":
            client_limits.append((packed, prefixlen, per_hour))
        else:
            user_limits[value] = per_hour
    client_limit_index = NetworkIndex.from_packed(
        (packed, prefixlen, tag) for tag, (packed, prefixlen, _) in enumerate(client_limits))

    # Most domains share one of a few settings: one object per setting.
    domain_settings: dict[str, DomainDnsbl] = {}
    for dnsbl, threshold, names in domains:
        domain_settings.update(dict.fromkeys(names, DomainDnsbl(dnsbl == "on", threshold)))
    global_scope = scopes.get("")

    return PolicySnapshot(
        allowlist=allowlist,
        scopes=scopes,
        global_scopes=() if global_scope is None else (global_scope,),
        relay_index=relay_index,
        relay_clients=relay_list,
        hold_index=hold_index,
        client_holds=tuple(hold for hold, _, _ in client_holds),
        user_holds=user_holds,
        default_limits=default_limits,
        user_limits=user_limits,
        client_limit_index=client_limit_index,
        client_limits=tuple((prefixlen, per_hour) for _, prefixlen, per_hour in client_limits),
        domains=domain_settings,
        owned={owner: frozenset(names) for owner, names in owners},
        counts={"allowlist": len(allowlist), "relay_clients": len(relay_list),
                "holds": len(client_holds) + len(user_holds),
                "limits": len(default_limits) + len(user_limits) + len(client_limits),
                "domains": len(domain_settings)})


EMPTY_POLICY = _build_snapshot(NetworkIndex.from_blocks(()), {}, (), (), (), (), (), ())
