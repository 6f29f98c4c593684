"""domainpolicy - the domain policy as decisions read it: immutable, in memory.

NAME
    domainpolicy - the immutable snapshot of the store's entries

SYNOPSIS
    policy = storage.load_policy()          # DomainPolicy, from any backend
    policy = DomainPolicy.from_document({"holds": [{"kind": "user", "value": "eve"}]})
    policy.held(ip_address("192.0.2.7"), "alice")          # Hold or None
    policy.relay_client(ip_address("192.0.2.7"))          # RelayClient or None
    policy.owned_domains("alice")                          # frozenset or None
    policy.allowlisted(ip_address("192.0.2.7"), "example.com")    # True or False
    policy.domain_dnsbl("example.com")                     # DomainDnsbl or None
    policy.limit("user", "alice")                          # a limits.Limit, or None
    policy.counts                                          # entries per section
    EMPTY_POLICY                                           # no entries at all

DESCRIPTION
    The domain policy is the store's data (entries.py describes its entries):
    allowlist, relay clients, holds, limits and domains. A DomainPolicy
    keeps only what decisions need (no comments, no creation times) in
    compact lookup structures (netindex.py), and never changes: a reload
    builds a new one and swaps one reference, and any number of threads
    may read one.

    Making one. A storage backend reads its tables and hands the rows to
    DomainPolicy.from_rows(), in the shapes that method names; the
    allowlist comes as a ready NetworkIndex, because a backend can build
    it in bulk (sqlitestore.py). from_document() makes one from an
    export()-shaped document without any backend (tests), validated as
    an import is.

    This module does no I/O and imports no database module: the decision
    engine imports it.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from relaymilter.address import IPAddress, parse_network
from relaymilter.entries import too_wide, user_key, validate_document
from relaymilter.limits import RATE_NAMES, Limit
from relaymilter.netindex import NetworkIndex


@dataclass(frozen=True, slots=True)
class Hold:
    """A suspension in force: kind "client" (value: the network) or "user"; scope
    "relay" (relaying suspended) or "all" (a client refused every recipient)."""

    kind: str
    value: str
    reason: str
    expires: float | None = None    # unix time it ends; None = until removed
    scope: str = "relay"
    created: float | None = field(default=None, compare=False)   # unix time it was written


@dataclass(frozen=True, slots=True)
class RelayClient:
    """A network allowed to relay; sender_domains empty = any MAIL FROM."""

    network: str
    sender_domains: frozenset[str]
    expires: float | None = None    # unix time it ends; None = until removed


@dataclass(frozen=True, slots=True)
class DomainDnsbl:
    """A hosted domain's DNSBL setting; threshold None = the configured one."""

    enabled: bool
    threshold: int | None


# The rows from_rows() reads, by store column (and record field): the SQL
# backends select them (sqlrecords.POLICY_ROWS), from_document() takes them
# from validated records.
RELAY_CLIENT_ROW = ("network", "packed", "prefixlen", "expires")
HOLD_ROW = ("kind", "value", "packed", "prefixlen", "reason", "expires", "scope", "created")
LIMIT_ROW = ("kind", "value", "packed", "prefixlen") + RATE_NAMES


