"""relay - may this client relay to this recipient?

NAME
    relay - the relay verdict of DESIGN section 2

SYNOPSIS
    rules = RelayRules.build(local_domains=["example.com", ".example.net"],
                             trusted_networks=["127.0.0.0/8"])
    trust = client_trust(ip, auth_user, rules)        # Trust.UNTRUSTED, ...
    verdict = relay_verdict(parse_recipient(rcpt), resolved_recipient, rules)

DESCRIPTION
    Trust comes only from the client address (trusted networks) and from the
    MTA's {auth_authen} macro. Names, HELO, MAIL FROM and AUTH= prove
    nothing. A trusted client may send anywhere, tricks included: the MTA
    routes its mail as it always would (the engine, engine.py, applies
    that).

    relay_verdict() answers for an untrusted client, which is the same as
    asking "is this recipient ours?": a recipient is accepted only when it
    clearly ends at one of our domains:
      1. routing tricks (percent hack, bang path, "@" in the local part,
         source route) are refused, even for postmaster;
      2. bare <postmaster> and postmaster@<local domain> are accepted;
      3. any other trick (no, empty, malformed or mapped domain) is refused;
      4. an address literal must be one configured as our own;
      5. the domain must be local, and so must every other reading an MTA
         may make of it (IDNA 2003, Unicode case folding: straße.test may
         be strasse.test to Postfix), and the domain the MTA itself
         resolved the recipient to ({rcpt_addr}), when the MTA says.

    No I/O here; the caller supplies the rules and the MTA's answers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from relaymilter.address import (IPAddress, IPNetwork, Recipient, Trick, mta_readings,
                                 normalise_domain, normalise_ip, parse_ip, parse_network,
                                 resolved_domain)
from relaymilter.reason import Reason

class Trust(enum.Enum):
    """Why a client may relay, if it may."""

    UNTRUSTED = "untrusted"
    TRUSTED_NETWORK = "trusted-network"
    AUTHENTICATED = "authenticated"
    RELAY_CLIENT = "relay-client"       # a domain-policy entry (domainpolicy.py)

    reason: Reason      # the reason of a permit this trust grants (None for UNTRUSTED)


# A plain attribute, not a property: read for every permitted relay.
for _trust, _reason in ((Trust.UNTRUSTED, None), (Trust.TRUSTED_NETWORK, Reason.TRUSTED_NETWORK),
                        (Trust.AUTHENTICATED, Reason.AUTHENTICATED),
                        (Trust.RELAY_CLIENT, Reason.RELAY_CLIENT)):
    _trust.reason = _reason
del _trust, _reason


@dataclass(frozen=True, slots=True)
class RelayRules:
    """The relay half of a config snapshot, ready for fast lookups.

    exact_domains     domains that are local themselves
    parent_domains    domains every subdomain of which is local (".x" form)
    own_literals      addresses that [literal] recipients may name
    trusted_networks  client networks that may relay
    trust_authenticated  whether {auth_authen} lets a client relay
    """

    exact_domains: frozenset[str]
    parent_domains: tuple[str, ...]
    own_literals: frozenset[IPAddress]
    trusted_networks: tuple[IPNetwork, ...]
    trust_authenticated: bool

    @classmethod
    def build(cls, local_domains: Iterable[str] = (), trusted_networks: Iterable[str] = (),
              own_literals: Iterable[str] = (), trust_authenticated: bool = True) -> "RelayRules":
        """Build rules from config text; raises ValueError naming a bad entry."""
        exact, parents = split_domain_patterns(local_domains)
        networks = tuple(parse_network(text) for text in trusted_networks)
        literals = frozenset(parse_ip(text) for text in own_literals)
        return cls(exact_domains=exact, parent_domains=parents, own_literals=literals,
                   trusted_networks=networks, trust_authenticated=trust_authenticated)


@dataclass(frozen=True, slots=True)
class RelayVerdict:
    """allowed (the recipient is ours), and why."""

    allowed: bool
    reason: Reason


def split_domain_patterns(patterns: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """["a.example", ".b.example"] -> ({"a.example"}, ("b.example",))."""
    exact: set[str] = set()
    parents: set[str] = set()
    for pattern in patterns:
        pattern = pattern.strip()
        try:
            if pattern.startswith("."):
                parents.add(normalise_domain(pattern[1:]))
            else:
                exact.add(normalise_domain(pattern))
        except ValueError as error:
            raise ValueError(f"{pattern!r} is not a domain: {error}") from None
    return frozenset(exact), tuple(sorted(parents))


def is_local_domain(domain: str, rules: RelayRules) -> bool:
    """domain must already be normalised (address.normalise_domain)."""
    if domain in rules.exact_domains:
        return True
    for parent in rules.parent_domains:
        if domain.endswith(parent) and domain[-len(parent) - 1:-len(parent)] == ".":
            return True
    return False


def client_trust(client_ip: IPAddress | None, auth_user: str | None,
                 rules: RelayRules) -> Trust:
    """Trust from the client address or SMTP AUTH; None address = untrusted."""
    if client_ip is not None:
        client_ip = normalise_ip(client_ip)
        for network in rules.trusted_networks:
            if client_ip in network:
                return Trust.TRUSTED_NETWORK
    if auth_user and rules.trust_authenticated:
        return Trust.AUTHENTICATED
    return Trust.UNTRUSTED


def relay_verdict(recipient: Recipient, resolved_recipient: str | None,
                  rules: RelayRules) -> RelayVerdict:
    """May an untrusted client send to this recipient, i.e. is it ours?

    See the module docstring for the order. resolved_recipient is the MTA's
    own resolution ({rcpt_addr}) or None when the MTA did not say; an
    address without a domain there (Sendmail's local mailer) says nothing
    and is ignored.
    """
    routing = recipient.routing_tricks
    if routing:
        return RelayVerdict(False, _first(routing))
    if recipient.is_bare_postmaster:
        return RelayVerdict(True, Reason.POSTMASTER)
    if recipient.tricks:
        return RelayVerdict(False, _first(recipient.tricks))
    if recipient.literal is not None:
        if normalise_ip(recipient.literal) not in rules.own_literals:
            return RelayVerdict(False, Reason.FOREIGN_LITERAL)
        local_reason = Reason.OWN_LITERAL
    elif recipient.domain is not None and is_local_domain(recipient.domain, rules):
        # Without {rcpt_addr} (the policy service) this is the only lock.
        if not all(is_local_domain(reading, rules) for reading in mta_readings(recipient.domain)):
            return RelayVerdict(False, Reason.MTA_RESOLVES_REMOTE)
        local_reason = Reason.POSTMASTER if recipient.is_postmaster else Reason.LOCAL_DOMAIN
    else:
        return RelayVerdict(False, Reason.REMOTE_DOMAIN)
    if resolved_recipient and not _resolves_local(resolved_recipient, rules):
        return RelayVerdict(False, Reason.MTA_RESOLVES_REMOTE)
    return RelayVerdict(True, local_reason)


def _resolves_local(resolved: str, rules: RelayRules) -> bool:
    try:
        domain, literal = resolved_domain(resolved)
    except ValueError:
        return False
    if literal is not None:
        return normalise_ip(literal) in rules.own_literals
    return domain is None or is_local_domain(domain, rules)


def _first(tricks: frozenset[Trick]) -> Reason:
    """A stable reason when several tricks are present."""
    return Reason.of_trick(min(tricks, key=lambda trick: trick.value))
