"""entries - the domain policy's entries: canonical forms, validation, records.

NAME
    entries - what an entry of the domain policy is, in one spelling

SYNOPSIS
    canonical_network("192.0.2.7/24")        # IPv4Network("192.0.2.0/24")
    canonical_domain("Bücher.Example.")      # "xn--bcher-kva.example"
    canonical_user(" alice ")                # "alice"
    records = validate_document(document, time.time(), default_actor())
    records["allowlist"]                     # [AllowlistRecord, ...], sorted by key
    SECTIONS["holds"].row_key({"kind": "user", "value": "alice"})   # ("user", "alice")

DESCRIPTION
    The domain policy is the store's data. Its entries, each with a
    comment, its creation time (unix time) and who added it (added_by,
    default: default_actor()):

    allowlist      a client network never refused for a DNSBL listing, for
                   every recipient domain (domain "") or for one. It never
                   opens relaying.
    relay_clients  a client network allowed to relay; with sender_domains,
                   only for MAIL FROM in one of those domains.
    (Allowlist entries, relay clients and holds may end by themselves:
    expires, a unix time; null = until removed.)
    holds          a client network (kind "client") or SASL user ("user")
                   whose relaying is suspended (scope "relay"), or a client
                   network refused every recipient (scope "all": a relay
                   prober), with a reason, until removed or until it
                   expires (unix time; null: never).
    limits         how much a SASL user ("user") or a relaying client
                   ("client") may send out: recipients per hour (per_hour)
                   and per day (per_day), messages per hour and per day
                   (messages_per_hour, messages_per_day), one at least;
                   value "" is the default of its kind, "@domain" the
                   default of a domain's users, any other value an
                   override.
    domains        a hosted domain: DNSBL "on" or "off" for its recipients,
                   its own DNSBL threshold (or none), and its owners, the
                   SASL users that may send as this domain.

    Canonical forms, so that one entry has one spelling: networks as
    address.parse_network reads them, host bits cleared (192.0.2.7/24 is
    192.0.2.0/24), a bare address as /32 or /128, IPv4-mapped IPv6 as
    IPv4; domains as address.normalise_domain gives them (lower case,
    A-labels); user names stripped, 1 to 255 printable characters without
    spaces, kept as written but compared without regard to letter case
    (user_key(): "Zed@Example.COM" and "zed@example.com" are one user,
    in the store's keys and in decisions). Bad input raises
    StoreInputError, whose message says what is wrong.

    Wide networks. A relay client wider than /8 (IPv4) or /32 (IPv6),
    or an IPv6 network holding all of ::ffff:0:0/96 (every IPv4 address),
    makes an open relay: records refuse one (WideNetworkError) unless
    allow_wide is given (too_wide() says which are).

    Documents. An export document is a JSON object: "format" (FORMAT),
    "version" (FORMAT_VERSION) and a list of rows per section, each row
    an object with the section's fields. validate_document() checks a
    whole document and names a bad row by section and number.

    Records. A validated entry is a record (AllowlistRecord ...): its
    fields canonical, its key first, its list (if any) last, with packed
    addresses, so that a backend stores it as it is and loads it without
    parsing. SECTIONS tells, per section, how rows become records and
    keys. Every backend (store.py) and DomainPolicy.from_document
    (domainpolicy.py) validate with this module and nothing else.

    Pure: no I/O, no state.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from relaymilter.address import IPNetwork, normalise_domain, parse_network
from relaymilter.limits import RATE_NAMES

FORMAT = "relaymilter-policy"
FORMAT_VERSION = 1
KINDS = ("client", "user")
MAX_NAME_LENGTH = 255
MAX_TEXT_LENGTH = 1000              # comments and reasons
MAX_COUNT = 2**31 - 1               # per_hour and threshold


class StoreInputError(ValueError):
    """An entry or import document is not valid; nothing was changed."""


class WideNetworkError(StoreInputError):
    """A relay client network so wide that it would open the relay; force to accept."""


WIDEST_PREFIX = {4: 8, 6: 32}       # relay networks wider than these need forcing
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def too_wide(network: IPNetwork) -> bool:
    """Wider than /8 (IPv4) or /32 (IPv6), or holding every IPv4-mapped address."""
    if network.prefixlen < WIDEST_PREFIX[network.version]:
        return True
    return network.version == 6 and _IPV4_MAPPED.subnet_of(network)


def user_key(name: str) -> str:
    """The form a SASL user name is compared in: case folded ("Zed" is "zed")."""
    return name.casefold()


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


def _names(value: Any, field: str, canonical: Callable[[Any], str],
           key: Callable[[str], str] = str) -> tuple[str, ...]:
    """Sorted, one per key (the first spelling of a name kept)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise StoreInputError(f"{field} must be a list, not {value!r}")
    names: dict[str, str] = {}
    for item in value:
        name = canonical(item)
        names.setdefault(key(name), name)
    return tuple(sorted(names.values()))


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


