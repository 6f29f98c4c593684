"""engine - facts about one SMTP transaction + a snapshot -> the answer.

NAME
    engine - the decision engine both front ends (milter, policy service) call

SYNOPSIS
    engine = Engine(runtime)                  # runtime.py: snapshot, counter, metrics
    listing = engine.start_lookups(client)    # at connect; None: nothing to ask
    decision = engine.answer_recipient(RecipientFacts(client, sender, rcpt, ...))
    decision.answered, decision.reply         # Action.REJECT, "554 5.7.1 ..."

DESCRIPTION
    One answer path. A front end turns what the MTA says into frozen facts
    (decision.py), calls one method of Engine, and turns the Decision it
    gets back into its protocol's reply. Everything that follows a decision
    happens here, once, for both front ends: dry run ([decisions] dry_run),
    the automatic hold a limit asks for, the log line (logline.py) and the
    metrics. The front ends make no decision of their own.

    decide_recipient() is the pure part: no pymilter, no sockets, no clock,
    no store. Order at RCPT (docs/guide.md, "Decision order"):

    1. recipient syntax                          501 5.1.3
    1b. an untrusted client blocked (a hold of scope "all": a relay prober)
       -> 554 5.7.1, whatever the recipient.
    2. a recipient in our own domains (the relay verdict for an untrusted
       client, DESIGN section 2) is inbound mail: postmaster -> permit;
       per-domain allowlist or DNSBL opt-out -> permit; DNSBL verdict with
       the domain's threshold, else the global one -> 554 5.7.1 or permit.
       Trusted, authenticated and relay clients skip the DNSBL.
    3. any other recipient is relaying: a hold on the client or user ->
       550 5.7.1; no permission (trusted networks, a relay client entry,
       SMTP AUTH) -> 554 5.7.1 Relay access denied, counted per client
       ([probes]: the refusal that reaches `refusals` within `window`
       asks for the client's block); a relay client's sender
       domains, a SASL user's owned domains -> 554 / 553 5.7.1; the
       outbound limit -> 450 4.7.1.

    A relay attempt is refused as such, without waiting for DNS; a trusted
    client's lookups were never started. An allowlist entry never opens
    relaying: it is read for inbound mail only.

    The DNSBL verdict is read only when it matters (listing.result() waits
    until the lookups' deadline at most): the facts carry the pending lookup,
    not its result.

    Snapshot is everything a decision reads, frozen together: the config,
    the relay rules built from it, the DNSBL checker and the domain policy
    (domainpolicy.py). runtime.py swaps one reference to a new Snapshot on
    every reload; the engine reads that reference once per answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from relaymilter.address import AddressSyntaxError, IPAddress, Recipient, parse_recipient, resolved_domain
from relaymilter.decision import (Action, ClientFacts, Decision, PendingVerdict, RecipientFacts,
                                  bad_recipient_syntax, client_blocked, client_listed,
                                  internal_fault, permit,
                                  rate_limited, relay_denied, relaying_suspended,
                                  sender_not_owned)
from relaymilter.domainpolicy import EMPTY_POLICY, DomainPolicy
from relaymilter.entries import user_key
from relaymilter.limits import Limit
from relaymilter.logline import log_decision
from relaymilter.reason import Reason
from relaymilter.recorder import Recorder
from relaymilter.relay import RelayRules, Trust, client_trust, relay_verdict
from relaymilter.zones import ListingResult, summarise

if TYPE_CHECKING:
    from relaymilter.config import Config
    from relaymilter.limits import LimitCounter


class ListingSource(Protocol):
    """What the engine asks of the DNSBL checker (dnsbl.DnsblChecker)."""

    def start(self, client: IPAddress) -> PendingVerdict: ...


@dataclass(frozen=True)
class Snapshot:
    """Everything a decision reads, frozen together."""

    config: "Config"
    relay_rules: RelayRules
    local_domain_count: int
    dnsbl: ListingSource | None = None       # None: no zones configured
    domain_policy: DomainPolicy = EMPTY_POLICY

    @property
    def rejects_at_connect(self) -> bool:
        """[dnsbl] reject_stage = "connect", with zones to ask."""
        return self.dnsbl is not None and self.config.dnsbl.reject_stage == "connect"


# ---------------------------------------------------------------- decide ---

def decide_recipient(facts: RecipientFacts, snapshot: Snapshot,
                     counter: "LimitCounter | None" = None,
                     probes: "LimitCounter | None" = None) -> Decision:
    """The decision for one recipient, in the order of the module docstring;
    counter counts the outbound limits, probes the refused relay attempts."""
    try:
        recipient = parse_recipient(facts.recipient)
    except AddressSyntaxError:
        return bad_recipient_syntax()
    rules, policy = snapshot.relay_rules, snapshot.domain_policy
    client = facts.client
    local = relay_verdict(recipient, facts.resolved_recipient, rules)
    trust = client_trust(client.address, client.auth_user, rules)
    if trust is Trust.UNTRUSTED:
        block = policy.blocked(client.address)
        if block is not None:
            return client_blocked(client.address, block.reason)
    if local.allowed:
        return _inbound(facts, recipient, trust, local.reason, snapshot)
    # The recipient is not ours: relaying.
    hold = policy.held(client.address, client.auth_user)
    if hold is not None:
        return relaying_suspended(Reason.HOLD_CLIENT if hold.kind == "client"
                                  else Reason.HOLD_USER, hold.reason)
    relay_client = None
    if trust is Trust.UNTRUSTED:
        relay_client = policy.relay_client(client.address)
        if relay_client is None:
            return _probe_counted(relay_denied(recipient.path, local.reason), facts,
                                  snapshot, probes)
        trust = Trust.RELAY_CLIENT
    sender_domain = _sender_domain(facts.sender)
    if trust is Trust.RELAY_CLIENT and relay_client.sender_domains \
            and sender_domain not in relay_client.sender_domains:
        return relay_denied(recipient.path, Reason.RELAY_CLIENT_SENDER)
    if trust is Trust.AUTHENTICATED:
        owned = policy.owned_domains(client.auth_user)
        if owned is not None and sender_domain not in owned:
            return sender_not_owned(facts.sender)
    return _outbound(facts, trust, snapshot, counter)


def _inbound(facts: RecipientFacts, recipient: Recipient, trust: Trust, reason: Reason,
             snapshot: Snapshot) -> Decision:
    """Mail for our own domains: postmaster, allowlists, opt-outs, then DNSBL."""
    if trust is not Trust.UNTRUSTED:
        return permit(trust.reason)      # our own users and networks: no DNSBL
    if recipient.is_postmaster or facts.listing is None:
        return permit(reason)
    policy = snapshot.domain_policy
    domain = policy.domain_dnsbl(recipient.domain)
    if domain is not None and not domain.enabled:
        return permit(Reason.DNSBL_OPT_OUT)
    result = facts.listing.result()
    if domain is not None and domain.threshold is not None:
        result = summarise(result.client, result.answers, domain.threshold)
    # Relay clients and the allowlist only matter for a listed client: most
    # clients are not, and never cost these lookups.
    if result.listed:
        if policy.relay_client(facts.client.address) is not None:
            return permit(Reason.RELAY_CLIENT)
        if policy.allowlisted(facts.client.address, recipient.domain):
            return permit(Reason.ALLOWLISTED)
    return decide_listing(result, reason)


def _outbound(facts: RecipientFacts, trust: Trust, snapshot: Snapshot,
              counter: "LimitCounter | None") -> Decision:
    """Relaying by a trusted sender: the outbound limit of the user or client."""
    client = facts.client
    if trust is Trust.AUTHENTICATED:
        kind, value = "user", client.auth_user
    else:
        kind, value = "client", client.address
    limit = snapshot.domain_policy.limit(kind, value)
    if limit is None or counter is None:
        return permit(trust.reason)
    # One count per user however the login is spelt, as the store's keys.
    charge = counter.charge((kind, user_key(value) if kind == "user" else value), limit,
                            facts.instance, facts.recipient)
    if charge.unavailable:      # shared counters down, [counters] on_error = "tempfail"
        return internal_fault("tempfail")
    hold = (kind, str(value)) if charge.hold_due else None
    if not charge.allowed:
        return rate_limited(hold)
    return Decision(Action.PERMIT, trust.reason, hold_request=hold)


def _probe_counted(decision: Decision, facts: RecipientFacts, snapshot: Snapshot,
                   probes: "LimitCounter | None") -> Decision:
    """A refused relay attempt of an untrusted client, counted ([probes]): the
    one that reaches `refusals` within `window` asks for the client's block."""
    settings = snapshot.config.probes
    address = facts.client.address
    if probes is None or not settings.detect or address is None:
        return decision
    # The same recipient of the same message asked twice (two restriction
    # lists calling the policy service) is one attempt.
    charge = probes.charge(("probe", str(address)), Limit(per_hour=settings.refusals),
                           facts.instance, facts.recipient)
    if charge.hold_due:
        return replace(decision, block_request=str(address))
    return decision