class DomainPolicy:
    """The store's entries, as decisions read them. Immutable: share it freely.

    Make one with Storage.load_policy() or, without a store (tests),
    DomainPolicy.from_document(); EMPTY_POLICY has no entries.
    Client addresses are ipaddress objects (IPv4-mapped IPv6 is IPv4);
    domains are normalised (address.normalise_domain) by the caller.
    """

    __slots__ = ("_allowlist", "_scopes", "_global_scopes", "_relay_index", "_relay_clients",
                 "_hold_index", "_client_holds", "_user_holds", "_default_limits",
                 "_user_limits", "_client_limit_index", "_client_limits", "_domains",
                 "_owned", "_counts", "_next_expiry", "_blocks")

    def __init__(self, **parts: Any) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, parts.pop(name[1:]))
        if parts:
            raise TypeError(f"unknown domain policy parts: {', '.join(sorted(parts))}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a DomainPolicy never changes")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a DomainPolicy never changes")

    def __repr__(self) -> str:
        return "<DomainPolicy " + ", ".join(
            f"{count} {kind}" for kind, count in self._counts.items()) + ">"

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> DomainPolicy:
        """The domain policy of an export()-shaped document ("format", "version" optional).

        Validated exactly as import_policy() validates (StoreInputError).
        """
        now = time.time()
        records = validate_document(document, now, "snapshot", header=False,
                                    allow_wide=True)
        allowlist = [entry for entry in records["allowlist"]
                     if entry.expires is None or entry.expires > now]
        allowlist_ends = min((entry.expires for entry in allowlist if entry.expires is not None),
                             default=None)
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
        return cls.from_rows(
            index, scopes,
            map(attrgetter(*RELAY_CLIENT_ROW), relay),
            ((entry.network, domain) for entry in relay for domain in entry.sender_domains),
            map(attrgetter(*HOLD_ROW), records["holds"]),
            map(attrgetter(*LIMIT_ROW), records["limits"]),
            [(dnsbl, threshold, names) for (dnsbl, threshold), names in settings.items()],
            list(owners.items()), allowlist_ends)

    @classmethod
    def from_rows(cls, allowlist: NetworkIndex, scopes: Mapping[str, int],
                  relay_clients: Iterable[tuple[str, bytes, int]],
                  relay_client_domains: Iterable[tuple[str, str]],
                  holds: Iterable[tuple[str, str, bytes | None, int | None, str, float | None,
                                        str, float]],
                  limits: Iterable[tuple],
                  domains: Iterable[tuple[str, int | None, list[str]]],
                  owners: Iterable[tuple[str, list[str]]],
                  allowlist_ends: float | None = None) -> DomainPolicy:
        """A domain policy from what a backend reads (plain rows, any iterables):

        allowlist             the index of allowlist networks, each tagged with
                              scopes[domain] ("" = every domain)
        relay_clients         RELAY_CLIENT_ROW: (network, packed address, prefix length,
                              expires); those already ended are left out
        relay_client_domains  (network, sender domain)
        holds                 HOLD_ROW: (kind, value, packed or None, prefix length or None,
                              reason, expires: unix time or None, scope "relay" or "all",
                              created); those already ended are left out
        limits                LIMIT_ROW: (kind, value, packed or None, prefix length or
                              None, then the rates of a limits.Limit: per hour, per day,
                              messages per hour, messages per day, each a count or None)
        domains               (dnsbl "on"/"off", threshold or None, [domain, ...])
        owners                (SASL user, [domain, ...])
        allowlist_ends        when the first allowlist entry in the index ends (the
                              backend leaves ended ones out of it), or None

        SASL user names are compared without regard to letter case
        (entries.user_key): rows may spell one user in several ways.
        """
        sender_domains: dict[str, set[str]] = {}
        for network, domain in relay_client_domains:
            sender_domains.setdefault(network, set()).add(domain)
        now = time.time()
        relay_entries = [entry for entry in relay_clients if entry[3] is None or entry[3] > now]
        relay_list = tuple(RelayClient(network, frozenset(sender_domains.get(network, ())),
                                       expires)
                           for network, _, _, expires in relay_entries)
        relay_index = NetworkIndex.from_packed(
            (packed, prefixlen, tag)
            for tag, (_, packed, prefixlen, _) in enumerate(relay_entries))
        ends = [allowlist_ends] + [entry[3] for entry in relay_entries]

        client_holds: list[tuple[Hold, bytes, int]] = []
        user_holds: dict[str, Hold] = {}
        for kind, value, packed, prefixlen, reason, expires, scope, created in holds:
            if expires is not None:
                if expires <= now:
                    continue
                ends.append(expires)
            hold = Hold(kind, value, reason, expires, scope, created)
            if kind == "client":
                client_holds.append((hold, packed, prefixlen))
            else:
                user_holds[user_key(value)] = hold
        hold_index = NetworkIndex.from_packed(
            (packed, prefixlen, tag) for tag, (_, packed, prefixlen) in enumerate(client_holds))

        default_limits: dict[str, Limit] = {}
        user_limits: dict[str, Limit] = {}
        client_limits: list[tuple[bytes, int, Limit]] = []
        for kind, value, packed, prefixlen, *rates in limits:
            limit = Limit(*rates)
            if value == "":
                default_limits[kind] = limit
            elif kind == "client":
                client_limits.append((packed, prefixlen, limit))
            else:
                user_limits[user_key(value)] = limit
        client_limit_index = NetworkIndex.from_packed(
            (packed, prefixlen, tag) for tag, (packed, prefixlen, _) in enumerate(client_limits))

        # Most domains share one of a few settings: one object per setting.
        domain_settings: dict[str, DomainDnsbl] = {}
        for dnsbl, threshold, names in domains:
            domain_settings.update(dict.fromkeys(names, DomainDnsbl(dnsbl == "on", threshold)))
        global_scope = scopes.get("")
        owned: dict[str, set[str]] = {}
        for owner, names in owners:
            owned.setdefault(user_key(owner), set()).update(names)

        return cls(
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
            client_limits=tuple((prefixlen, limit) for _, prefixlen, limit in client_limits),
            domains=domain_settings,
            owned={owner: frozenset(names) for owner, names in owned.items()},
            counts={"allowlist": len(allowlist), "relay_clients": len(relay_list),
                    "holds": len(client_holds) + len(user_holds),
                    "limits": len(default_limits) + len(user_limits) + len(client_limits),
                    "domains": len(domain_settings)},
            next_expiry=min((end for end in ends if end is not None), default=None),
            blocks=any(hold.scope == "all" for hold, _, _ in client_holds))

    @property
    def next_expiry(self) -> float | None:
        """When the first of its entries with an end (allowlist, relay client,
        hold) ends, unix time: the policy must be read again then. None: none
        ends by itself."""
        return self._next_expiry

    @property
    def counts(self) -> dict[str, int]:
        """Entries per section (allowlist, relay_clients, ...), for logs."""
        return dict(self._counts)

    def held(self, client: IPAddress | None, user: str | None) -> Hold | None:
        """The hold on the client (longest network holding it), else on the user.

        A hold that ended since this policy was read no longer counts; the
        watcher reads the policy again at next_expiry, so that a wider hold
        around an ended one comes back into view within a poll."""
        if client is not None:
            tag = self._hold_index.longest(client)
            if tag is not None and _in_force(self._client_holds[tag]):
                return self._client_holds[tag]
        if user:
            hold = self._user_holds.get(user_key(user))
            if hold is not None and _in_force(hold):
                return hold
        return None

    def holds(self) -> list[Hold]:
        """Every hold in force: clients (in network order), then users."""
        return [hold for hold in (*self._client_holds, *self._user_holds.values())
                if _in_force(hold)]

    def blocked(self, client: IPAddress | None) -> Hold | None:
        """The hold refusing every recipient of client (scope "all"), if the
        longest hold network holding it is one."""
        # Asked for every recipient of every untrusted client: without blocks,
        # no lookup.
        if client is None or not self._blocks:
            return None
        tag = self._hold_index.longest(client)
        if tag is None:
            return None
        hold = self._client_holds[tag]
        return hold if hold.scope == "all" and _in_force(hold) else None

    def wide_relay_clients(self) -> list[str]:
        """Relay-client networks wider than /8 or /32 (entries.too_wide): each an
        open relay for its clients, accepted only with --force."""
        return [entry.network for entry in self._relay_clients
                if too_wide(parse_network(entry.network))]

    def relay_client(self, client: IPAddress | None) -> RelayClient | None:
        """The relay client entry of the longest network holding client, or None."""
        if client is None:
            return None
        tag = self._relay_index.longest(client)
        if tag is None or not _in_force(self._relay_clients[tag]):
            return None
        return self._relay_clients[tag]

    def owned_domains(self, user: str | None) -> frozenset[str] | None:
        """The sender domains user owns; None when it owns none (unrestricted)."""
        return self._owned.get(user_key(user)) if user else None

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

    def limit(self, kind: str, value: str | IPAddress | None) -> Limit | None:
        """The rates value is held to: its own limit, else the kind's default, else None.

        kind "user": value is the SASL user name; between its own limit and
        the default comes its domain's (the entry "@domain", for logins
        user@domain). kind "client": value is an address or network (text or
        ipaddress); the longest limit network holding it counts. A value
        that is neither gets the default.
        """
        if kind == "user":
            if value:
                key = user_key(value)
                own = self._user_limits.get(key)
                if own is not None:
                    return own
                at = key.rfind("@")
                if at > 0:
                    domain = self._user_limits.get(key[at:])
                    if domain is not None:
                        return domain
        elif kind == "client":
            if value and self._client_limits:
                own = self._client_limit(value)
                if own is not None:
                    return own
        else:
            raise ValueError(f"limit kind must be 'client' or 'user', not {kind!r}")
        return self._default_limits.get(kind)

    def _client_limit(self, value: str | IPAddress) -> Limit | None:
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
                prefixlen, limit = self._client_limits[tag]
                if prefixlen <= value.prefixlen:
                    return limit
            return None
        tag = self._client_limit_index.longest(value)
        return None if tag is None else self._client_limits[tag][1]


EMPTY_POLICY = DomainPolicy.from_rows(NetworkIndex.from_blocks(()), {}, (), (), (), (), (), ())


def _in_force(entry: Hold | RelayClient) -> bool:
    """Not ended since the policy was read (it is read again at next_expiry)."""
    return entry.expires is None or time.time() < entry.expires