def _expiry(value: Any) -> float | None:
    """An entry's end: a unix time, or None for "until removed". One already
    past is accepted (an import of an old export): it is simply not in force."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise StoreInputError(f"expires must be a unix time or null, not {value!r}")
    return float(value)


def _client_value(kind: str, value: Any,
                  field: str) -> tuple[str, str, bytes | None, int | None]:
    """A hold's or limit's value: (key, canonical text, packed, prefix length)."""
    if kind == "client":
        network = canonical_network(value)
        return str(network), str(network), network.network_address.packed, network.prefixlen
    name = canonical_user(value, field)
    return user_key(name), name, None, None


# ------------------------------------------------------------------ records ---
# One validated, canonical entry each: its key first, its list (if any) last.
# Backends store these fields as they are (packed addresses included, so that
# a load needs no parsing).

class AllowlistRecord(NamedTuple):
    family: int
    prefixlen: int
    packed: bytes
    domain: str             # "" = every domain
    network: str
    comment: str
    created: float
    added_by: str
    expires: float | None   # unix time it ends; None = until removed


class RelayClientRecord(NamedTuple):
    network: str
    packed: bytes
    prefixlen: int
    comment: str
    created: float
    added_by: str
    expires: float | None   # unix time it ends; None = until removed
    sender_domains: tuple[str, ...]


class HoldRecord(NamedTuple):
    kind: str
    value_key: str          # the network, or the user name case folded (user_key)
    value: str              # as written
    packed: bytes | None
    prefixlen: int | None
    reason: str
    comment: str
    created: float
    added_by: str
    expires: float | None   # unix time it ends; None = until removed
    scope: str              # "relay": relaying suspended; "all": every recipient refused


class LimitRecord(NamedTuple):
    kind: str
    value_key: str          # as HoldRecord.value_key; "" = the kind's default
    value: str
    packed: bytes | None
    prefixlen: int | None
    per_hour: int | None        # the rates of a limits.Limit; one at least
    per_day: int | None
    messages_per_hour: int | None
    messages_per_day: int | None
    comment: str
    created: float
    added_by: str


class DomainRecord(NamedTuple):
    domain: str
    dnsbl: str
    threshold: int | None
    comment: str
    created: float
    added_by: str
    owners: tuple[str, ...]


def _allow_key(row: Mapping[str, Any]) -> tuple:
    return _allow_record(row, 0.0, "-")[:4]


def _allow_record(row: Mapping[str, Any], now: float, actor: str) -> AllowlistRecord:
    network = canonical_network(row.get("network"))
    domain = row.get("domain")
    domain = "" if domain in (None, "") else canonical_domain(domain)
    return AllowlistRecord(network.version, network.prefixlen, network.network_address.packed,
                           domain, str(network), _text(row.get("comment"), "comment"),
                           *_stamp(row, now, actor), _expiry(row.get("expires")))


def _network_key(row: Mapping[str, Any]) -> tuple:
    return (str(canonical_network(row.get("network"))),)


def _relay_client_record(row: Mapping[str, Any], now: float, actor: str) -> RelayClientRecord:
    network = canonical_network(row.get("network"))
    domains = _names(row.get("sender_domains"), "sender_domains", canonical_domain)
    return RelayClientRecord(str(network), network.network_address.packed, network.prefixlen,
                             _text(row.get("comment"), "comment"), *_stamp(row, now, actor),
                             _expiry(row.get("expires")), domains)


def _hold_key(row: Mapping[str, Any]) -> tuple:
    kind = _kind(row.get("kind"))
    return (kind, _client_value(kind, row.get("value"), "user name")[0])


def _user_value_key(kind: str, value: Any) -> str:
    return "" if value in (None, "") else _client_value(kind, value, "user name")[0]


def _hold_record(row: Mapping[str, Any], now: float, actor: str) -> HoldRecord:
    kind = _kind(row.get("kind"))
    value = row.get("value")
    if value in (None, ""):
        raise StoreInputError(f"a {kind} hold needs a value (the client network or user name)")
    scope = row.get("scope") or "relay"
    if scope not in ("relay", "all"):
        raise StoreInputError(f"scope must be 'relay' or 'all', not {scope!r}")
    if scope == "all" and kind != "client":
        raise StoreInputError("only a client hold may block everything (scope 'all'): a "
                              "user is authenticated, and its relaying is what a hold stops")
    return HoldRecord(kind, *_client_value(kind, value, "user name"),
                      _text(row.get("reason"), "reason"), _text(row.get("comment"), "comment"),
                      *_stamp(row, now, actor), _expiry(row.get("expires")), scope)


def _limit_key(row: Mapping[str, Any]) -> tuple:
    kind = _kind(row.get("kind"))
    return (kind, _user_value_key(kind, row.get("value")))


def _limit_record(row: Mapping[str, Any], now: float, actor: str) -> LimitRecord:
    kind = _kind(row.get("kind"))
    value = row.get("value")
    value_columns = ("", "", None, None) if value in (None, "") else \
        _client_value(kind, value, "user name")
    rates = [None if row.get(name) is None else _count(row.get(name), name)
             for name in RATE_NAMES]
    if all(rate is None for rate in rates):
        raise StoreInputError("a limit needs one rate at least: " + ", ".join(RATE_NAMES))
    return LimitRecord(kind, *value_columns, *rates,
                       _text(row.get("comment"), "comment"), *_stamp(row, now, actor))


def _domain_key(row: Mapping[str, Any]) -> tuple:
    return (canonical_domain(row.get("domain")),)


def _domain_record(row: Mapping[str, Any], now: float, actor: str) -> DomainRecord:
    domain = canonical_domain(row.get("domain"))
    dnsbl = row.get("dnsbl")
    dnsbl = "on" if dnsbl is None else dnsbl
    if dnsbl not in ("on", "off"):
        raise StoreInputError(f"dnsbl must be 'on' or 'off', not {dnsbl!r}")
    threshold = row.get("threshold")
    threshold = None if threshold is None else _count(threshold, "threshold")
    owners = _names(row.get("owners"), "owners", canonical_user, user_key)
    return DomainRecord(domain, dnsbl, threshold, _text(row.get("comment"), "comment"),
                        *_stamp(row, now, actor), owners)


@dataclass(frozen=True)
class Section:
    """How one kind of entry is validated, and what its records hold."""

    name: str                       # key in export documents and counts
    record: Callable[[Mapping[str, Any], float, str], tuple]
    required: tuple[str, ...]       # row keys an import row must have
    fields: tuple[str, ...]         # row keys, in list()/export order
    key_columns: tuple[str, ...]    # the record's first fields, its key
    columns: tuple[str, ...]        # the record's fields but its list
    row_key: Callable[[Mapping[str, Any]], tuple]   # key fields given -> the key
    list_field: str | None = None   # the record's last field, a list of names

    def key(self, record: tuple) -> tuple:
        return record[:len(self.key_columns)]


_STAMP_FIELDS = ("comment", "created", "added_by")
# By name, in document order.
SECTIONS = {section.name: section for section in (
    Section("allowlist", _allow_record, ("network",),
            ("network", "domain") + _STAMP_FIELDS + ("expires",),
            ("family", "prefixlen", "packed", "domain"), AllowlistRecord._fields, _allow_key),
    Section("relay_clients", _relay_client_record, ("network",),
            ("network", "sender_domains") + _STAMP_FIELDS + ("expires",), ("network",),
            RelayClientRecord._fields[:-1], _network_key, "sender_domains"),
    Section("holds", _hold_record, ("kind", "value"),
            ("kind", "value", "reason") + _STAMP_FIELDS + ("expires", "scope"),
            ("kind", "value_key"),
            HoldRecord._fields, _hold_key),
    Section("limits", _limit_record, ("kind",),
            ("kind", "value") + RATE_NAMES + _STAMP_FIELDS, ("kind", "value_key"),
            LimitRecord._fields, _limit_key),
    Section("domains", _domain_record, ("domain",),
            ("domain", "dnsbl", "threshold", "owners") + _STAMP_FIELDS, ("domain",),
            DomainRecord._fields[:-1], _domain_key, "owners"),
)}


# ------------------------------------------------------------ history ---

class Event(NamedTuple):
    """One change to the policy, as `relaymilter history` shows it."""

    at: float               # unix time
    actor: str              # who: added_by of what was written, or who removed it
    action: str             # add, remove, import, import --replace, expire
    section: str            # allowlist ... domains, or "policy" for an import
    entry: str              # which entry: "user alice", "192.0.2.0/24 for example.com"
    detail: str             # what it says: JSON of its other fields, "" when none


# Per section, the fields that name an entry in the history.
_NAMED_BY = {"allowlist": ("network", "domain"), "relay_clients": ("network",),
             "holds": ("kind", "value"), "limits": ("kind", "value"), "domains": ("domain",)}


def entry_name(section: str, fields: Mapping[str, Any]) -> str:
    """The history's name of the entry with these fields (a record's or a key's)."""
    if section == "allowlist":
        domain = fields.get("domain") or ""
        return f"{fields['network']} for {domain}" if domain else str(fields["network"])
    if section == "limits" and not fields.get("value"):
        return f"{fields['kind']} (default)"
    return " ".join(str(fields[name]) for name in _NAMED_BY[section])


