"""store - the domain policy store: the Storage interface every backend implements.

NAME
    store - Storage, the API of a domain policy store whatever its backend

SYNOPSIS
    with open_store("/var/lib/relaymilter/policy.sqlite3") as store:   # openstore.py
        store.add_allowlist("192.0.2.0/24", "example.com", comment="their backup MX")
        store.add_hold("user", "alice", reason="password phished")
        store.set_limit("user", None, 500)         # the default of every SASL user
        store.remove_hold("user", "alice")         # False: there was none
        store.list_holds()                         # [{"kind": ..., "value": ...}, ...]
        counts = store.import_policy(json.load(stream))   # one transaction, all or nothing
        document = store.export()                  # what import_policy() reads
        version = store.data_version()  # moves when another connection commits
        policy = store.load_policy()    # DomainPolicy: immutable, shared by threads

DESCRIPTION
    The domain policy is the store's data: allowlist, relay clients,
    holds, limits and domains (entries.py says what each entry is and
    how it is spelt). A Storage keeps them; decisions read the
    DomainPolicy it loads (domainpolicy.py).

    Writes. Each write is one transaction. Adding an entry whose key
    exists replaces it, creation time and added_by included: the entry is
    what was last said, by whom, when (entry() finds the one in place,
    for callers that must not replace unawares). Bad input raises
    StoreInputError, whose message says what is wrong, and changes
    nothing; a relay client wider than /8 or /32 raises WideNetworkError
    unless force=True. import_policy() validates every row of a whole
    document (the shape export() writes) before it writes one, then
    applies them all in one transaction; a bad row is named by section
    and row number and nothing is applied. import_changes() says what an
    import would add, replace and remove, and writes nothing.

    User names are kept as written and compared without regard to case:
    holds and limits on "Zed" and "zed" are one entry (entries.user_key).

    Backends. Storage validates entries itself, so that a backend only
    stores records already canonical: a backend implements the abstract
    methods (write, delete and read records of a section, data_version,
    load_policy, schema_version, close) and nothing else: SQLiteStore
    (sqlitestore.py), the embedded default, and PostgresStore
    (pgstore.py), the store a fleet shares. openstore.open_store() picks
    the backend for a location. tests/unit/test_storage_contract.py holds
    every backend to the behaviour described here.

    Errors. A backend turns its own errors (sqlite3.Error ...) into
    StoreError, whose message names the store; a server that cannot be
    reached (PostgreSQL down) is StoreUnavailableError, a StoreError
    worth retrying later. Callers catch StoreError,
    StoreInputError and OSError, and import no database module.
    StoreInputError, FORMAT and default_actor come from entries.py and
    are importable from here, beside StoreError.

    Threads. A Storage holds one connection and belongs to the thread
    that made it; give every thread its own. The DomainPolicy it loads
    may be read by any number of threads.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, Self

from relaymilter.domainpolicy import DomainPolicy
from relaymilter.entries import (FORMAT, FORMAT_VERSION, SECTIONS, Event, Section,
                                 StoreInputError, WideNetworkError, added_event, canonical_user,
                                 default_actor, entry_name, import_changes, refuse_wide,
                                 removed_event, validate_document)

__all__ = ["FORMAT", "FORMAT_VERSION", "Storage", "StoreError", "StoreInputError",
           "StoreMissingError", "StoreUnavailableError", "WideNetworkError", "default_actor"]


# The sections whose entries may end by themselves (expires), and who ends them.
ENDING = ("allowlist", "relay_clients", "holds")
ENDED_ACTOR = "relaymilter"


class StoreError(Exception):
    """The store cannot be opened, read or written; the message says which and why."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached now (down, restarting, the network):
    worth trying again later; the CLI exits 75 (EX_TEMPFAIL)."""


class StoreMissingError(StoreError):
    """open_store(create=False) found no store at the location; nothing was created."""


# ------------------------------------------------------------------ storage ---

class Storage(abc.ABC):
    """A domain policy store: see the module docstring.

    The entry methods validate here (entries.py), once for every backend;
    a backend implements the abstract methods below, which see only
    validated, canonical records (entries.AllowlistRecord ...).
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------- what a backend implements ---

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the Storage is not used again."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The version of the backend's schema: the number of its migrations applied."""

    @abc.abstractmethod
    def data_version(self) -> int:
        """Cheap. Differs from the last call's answer when another connection has
        committed since; this connection's own commits need not move it."""

    @abc.abstractmethod
    def load_policy(self) -> DomainPolicy:
        """Everything decisions need, read in one transaction
        (DomainPolicy.from_rows)."""

    @abc.abstractmethod
    def _write_records(self, records: Mapping[str, list[tuple]], replace: bool,
                       event: Event) -> None:
        """In one transaction: with replace, delete every entry first; then insert
        records (section name -> its records, sorted by key), each replacing the
        entry of its key, list field included; and append event to the history."""

    @abc.abstractmethod
    def _delete_record(self, section: Section, key: tuple, event: Event,
                       ended_by: float | None = None) -> bool:
        """Delete the entry of key (section.key() of a record) with its list, and
        append event to the history, in one transaction; False (and no event)
        when there was none, or with ended_by (unix time) none that had ended
        by then."""

    @abc.abstractmethod
    def _read_history(self, since: float | None) -> list[dict[str, Any]]:
        """The history's events from unix time since on (all if None), oldest
        first: dicts with Event's fields."""

    @abc.abstractmethod
    def _read_sections(self, names: Iterable[str],
                       ended_by: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """Each named section's entries, read in one transaction: dicts with the
        section's fields in their order (lists sorted), entries in the order the
        list_*() methods give; with ended_by (unix time), only the entries that
        had ended by then (sections with expires)."""

    # ----------------------------------------------------------- writes ---

    def _put(self, name: str, force: bool = False, **fields: Any) -> None:
        section = SECTIONS[name]
        record = section.record(fields, time.time(), default_actor())
        if not force:
            refuse_wide(section, record)
        self._write_records({name: [record]}, False, added_event(section, record))

    def _delete(self, name: str, by: str | None = None, **key_fields: Any) -> bool:
        section = SECTIONS[name]
        key = section.row_key(key_fields)
        event = removed_event(section, key_fields, time.time(), _actor(by))
        return self._delete_record(section, key, event)

    def add_allowlist(self, network: str, domain: str | None = None, comment: str = "",
                      added_by: str | None = None, expires: float | None = None) -> None:
        """Never refuse clients in network for a DNSBL listing: for recipients in
        domain, or for every recipient (domain None or ""); until removed, or
        until expires (unix time), as every entry with expires."""
        self._put("allowlist", network=network, domain=domain, comment=comment,
                  added_by=added_by, expires=expires)

    def remove_allowlist(self, network: str, domain: str | None = None,
                         by: str | None = None) -> bool:
        """False when there was no such entry. by: who removes it, for the history
        (default: default_actor()); so for every remove_*()."""
        return self._delete("allowlist", by, network=network, domain=domain)

    def add_relay_client(self, network: str, sender_domains: Iterable[str] = (),
                         comment: str = "", added_by: str | None = None,
                         force: bool = False, expires: float | None = None) -> None:
        """Let clients in network relay; with sender_domains, only for MAIL FROM
        in one of them. A network wider than /8 or /32 needs force."""
        self._put("relay_clients", force=force, network=network, sender_domains=sender_domains,
                  comment=comment, added_by=added_by, expires=expires)

    def remove_relay_client(self, network: str, by: str | None = None) -> bool:
        return self._delete("relay_clients", by, network=network)

    def add_hold(self, kind: str, value: str, reason: str = "", comment: str = "",
                 added_by: str | None = None, expires: float | None = None,
                 scope: str = "relay") -> None:
        """Suspend relaying for a client network (kind "client") or SASL user ("user"),
        or with scope "all" refuse every recipient of a client network, until
        removed or until expires (unix time)."""
        self._put("holds", kind=kind, value=value, reason=reason, comment=comment,
                  added_by=added_by, expires=expires, scope=scope)

    def remove_hold(self, kind: str, value: str, by: str | None = None) -> bool:
        return self._delete("holds", by, kind=kind, value=value)

    def set_limit(self, kind: str, value: str | None, per_hour: int | None = None,
                  comment: str = "", added_by: str | None = None, *,
                  per_day: int | None = None, messages_per_hour: int | None = None,
                  messages_per_day: int | None = None) -> None:
        """The rates of a user or client network (limits.Limit; one at least);
        value None or "" sets the default of the kind, "@domain" that of the
        domain's users."""
        self._put("limits", kind=kind, value=value, per_hour=per_hour, per_day=per_day,
                  messages_per_hour=messages_per_hour, messages_per_day=messages_per_day,
                  comment=comment, added_by=added_by)

    def remove_limit(self, kind: str, value: str | None, by: str | None = None) -> bool:
        return self._delete("limits", by, kind=kind, value=value)

    def set_domain(self, domain: str, dnsbl: str = "on", threshold: int | None = None,
                   owners: Iterable[str] = (), comment: str = "",
                   added_by: str | None = None) -> None:
        """A hosted domain: DNSBL on or off for its recipients, its own DNSBL
        threshold, the SASL users that own it as a sender domain."""
        self._put("domains", domain=domain, dnsbl=dnsbl, threshold=threshold, owners=owners,
                  comment=comment, added_by=added_by)

    def remove_domain(self, domain: str, by: str | None = None) -> bool:
        return self._delete("domains", by, domain=domain)

    def import_policy(self, document: Any, replace: bool = False,
                      force: bool = False, by: str | None = None) -> dict[str, int]:
        """Apply an export()-shaped document in one transaction: entries per section.

        Every row is validated first; a bad one raises StoreInputError naming
        its section and number, and nothing is written (a relay client wider
        than /8 or /32 is bad unless force). replace=True deletes every entry
        first, in the same transaction.
        """
        now, actor = time.time(), _actor(by)
        validated = validate_document(document, now, actor, allow_wide=force)
        counts = {name: len(records) for name, records in validated.items()}
        event = Event(now, actor, "import --replace" if replace else "import", "policy",
                      f"{sum(counts.values())} entries", json.dumps(counts))
        self._write_records(validated, replace, event)
        return counts

    def import_changes(self, document: Any, replace: bool = False,
                       force: bool = False) -> dict[str, dict[str, list[str]]]:
        """What import_policy() would do, written nowhere: per section, the
        entries "added", "replaced" and (replace) "removed" (entries.changes)."""
        return import_changes(self.export(), document, replace, force)

    def entry(self, name: str, **key_fields: Any) -> dict[str, Any] | None:
        """The entry of section name ("holds" ...) with the key that key_fields
        give (as the remove_*() methods take them), or None. Reads the section."""
        section = SECTIONS[name]
        key = section.row_key(key_fields)
        return next((entry for entry in self._list(name) if section.row_key(entry) == key),
                    None)

    # ------------------------------------------------------------ reads ---

    def list_allowlist(self) -> list[dict[str, Any]]:
        """By domain ("" = global first), then by network."""
        return self._list("allowlist")

    def list_relay_clients(self) -> list[dict[str, Any]]:
        """By network: IPv4 first, then by address and prefix length."""
        return self._list("relay_clients")

    def list_holds(self) -> list[dict[str, Any]]:
        """By kind, then as list_relay_clients() (clients) or by name (users)."""
        return self._list("holds")

    def list_limits(self) -> list[dict[str, Any]]:
        """By kind, the default (value "") first."""
        return self._list("limits")

    def list_domains(self) -> list[dict[str, Any]]:
        """By domain."""
        return self._list("domains")

    def _list(self, name: str) -> list[dict[str, Any]]:
        return self._read_sections((name,))[name]

    def remove_ended(self, now: float | None = None) -> list[tuple[str, str]]:
        """Delete the allowlist entries, relay clients and holds that have ended
        (expires <= now), each with an "expire" event in the history, dated when
        it ended, by ENDED_ACTOR; the names of those removed. Several processes
        or hosts may do it at once: each entry goes, and is written in the
        history, once; an entry written again meanwhile, with a new end, stays."""
        now = time.time() if now is None else now
        removed = []
        for name, entries in self._read_sections(ENDING, ended_by=now).items():
            section = SECTIONS[name]
            for fields in entries:
                event = Event(fields["expires"], ENDED_ACTOR, "expire", name,
                              entry_name(name, fields), "")
                if self._delete_record(section, section.row_key(fields), event, ended_by=now):
                    removed.append((name, event.entry))
        return removed

    def history(self, since: float | None = None) -> list[dict[str, Any]]:
        """Every change since unix time since (all if None), oldest first: at,
        actor, action (add, remove, import, import --replace, expire), section, entry
        (which one, by name) and detail (JSON of what it says, or "")."""
        return self._read_history(since)

    def export(self) -> dict[str, Any]:
        """Every entry, read in one transaction; import_policy() reads it back."""
        return {"format": FORMAT, "version": FORMAT_VERSION, **self._read_sections(SECTIONS)}


def _actor(by: str | None) -> str:
    """Who makes a change: by (checked as a user name), else default_actor()."""
    return default_actor() if by in (None, "") else canonical_user(by, "by")
