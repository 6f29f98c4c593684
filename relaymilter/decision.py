"""decision - the facts the front ends gather, and the Decision they answer.

NAME
    decision - ClientFacts, RecipientFacts, Action, Decision

SYNOPSIS
    facts = RecipientFacts(client=ClientFacts(parse_ip("192.0.2.9"), "unknown"),
                           sender="<a@b.example>", recipient="<u@remote.example>")
    decision = engine.answer_recipient(facts)
    decision.answered            # Action.REJECT (Action.PERMIT under dry run)
    decision.reply               # "554 5.7.1 <u@remote.example>: Relay access denied"
    decision.grants_relay        # False

DESCRIPTION
    The vocabulary shared by the engine (engine.py), the log line
    (logline.py) and the two front ends (milter.py, policyd.py). Facts are
    frozen: a front end builds new ones as the SMTP session goes on. A
    Decision says what to answer and why (reason.Reason); the constructors
    below hold Postfix's reply texts, so that log parsers and fail2ban
    filters written for Postfix match ours.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from relaymilter.address import IPAddress
from relaymilter.reason import Reason
from relaymilter.text import printable
from relaymilter.zones import ListingResult


class Action(enum.Enum):
    PERMIT = "permit"
    REJECT = "reject"   # permanent, 5xx
    DEFER = "defer"     # temporary, 4xx


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer, and why.

    dry_run        the decision is a reject or defer, answered as a permit
    hold_request   (kind, value) the engine asks to put on hold
    block_request  the client address the engine asks to block (a relay prober)
    hold_reason    the reason text of the hold that refused: for the log
                   line (hold_reason=<...>), never for the SMTP reply
    """

    action: Action
    reason: Reason
    code: int | None = None
    dsn: str | None = None
    text: str | None = None
    dry_run: bool = False
    hold_request: tuple[str, str] | None = None
    hold_reason: str | None = None
    block_request: str | None = None

    @property
    def reply(self) -> str:
        """"554 5.7.1 text" for a reject or defer, "" for a permit."""
        if self.code is None:
            return ""
        return f"{self.code} {self.dsn} {self.text}"

    @property
    def answered(self) -> Action:
        """What the MTA is actually told: a permit under dry run."""
        return Action.PERMIT if self.dry_run else self.action

    @property
    def grants_relay(self) -> bool:
        """A real permit that lets the client relay (the policy service's OK)."""
        return self.action is Action.PERMIT and self.reason.grants_relay

    @property
    def action_label(self) -> str:
        """permit, reject, defer; would-reject, would-defer under dry run."""
        return f"would-{self.action.value}" if self.dry_run else self.action.value


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """Who is talking to the MTA. address None = unknown (never trusted)."""

    address: IPAddress | None
    name: str = "unknown"
    helo: str = ""
    auth_user: str | None = None


class PendingVerdict(Protocol):
    """The client's DNSBL lookups, started at connect (dnsbl.PendingListing)."""

    def result(self) -> ListingResult:
        """The verdict, by the lookups' deadline at the latest."""


@dataclass(frozen=True, slots=True)
class RecipientFacts:
    """One RCPT TO, as the MTA reported it.

    recipient           the argument as the client wrote it
    resolved_recipient  the MTA's own resolution ({rcpt_addr}), None if unsaid
    instance            the id of the message (Postfix's policy `instance`, the
                        milter's own), so that a recipient asked again is not
                        counted twice and a message counts once for the limits
    listing             the client's DNSBL lookups; None: none (no zones, trusted)
    """

    client: ClientFacts
    sender: str
    recipient: str
    resolved_recipient: str | None = None
    queue_id: str | None = None
    listing: PendingVerdict | None = None
    instance: str | None = None


# ------------------------------------------------------------ decisions ---

def permit(reason: Reason) -> Decision:
    """The permit for reason: one shared object each (a Decision never changes)."""
    return _PERMITS[reason]


_PERMITS = {reason: Decision(Action.PERMIT, reason) for reason in Reason}


def relay_denied(recipient_path: str, reason: Reason) -> Decision:
    return Decision(Action.REJECT, reason, 554, "5.7.1",
                    f"<{printable(recipient_path)}>: Relay access denied")


PROBING = "relay probing"      # the reason of the automatic block of a relay prober


def client_blocked(client: IPAddress | None, hold_reason: str) -> Decision:
    """A hold of scope "all" refuses every recipient; its reason is named."""
    return Decision(Action.REJECT, Reason.BLOCKED, 554, "5.7.1",
                    f"Client host [{client}] blocked: {printable(hold_reason or 'by policy')}",
                    hold_reason=hold_reason or None)


def bad_recipient_syntax() -> Decision:
    return Decision(Action.REJECT, Reason.BAD_SYNTAX, 501, "5.1.3",
                    "Bad recipient address syntax")


def relaying_suspended(reason: Reason, hold_reason: str | None = None) -> Decision:
    """A hold refuses: the reply is the same for every hold; its reason is logged only."""
    return Decision(Action.REJECT, reason, 550, "5.7.1", "Relaying suspended for this sender",
                    hold_reason=hold_reason or None)


def sender_not_owned(sender: str) -> Decision:
    shown = printable(sender.strip().strip("<>"))
    return Decision(Action.REJECT, Reason.SENDER_NOT_OWNED, 553, "5.7.1",
                    f"<{shown}>: Sender address rejected: not owned by user")


RATE_LIMIT_TEXT = "Sending rate limit exceeded, try again later"


def rate_limited(hold_request: tuple[str, str] | None = None) -> Decision:
    return Decision(Action.DEFER, Reason.RATE_LIMIT, 450, "4.7.1", RATE_LIMIT_TEXT,
                    hold_request=hold_request)


def client_listed(client: IPAddress, zone: str | None, txt: str | None) -> Decision:
    """zone: the display name of the listing zone; txt: its TXT, if any."""
    text = (f"Service unavailable; Client host [{client}] blocked using "
            f"{printable(zone or 'a DNS blocklist')}")
    if txt:
        text += f"; {printable(txt)}"
    return Decision(Action.REJECT, Reason.DNSBL, 554, "5.7.1", text)


def internal_fault(on_error: str) -> Decision:
    """What a fault inside relaymilter answers: never a permanent reject."""
    if on_error == "accept":
        return permit(Reason.INTERNAL_ERROR)
    return Decision(Action.DEFER, Reason.INTERNAL_ERROR, 451, "4.3.0",
                    "Temporary policy failure, try again later")
