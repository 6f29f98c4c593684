"""sqlrecords - the policy's tables, written and read the same way in every SQL backend.

NAME
    sqlrecords - the SQL that stores, deletes and lists records, for SQLite and PostgreSQL

SYNOPSIS
    write(cursor, SECTIONS["holds"], records, "?")      # inside the caller's transaction
    removed = delete(cursor, SECTIONS["holds"], key, "?")
    entries = read_section(cursor, SECTIONS["holds"])
    clear(cursor)                                        # every entry, for a replace
    write_event(cursor, event, "?")                      # the history: every change
    names_of("a.example b.example")                      # what string_agg joined

DESCRIPTION
    Both SQL backends (sqlitestore.py, pgstore.py) keep the same tables
    with the same columns, keys and list order; each owns its schema,
    migrations, transactions, errors and its fast load_policy(). What
    they share is here: the statements that write, delete and list
    records, in the SQL both speak (INSERT ... ON CONFLICT, length() of
    a blob). A cursor is a DB-API cursor of the caller's connection, and
    mark is its parameter placeholder: "?" (sqlite3) or "%s" (psycopg).

    Order. Lists are ordered by text and bytes compared as bytes (SQLite's
    BINARY collation; PostgreSQL's columns are COLLATE "C"), so that both
    backends list entries in one order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, NamedTuple

from relaymilter.domainpolicy import HOLD_ROW, LIMIT_ROW, RELAY_CLIENT_ROW
from relaymilter.entries import SECTIONS, AllowlistRecord, Section
from relaymilter.netindex import TAG_BYTES


class Table(NamedTuple):
    """Where a section's records live: entries.Section gives the columns."""

    name: str
    order: str                              # ORDER BY of its list
    child: tuple[str, str] | None = None    # (table, column) of the record's list


# The allowlist's table differs from its records (scope, lookup_key): its
# network key is packed with the number of its domain, so that a snapshot
# loads without parsing (netindex.from_blocks reads the lookup_key column).
TABLES = {
    "allowlist": Table("allowlist", "domain, family, lookup_key, prefixlen"),
    "relay_clients": Table("relay_client", "length(packed), packed, prefixlen",
                           ("relay_client_domain", "domain")),
    "holds": Table("hold", "kind, length(packed), packed, prefixlen, value"),
    "limits": Table("rate_limit", "kind, value != '', length(packed), packed, prefixlen, value"),
    "domains": Table("domain", "domain", ("domain_owner", "owner")),
}


# The plain row queries of Storage.load_policy(): DomainPolicy.from_rows()'s
# relay_clients, relay_client_domains, holds and limits, in that order.
POLICY_ROWS = (f"SELECT {', '.join(RELAY_CLIENT_ROW)} FROM relay_client",
               "SELECT network, domain FROM relay_client_domain",
               f"SELECT {', '.join(HOLD_ROW)} FROM hold",
               f"SELECT {', '.join(LIMIT_ROW)} FROM rate_limit")


def clear(cursor: Any) -> None:
    """Delete every entry (lists first, for the foreign keys)."""
    for table in TABLES.values():
        if table.child:
            cursor.execute(f"DELETE FROM {table.child[0]}")
        cursor.execute(f"DELETE FROM {table.name}")
    cursor.execute("DELETE FROM allowlist_scope")


def write(cursor: Any, section: Section, records: list[tuple], mark: str) -> None:
    """Insert or replace records (and their lists) inside the caller's transaction."""
    if not records:
        return
    if section.name == "allowlist":
        _write_allowlist(cursor, records, mark)
        return
    table, columns = TABLES[section.name], section.columns
    updates = ", ".join(f"{column} = excluded.{column}" for column in columns
                        if column not in section.key_columns)
    cursor.executemany(
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join([mark] * len(columns))}) "
        f"ON CONFLICT ({', '.join(section.key_columns)}) DO UPDATE SET {updates}",
        [record[:len(columns)] for record in records])
    if table.child is None:
        return
    child_table, child_column = table.child
    parent = section.key_columns[0]
    cursor.executemany(f"DELETE FROM {child_table} WHERE {parent} = {mark}",
                       [record[:1] for record in records])
    items = [(record[0], item) for record in records for item in record[-1]]
    if items:
        cursor.executemany(f"INSERT INTO {child_table} ({parent}, {child_column}) "
                           f"VALUES ({mark}, {mark})", items)


def delete(cursor: Any, section: Section, key: tuple, mark: str,
           ended_by: float | None = None) -> bool:
    """Delete the entry of key with its list; False when there was none (or, with
    ended_by, none that had ended by then: an entry written again meanwhile
    stays). Lists go by ON DELETE CASCADE."""
    if section.name == "allowlist":
        return _delete_allowlist(cursor, *key, mark=mark, ended_by=ended_by)
    where = " AND ".join(f"{column} = {mark}" for column in section.key_columns)
    if ended_by is not None:
        where += f" AND expires <= {mark}"
        key = key + (ended_by,)
    cursor.execute(f"DELETE FROM {TABLES[section.name].name} WHERE {where}", key)
    return cursor.rowcount > 0


def lookup_key(packed: bytes, scope: int) -> bytes:
    return packed + scope.to_bytes(TAG_BYTES, "big")


