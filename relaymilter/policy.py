"""policy - facts about one SMTP transaction + a snapshot -> a Decision.

NAME
    policy - the engine both front ends (milter, policy service) call

SYNOPSIS
    decision = decide_recipient(RecipientFacts(...), live.snapshot)
    decision.action, decision.reply        # Action.REJECT, "554 5.7.1 ..."

DESCRIPTION
    Pure: no pymilter, no sockets, no clock. The front ends turn what the MTA
    says into frozen facts and apply the Decision they get back; they hold no
    policy of their own. Replies use Postfix's wording so that log parsers
    and fail2ban filters written for Postfix keep working.

    Order at RCPT (docs/guide.md, "Decision order"):

    1. recipient syntax                          501 5.1.3
    2. a recipient in our own domains (the relay verdict for an untrusted
       client, DESIGN section 2) is inbound mail: postmaster -> permit;
       per-domain allowlist or DNSBL opt-out -> permit; DNSBL verdict with
       the domain's threshold, else the global one -> 554 5.7.1 or permit.
       Trusted, authenticated and relay clients skip the DNSBL.
    3. any other recipient is relaying: a hold on the client or user ->
       550 5.7.1; no permission (trusted networks, a relay client entry,
       SMTP AUTH) -> 554 5.7.1 Relay access denied; a relay client's sender
       domains, a SASL user's owned domains -> 554 / 553 5.7.1; the
       outbound limit -> 450 4.7.1.

    A relay attempt is refused as such, without waiting for DNS; a trusted
    client's lookups were never started. An allowlist entry never opens
    relaying: it is read for inbound mail only.

    The DNSBL verdict is read only when it matters (listing.result() waits
    until the lookups' deadline at most): the facts carry the pending lookup,
    not its result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from typing import Protocol

from relaymilter.address import (AddressSyntaxError, IPAddress, Recipient, parse_recipient,
                                 resolved_domain)
from relaymilter.dnsbl import ListingResult, summarise
from relaymilter.limits import RecipientCounter
from relaymilter.live import Snapshot
from relaymilter.relay import Trust, client_trust, relay_verdict
from relaymilter.store import Hold


class Action(enum.Enum):
    PERMIT = "permit"
    REJECT = "reject"   # permanent, 5xx
    DEFER = "defer"     # temporary, 4xx


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer, and why (reason: short, from a closed vocabulary)."""

    action: Action
    reason: str
    code: int | None = None
    dsn: str | None = None
    text: str | None = None
    dry_run: bool = False   # the decision was a reject/defer, answered as permit
    hold_request: tuple[str, str] | None = None   # (kind, value) to put on hold

    @property
    def reply(self) -> str:
        """"554 5.7.1 text" for a reject or defer, "" for a permit."""
        if self.code is None:
            return ""
        return f"{self.code} {self.dsn} {self.text}"


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """Who is talking to the MTA. address None = unknown (never trusted)."""

    address: IPAddress | None
    name: str = "unknown"
    helo: str = ""
    auth_user: str | None = None


class PendingVerdict(Protocol):
    """The client's DNSBL lookups, started at connect (dnsbl.PendingListing)."""

    def result(self) -> ListingResult: ...


@dataclass(frozen=True, slots=True)
class RecipientFacts:
    """One RCPT TO, as the MTA reported it.

    recipient           the argument as the client wrote it
    resolved_recipient  the MTA's own resolution ({rcpt_addr}), None if unsaid
    """

    client: ClientFacts
    sender: str
    recipient: str
    resolved_recipient: str | None = None
    queue_id: str | None = None
    listing: PendingVerdict | None = None   # None: no lookups (no zones, trusted)


def permit(reason: str) -> Decision:
    return Decision(Action.PERMIT, reason)


def relay_denied(recipient_path: str, reason: str) -> Decision:
    return Decision(Action.REJECT, reason, 554, "5.7.1",
                    f"<{printable(recipient_path)}>: Relay access denied")


def bad_recipient_syntax(reason: str) -> Decision:
    return Decision(Action.REJECT, reason, 501, "5.1.3", "Bad recipient address syntax")


def relaying_suspended(hold: Hold) -> Decision:
    return Decision(Action.REJECT, f"hold-{hold.kind}", 550, "5.7.1",
                    "Relaying suspended for this sender")


def sender_not_owned(sender: str) -> Decision:
    shown = printable(sender.strip().strip("<>"))
    return Decision(Action.REJECT, "sender-not-owned", 553, "5.7.1",
                    f"<{shown}>: Sender address rejected: not owned by user")


RATE_LIMIT_TEXT = "Sending rate limit exceeded, try again later"


def rate_limited(hold_request: tuple[str, str] | None = None) -> Decision:
    return Decision(Action.DEFER, "rate-limit", 450, "4.7.1", RATE_LIMIT_TEXT,
                    hold_request=hold_request)


def client_listed(result: ListingResult) -> Decision:
    text = (f"Service unavailable; Client host [{result.client}] blocked using "
            f"{printable(result.reply_zone or 'a DNS blocklist')}")
    if result.txt:
        text += f"; {printable(result.txt)}"
    return Decision(Action.REJECT, "dnsbl", 554, "5.7.1", text)


