"""reason - why a decision came out as it did: a closed vocabulary, as a type.

NAME
    reason - Reason, the enum every decision carries

SYNOPSIS
    decision.reason is Reason.REMOTE_DOMAIN
    decision.reason.word           # "remote-domain": the log's reason=
    decision.reason.label          # "remote-domain": the metrics label
    decision.reason.grants_relay   # False; True for trusted-network,
                                   # authenticated, relay-client

DESCRIPTION
    Each member carries what its consumers need, so that none of them
    matches strings: the log word (docs/guide.md, "Reading the log"), the
    metric label (relaymilter_decisions_total{reason}), and whether a permit
    for this reason lets the client relay, which the policy service answers
    with OK instead of DUNNO (Postfix's reject_unauth_destination after it
    must not undo such a permit).

    The words are part of the user-facing contract: fail2ban filters and
    dashboards match them. Add members freely; never rename a word.
"""

from __future__ import annotations

import enum

from relaymilter.address import Trick


class Reason(enum.Enum):
    """See the module docstring. The value is the word."""

    # Permits that let the client relay.
    TRUSTED_NETWORK = ("trusted-network", True)
    AUTHENTICATED = ("authenticated", True)
    RELAY_CLIENT = ("relay-client", True)        # a domain-policy entry
    # Permits of inbound mail: the recipient is ours.
    LOCAL_DOMAIN = ("local-domain",)
    POSTMASTER = ("postmaster",)
    OWN_LITERAL = ("own-literal",)
    NOT_LISTED = ("not-listed",)
    ALLOWLISTED = ("allowlisted",)
    DNSBL_OPT_OUT = ("dnsbl-opt-out",)
    # Relay attempts: the recipient is not clearly ours.
    REMOTE_DOMAIN = ("remote-domain",)
    FOREIGN_LITERAL = ("foreign-literal",)
    MTA_RESOLVES_REMOTE = ("mta-resolves-remote",)
    PERCENT_HACK = ("percent-hack",)
    BANG_PATH = ("bang-path",)
    AT_IN_LOCAL_PART = ("at-in-local-part",)
    SOURCE_ROUTE = ("source-route",)
    NO_DOMAIN = ("no-domain",)
    EMPTY_DOMAIN = ("empty-domain",)
    MALFORMED_DOMAIN = ("malformed-domain",)
    MAPPED_DOMAIN = ("mapped-domain",)
    # Other refusals and deferrals.
    BAD_SYNTAX = ("bad-syntax",)
    DNSBL = ("dnsbl",)
    HOLD_CLIENT = ("hold-client",)
    HOLD_USER = ("hold-user",)
    BLOCKED = ("blocked",)
    RELAY_CLIENT_SENDER = ("relay-client-sender",)
    SENDER_NOT_OWNED = ("sender-not-owned",)
    RATE_LIMIT = ("rate-limit",)
    INTERNAL_ERROR = ("internal-error",)

    # Plain attributes, not properties: read for every decision.
    word: str               # what the decision log line says after reason=
    label: str              # the reason label of relaymilter_decisions_total
    grants_relay: bool      # a permit for this reason lets the client relay

    def __new__(cls, word: str, grants_relay: bool = False) -> "Reason":
        member = object.__new__(cls)
        member._value_ = member.word = member.label = word
        member.grants_relay = grants_relay
        return member

    @classmethod
    def of_trick(cls, trick: Trick) -> "Reason":
        """The reason a recipient with this trick is refused."""
        return _TRICKS[trick]


_TRICKS = {
    Trick.PERCENT_HACK: Reason.PERCENT_HACK,
    Trick.BANG_PATH: Reason.BANG_PATH,
    Trick.AT_IN_LOCAL_PART: Reason.AT_IN_LOCAL_PART,
    Trick.SOURCE_ROUTE: Reason.SOURCE_ROUTE,
    Trick.NO_DOMAIN: Reason.NO_DOMAIN,
    Trick.EMPTY_DOMAIN: Reason.EMPTY_DOMAIN,
    Trick.MALFORMED_DOMAIN: Reason.MALFORMED_DOMAIN,
    Trick.MAPPED_DOMAIN: Reason.MAPPED_DOMAIN,
}