# The allowlist table's columns, in the order of allowlist_rows(); a write
# replaces the stamp of an entry of the same key.
ALLOWLIST_COLUMNS = ("family", "prefixlen", "lookup_key", "scope", "network", "comment",
                     "created", "added_by", "expires")
ALLOWLIST_CONFLICT = ("ON CONFLICT (family, prefixlen, lookup_key) DO UPDATE SET "
                      "comment = excluded.comment, created = excluded.created, "
                      "added_by = excluded.added_by, expires = excluded.expires")


def allowlist_rows(records: list[AllowlistRecord], scopes: dict[str, int]) -> list[tuple]:
    """The allowlist table's rows (ALLOWLIST_COLUMNS) of records, given each
    domain's scope number."""
    return [(entry.family, entry.prefixlen, lookup_key(entry.packed, scopes[entry.domain]),
             scopes[entry.domain], entry.network, entry.comment, entry.created, entry.added_by,
             entry.expires)
            for entry in records]


def _write_allowlist(cursor: Any, records: list[AllowlistRecord], mark: str) -> None:
    scopes = {}
    for domain in sorted({entry.domain for entry in records}):
        cursor.execute(f"INSERT INTO allowlist_scope (domain) VALUES ({mark}) "
                       "ON CONFLICT (domain) DO NOTHING", (domain,))
        cursor.execute(f"SELECT id FROM allowlist_scope WHERE domain = {mark}", (domain,))
        scopes[domain] = cursor.fetchone()[0]
    marks = ", ".join([mark] * len(ALLOWLIST_COLUMNS))
    cursor.executemany(f"INSERT INTO allowlist ({', '.join(ALLOWLIST_COLUMNS)}) "
                       f"VALUES ({marks}) {ALLOWLIST_CONFLICT}",
                       allowlist_rows(records, scopes))


def _delete_allowlist(cursor: Any, family: int, prefixlen: int, packed: bytes, domain: str,
                      mark: str, ended_by: float | None) -> bool:
    """The domain's scope number stays (finding out whether another entry uses
    it would read the whole table)."""
    cursor.execute(f"SELECT id FROM allowlist_scope WHERE domain = {mark}", (domain,))
    scope = cursor.fetchone()
    if scope is None:
        return False
    values: tuple = (family, prefixlen, lookup_key(packed, scope[0]))
    ended = ""
    if ended_by is not None:
        ended, values = f" AND expires <= {mark}", values + (ended_by,)
    cursor.execute(f"DELETE FROM allowlist WHERE family = {mark} AND prefixlen = {mark} "
                   f"AND lookup_key = {mark}{ended}", values)
    return cursor.rowcount > 0


def read_section(cursor: Any, section: Section, ended_by: float | None = None,
                 mark: str = "?") -> list[dict[str, Any]]:
    """The section's entries as dicts of its fields, in list order; with
    ended_by (unix time), only those that had ended by then."""
    table = TABLES[section.name]
    plain = [field for field in section.fields if field != section.list_field]
    source = table.name
    if section.name == "allowlist":
        source = "allowlist JOIN allowlist_scope ON allowlist_scope.id = allowlist.scope"
    where, values = ("", ()) if ended_by is None else (f" WHERE expires <= {mark}",
                                                        (ended_by,))
    cursor.execute(f"SELECT {', '.join(plain)} FROM {source}{where} ORDER BY {table.order}",
                   values)
    entries = [dict(zip(plain, row)) for row in cursor.fetchall()]
    if table.child is None:
        return entries
    child_table, child_column = table.child
    parent = section.key_columns[0]
    lists: dict[str, list[str]] = {}
    cursor.execute(f"SELECT {parent}, {child_column} FROM {child_table} "
                   f"ORDER BY {parent}, {child_column}")
    for key, item in cursor.fetchall():
        lists.setdefault(key, []).append(item)
    for entry in entries:
        entry[section.list_field] = lists.get(entry[parent], [])
    # Key order as in section.fields.
    return [{name: entry[name] for name in section.fields} for entry in entries]


def read_sections(cursor: Any, names: Iterable[str], ended_by: float | None = None,
                  mark: str = "?") -> dict[str, list[dict[str, Any]]]:
    return {name: read_section(cursor, SECTIONS[name], ended_by, mark) for name in names}


def names_of(joined: str) -> list[str]:
    """Names joined by spaces in SQL (group_concat, string_agg) -> the names, each
    one string object however often it is used (interned): canonical domains
    and user names hold no space."""
    return list(map(sys.intern, joined.split(" ")))


EVENT_COLUMNS = ("at", "actor", "action", "section", "entry", "detail")


def write_event(cursor: Any, event: tuple, mark: str) -> None:
    """Append event (entries.Event) to the history, in the caller's transaction."""
    cursor.execute(f"INSERT INTO history ({', '.join(EVENT_COLUMNS)}) "
                   f"VALUES ({', '.join([mark] * len(EVENT_COLUMNS))})", tuple(event))


def read_events(cursor: Any, since: float | None, mark: str) -> list[dict[str, Any]]:
    """The history from since (unix time; None: all), oldest first."""
    where, values = ("", ()) if since is None else (f" WHERE at >= {mark}", (since,))
    cursor.execute(f"SELECT {', '.join(EVENT_COLUMNS)} FROM history{where} ORDER BY id",
                   values)
    return [dict(zip(EVENT_COLUMNS, row)) for row in cursor.fetchall()]