def removed_event(section: Section, key_fields: Mapping[str, Any], at: float,
                  actor: str) -> Event:
    """The history event of removing the entry key_fields name (as remove_*() take
    them; already checked by section.row_key), named in its canonical spelling."""
    fields = dict(key_fields)
    if "network" in fields:
        fields["network"] = str(canonical_network(fields["network"]))
    if fields.get("domain"):
        fields["domain"] = canonical_domain(fields["domain"])
    if fields.get("kind") == "client" and fields.get("value"):
        fields["value"] = str(canonical_network(fields["value"]))
    elif fields.get("value"):
        fields["value"] = canonical_user(fields["value"])
    return Event(at, actor, "remove", section.name, entry_name(section.name, fields), "")


def added_event(section: Section, record: tuple) -> Event:
    """The history event of writing record (a NamedTuple of entries.py)."""
    fields = record._asdict()     # type: ignore[attr-defined]
    detail = {name: list(value) if isinstance(value, tuple) else value
              for name in section.fields
              if name not in _NAMED_BY[section.name] + ("created", "added_by")
              and (value := fields.get(name)) not in (None, "", (), [])}
    return Event(fields["created"], fields["added_by"], "add", section.name,
                 entry_name(section.name, fields),
                 json.dumps(detail, sort_keys=True) if detail else "")