def _sender_domain(sender: str) -> str | None:
    """The normalised domain of MAIL FROM; None for <> or an unreadable one."""
    try:
        domain, _ = resolved_domain(sender)
    except ValueError:
        return None
    return domain


def decide_listing(result: ListingResult, permit_reason: Reason = Reason.NOT_LISTED) -> Decision:
    """The DNSBL half: reject a listed client, else permit with permit_reason."""
    if result.listed:
        return client_listed(result.client, result.reply_zone, result.txt)
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


# ----------------------------------------------------------- answer path ---

class Running(Protocol):
    """What the engine reads of the running process (runtime.Runtime)."""

    snapshot: Snapshot
    counter: "LimitCounter"
    probes: "LimitCounter"
    metrics: Recorder

    def request_hold(self, kind: str, value: str, reason: str) -> None: ...

    def request_block(self, address: str) -> None: ...


class Engine:
    """The one answer path of both front ends; see the module docstring.

    Thread-safe: it keeps no state of its own, and reads the running
    snapshot once per answer.
    """

    def __init__(self, running: Running) -> None:
        self._running = running

    @property
    def snapshot(self) -> Snapshot:
        return self._running.snapshot

    def connection(self) -> None:
        """An MTA connection (the milter's connect) began."""
        self._running.metrics.connection()

    def internal_error(self, callback: str) -> None:
        """A front end caught an exception in callback; it answers with answer_fault()."""
        self._running.metrics.internal_error(callback)

    def start_lookups(self, client: ClientFacts,
                      snapshot: Snapshot | None = None) -> PendingVerdict | None:
        """Start the client's DNSBL lookups now; None when there is nothing to ask."""
        snapshot = snapshot or self._running.snapshot
        if not lookups_needed(client, snapshot):
            return None
        return snapshot.dnsbl.start(client.address)

    def answer_connect(self, client: ClientFacts, listing: PendingVerdict) -> Decision:
        """reject_stage = "connect": the DNSBL verdict for the whole connection."""
        snapshot = self._running.snapshot
        decision = enforce(decide_listing(listing.result()), snapshot.config.decisions.dry_run)
        log_decision("CONNECT", decision, client)
        self._running.metrics.decided("connect", decision, client, None, None)
        return decision

    def answer_recipient(self, facts: RecipientFacts) -> Decision:
        """The decision for one RCPT TO, applied: dry run, holds, log, metrics."""
        running = self._running
        snapshot = running.snapshot
        decision = enforce(decide_recipient(facts, snapshot, running.counter, running.probes),
                           snapshot.config.decisions.dry_run)
        if decision.hold_request is not None and not decision.dry_run:
            kind, value = decision.hold_request
            running.request_hold(kind, value, f"over {snapshot.config.limits.auto_hold_factor}"
                                              " times its outbound limit")
        if decision.block_request is not None and not decision.dry_run:
            running.request_block(decision.block_request)
        return self._applied(decision, facts.client, facts.sender, facts.recipient,
                             facts.queue_id)

    def answer_fault(self, client: ClientFacts, sender: str | None = None,
                     recipient: str | None = None, queue_id: str | None = None) -> Decision:
        """What a recipient is answered after a fault: [decisions] on_error, never a 5xx.

        Only what the front end could still read is named in the log line.
        """
        settings = self._running.snapshot.config.decisions
        decision = enforce(internal_fault(settings.on_error), settings.dry_run)
        return self._applied(decision, client, sender, recipient, queue_id)

    def _applied(self, decision: Decision, client: ClientFacts, sender: str | None,
                 recipient: str | None, queue_id: str | None) -> Decision:
        log_decision("RCPT", decision, client, sender, recipient, queue_id)
        self._running.metrics.decided("rcpt", decision, client, sender, recipient)
        return decision