def internal_fault(on_error: str) -> Decision:
    """What a fault inside relaymilter answers: never a permanent reject."""
    if on_error == "accept":
        return permit("internal-error")
    return Decision(Action.DEFER, "internal-error", 451, "4.3.0",
                    "Temporary policy failure, try again later")


def decide_recipient(facts: RecipientFacts, snapshot: Snapshot,
                     counter: RecipientCounter | None = None) -> Decision:
    """The decision for one recipient, in the order of the module docstring."""
    try:
        recipient = parse_recipient(facts.recipient)
    except AddressSyntaxError:
        return bad_recipient_syntax("bad-syntax")
    rules, store = snapshot.relay_rules, snapshot.policy
    client = facts.client
    local = relay_verdict(recipient, Trust.UNTRUSTED, facts.resolved_recipient, rules)
    trust = client_trust(client.address, client.auth_user, rules)
    if local.allowed:
        return _inbound(facts, recipient, trust, local.reason, snapshot)
    # The recipient is not ours: relaying.
    hold = store.held(client.address, client.auth_user)
    if hold is not None:
        return relaying_suspended(hold)
    relay_client = None
    if trust is Trust.UNTRUSTED:
        relay_client = store.relay_client(client.address)
        if relay_client is None:
            return relay_denied(recipient.path, local.reason)
        trust = Trust.RELAY_CLIENT
    sender_domain = _sender_domain(facts.sender)
    if trust is Trust.RELAY_CLIENT and relay_client.sender_domains \
            and sender_domain not in relay_client.sender_domains:
        return relay_denied(recipient.path, "relay-client-sender")
    if trust is Trust.AUTHENTICATED:
        owned = store.owned_domains(client.auth_user)
        if owned is not None and sender_domain not in owned:
            return sender_not_owned(facts.sender)
    return _outbound(facts, trust, snapshot, counter)


def _inbound(facts: RecipientFacts, recipient: Recipient, trust: Trust, reason: str,
             snapshot: Snapshot) -> Decision:
    """Mail for our own domains: postmaster, allowlists, opt-outs, then DNSBL."""
    if trust is not Trust.UNTRUSTED:
        return permit(trust.value)      # our own users and networks: no DNSBL
    if recipient.is_postmaster or facts.listing is None:
        return permit(reason)
    store = snapshot.policy
    domain = store.domain_dnsbl(recipient.domain)
    if domain is not None and not domain.enabled:
        return permit("dnsbl-opt-out")
    result = facts.listing.result()
    if domain is not None and domain.threshold is not None:
        result = summarise(result.client, result.answers, domain.threshold)
    # Relay clients and the allowlist only matter for a listed client: most
    # clients are not, and never cost these lookups.
    if result.listed:
        if store.relay_client(facts.client.address) is not None:
            return permit(Trust.RELAY_CLIENT.value)
        if store.allowlisted(facts.client.address, recipient.domain):
            return permit("allowlisted")
    return decide_listing(result, reason)


def _outbound(facts: RecipientFacts, trust: Trust, snapshot: Snapshot,
              counter: RecipientCounter | None) -> Decision:
    """Relaying by a trusted sender: the outbound limit of the user or client."""
    client = facts.client
    if trust is Trust.AUTHENTICATED:
        kind, value = "user", client.auth_user
    else:
        kind, value = "client", client.address
    limit = snapshot.policy.limit(kind, value)
    if limit is None or counter is None:
        return permit(trust.value)
    charge = counter.charge((kind, value), limit)
    hold = (kind, str(value)) if charge.hold_due else None
    if not charge.allowed:
        return rate_limited(hold)
    return Decision(Action.PERMIT, trust.value, hold_request=hold)


def _sender_domain(sender: str) -> str | None:
    """The normalised domain of MAIL FROM; None for <> or an unreadable one."""
    try:
        domain, _ = resolved_domain(sender)
    except ValueError:
        return None
    return domain


def decide_listing(result: ListingResult, permit_reason: str = "not-listed") -> Decision:
    """The DNSBL half: reject a listed client, else permit with permit_reason."""
    if result.listed:
        return client_listed(result)
    return permit(permit_reason)


def lookups_needed(client: ClientFacts, snapshot: Snapshot) -> bool:
    """Start DNSBL lookups at connect? Not for trusted networks, nor without zones."""
    if snapshot.dnsbl is None or client.address is None:
        return False
    return client_trust(client.address, None, snapshot.relay_rules) is Trust.UNTRUSTED


def enforce(decision: Decision, dry_run: bool) -> Decision:
    """Under dry_run every reject or defer is answered as a permit, marked."""
    if dry_run and decision.action is not Action.PERMIT:
        return replace(decision, dry_run=True)
    return decision


def answered_action(decision: Decision) -> Action:
    """What the MTA is actually told."""
    return Action.PERMIT if decision.dry_run else decision.action


def printable(text: str) -> str:
    """Text safe to echo in an SMTP reply or a log line: printable ASCII only."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(char if " " <= char <= "~" else "?" for char in text)
