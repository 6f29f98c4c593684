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

    Order at RCPT: recipient syntax -> relay verdict (DESIGN section 2) ->
    trusted and authenticated clients permitted -> postmaster of a local
    domain permitted -> DNSBL verdict. A relay attempt is refused as such,
    without waiting for DNS; a trusted client's lookups were never started.

    The DNSBL verdict is read only when it matters (listing.result() waits
    until the lookups' deadline at most): the facts carry the pending lookup,
    not its result.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from typing import Protocol

from relaymilter.address import AddressSyntaxError, IPAddress, parse_recipient
from relaymilter.dnsbl import ListingResult
from relaymilter.live import Snapshot
from relaymilter.relay import Trust, client_trust, relay_verdict


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


def decide_recipient(facts: RecipientFacts, snapshot: Snapshot) -> Decision:
    """The decision for one recipient."""
    try:
        recipient = parse_recipient(facts.recipient)
    except AddressSyntaxError:
        return bad_recipient_syntax("bad-syntax")
    rules = snapshot.relay_rules
    trust = client_trust(facts.client.address, facts.client.auth_user, rules)
    verdict = relay_verdict(recipient, trust, facts.resolved_recipient, rules)
    if not verdict.allowed:
        return relay_denied(recipient.path, verdict.reason)
    if trust is not Trust.UNTRUSTED or recipient.is_postmaster or facts.listing is None:
        return permit(verdict.reason)
    return decide_listing(facts.listing.result(), verdict.reason)


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