def refuse_wide(section: Section, record: tuple) -> None:
    """WideNetworkError when record is a relay client too_wide() to add unforced."""
    if section.name != "relay_clients":
        return
    network = ipaddress.ip_network(record[0])
    if too_wide(network):
        raise WideNetworkError(
            f"relay client {network} is wider than /{WIDEST_PREFIX[network.version]}: "
            "every client in it could relay anywhere (an open relay)")


def _record(section: Section, row: Any, now: float, actor: str) -> tuple:
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


def validate_document(document: Any, now: float, actor: str, header: bool = True,
                      allow_wide: bool = False) -> dict[str, list[tuple]]:
    """Every section's records, one per key (a later row wins), sorted by key.

    The document has the shape export() writes; header=False lets it go
    without "format" and "version". now and actor stamp rows that have
    no created or added_by. A relay client too_wide() is refused
    (WideNetworkError naming the row) unless allow_wide.
    """
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
    for name, section in SECTIONS.items():
        rows = document.get(name)
        if rows is None:
            rows = []
        if not isinstance(rows, list):
            raise StoreInputError(f"{name} must be a list of entries")
        by_key: dict[tuple, tuple] = {}
        for number, row in enumerate(rows, 1):
            try:
                record = _record(section, row, now, actor)
                if not allow_wide:
                    refuse_wide(section, record)
            except StoreInputError as error:
                raise type(error)(f"{name} row {number}: {error}") from None
            by_key[section.key(record)] = record
        # In key order, a backend fills its indexes front to back.
        validated[name] = [by_key[key] for key in sorted(by_key)]
    return validated


# ---------------------------------------------------------------- changes ---

def label(section: Section, record: tuple) -> str:
    """An entry as a person names it: "192.0.2.0/24 for example.com", "user Zed"."""
    if section.name == "allowlist":
        return record.network + (f" for {record.domain}" if record.domain else "")
    if section.name in ("holds", "limits"):
        return f"{record.kind} {record.value or '(default)'}"
    return record[0]


def changes(current: Mapping[str, list[tuple]], wanted: Mapping[str, list[tuple]],
            replace: bool) -> dict[str, dict[str, list[str]]]:
    """What writing wanted over current would do, per section: the labels of
    the entries "added", "replaced" (same key, other content; created and
    added_by do not count) and, with replace, "removed"."""
    result = {}
    for name, section in SECTIONS.items():
        before = {section.key(record): _content(record) for record in current.get(name, ())}
        after = {section.key(record): record for record in wanted.get(name, ())}
        result[name] = {
            "added": [label(section, record) for key, record in after.items()
                      if key not in before],
            "replaced": [label(section, record) for key, record in after.items()
                         if key in before and before[key] != _content(record)],
            "removed": [label(section, record) for record in current.get(name, ())
                        if replace and section.key(record) not in after],
        }
    return result


def import_changes(current: Any, document: Any, replace: bool = False,
                   force: bool = False) -> dict[str, dict[str, list[str]]]:
    """What importing document over the export-shaped current (None: an empty
    store) would change (changes()); StoreInputError for a bad document."""
    now, actor = time.time(), default_actor()
    wanted = validate_document(document, now, actor, allow_wide=force)
    before = {} if current is None else validate_document(current, now, actor, allow_wide=True)
    return changes(before, wanted, replace)


def _content(record: tuple) -> tuple:
    return record._replace(created=0.0, added_by="")
