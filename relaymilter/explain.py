"""explain - the answer relaymilter would give now, and every check behind it.

NAME
    explain - `relaymilter explain` (postmap -q for the whole policy) and
    the exemptions `relaymilter lookup` names

SYNOPSIS
    report = explain(config, Question(client="192.0.2.9", recipients=["<u@x.example>"]))
    print("\\n".join(report_lines(report)))          # or json.dumps(report)
    exit_status(report)                              # 0 accepted, 2 refused, 3 deferred

DESCRIPTION
    Builds what the daemons build (reload.build_snapshot: the config and
    its domains file; the domain policy read from [store]; the DNSBL
    checker asking the configured name servers now) and asks the engine's
    pure decide_recipient() for each recipient, as one SMTP transaction
    from the given client would. Around the decision it reports the checks
    the engine made, so that an admin sees why: the client's trust, a hold
    (with its reason), a relay-client entry, the owned sender domains of
    the SASL user, each zone's answer and weight, and per recipient whether
    it is ours and why, the domain's DNSBL setting, the allowlist, and the
    outbound limit.

    What it cannot see: the running daemon's rate counters (limits are
    counted in that process), so the recipients of the question are
    counted from zero, as if the sender had sent nothing else this hour;
    and the MTA's own resolution ({rcpt_addr}), which it does not ask for.

    Nothing is written: a store that does not exist is reported as
    missing, not created.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from typing import Any

from relaymilter.address import AddressSyntaxError, IPAddress, mta_readings, parse_ip, parse_recipient
from relaymilter.config import Config
from relaymilter.decision import Action, ClientFacts, Decision, RecipientFacts
from relaymilter.dnsbl import report_lines as zone_lines
from relaymilter.domainpolicy import EMPTY_POLICY, DomainPolicy
from relaymilter.engine import decide_recipient, enforce, lookups_needed
from relaymilter.exitcodes import EX_DEFERRED, EX_OK, EX_REFUSED
from relaymilter.limits import RATE_NAMES, Limit, LimitCounter
from relaymilter.openstore import open_store
from relaymilter.relay import Trust, client_trust, relay_verdict
from relaymilter.reload import build_snapshot
from relaymilter.store import Storage, StoreError
from relaymilter.storelocation import is_url

VERDICTS = {Action.PERMIT: "accepted", Action.REJECT: "refused", Action.DEFER: "deferred"}


@dataclass(frozen=True)
class Question:
    """One SMTP transaction to explain, as the CLI options give it."""

    client: str
    recipients: list[str]
    helo: str = ""
    sender: str = "<>"
    sasl_user: str | None = None
    client_name: str = "unknown"


@dataclass
class _Store:
    """The domain policy as the daemons would read it, and what to say about it."""

    policy: DomainPolicy = EMPTY_POLICY
    storage: Storage | None = None
    note: str = "no [store] path: no domain policy"
    exempting: list[str] = field(default_factory=list)


def open_domain_policy(config: Config) -> _Store:
    """Read the store named by [store] path or url without creating it."""
    location, shown = config.store.location, config.store.shown
    if location is None:
        return _Store()
    if not is_url(location) and not os.path.exists(location):
        return _Store(note=f"{shown} does not exist: no domain policy")
    try:
        storage = open_store(location, create=False)
        return _Store(storage.load_policy(), storage, shown)
    except (StoreError, OSError) as error:
        return _Store(note=f"{shown} cannot be read ({error}): no domain policy")


def exemptions(storage: Storage | None, address: IPAddress) -> list[str]:
    """Allowlist and relay-client entries that exempt address from a listing."""
    if storage is None:
        return []
    found = []
    for entry in storage.list_allowlist():
        if address in ipaddress.ip_network(entry["network"]):
            scope = f"for {entry['domain']}" if entry["domain"] else "for every domain"
            found.append(f"allowlist {entry['network']} {scope}")
    for entry in storage.list_relay_clients():
        if address in ipaddress.ip_network(entry["network"]):
            found.append(f"relay-client {entry['network']}")
    return found


def explain(config: Config, question: Question) -> dict[str, Any]:
    """The report: see the module docstring. ValueError for a bad client address."""
    address = parse_ip(question.client)
    snapshot = build_snapshot(config)
    store = open_domain_policy(config)
    try:
        snapshot = replace(snapshot, domain_policy=store.policy)
        policy, rules = store.policy, snapshot.relay_rules
        client = ClientFacts(address, question.client_name, question.helo,
                             question.sasl_user or None)
        trust = client_trust(address, client.auth_user, rules)
        hold = policy.held(address, client.auth_user)
        relay_client = policy.relay_client(address)
        listing = snapshot.dnsbl.start(address) if lookups_needed(client, snapshot) else None
        counter = LimitCounter(hour=config.limits.window)
        report: dict[str, Any] = {
            "client": {
                "address": str(address), "helo": question.helo, "sasl_user": client.auth_user,
                "trust": trust.value,
                "hold": None if hold is None else {"kind": hold.kind, "value": hold.value,
                                                   "reason": hold.reason},
                "relay_client": None if relay_client is None else {
                    "network": relay_client.network,
                    "sender_domains": sorted(relay_client.sender_domains)},
                "owned_domains": _sorted(policy.owned_domains(client.auth_user)),
            },
            "sender": question.sender,
            "store": store.note,
            "dry_run": config.decisions.dry_run,
            "dnsbl": _dnsbl(listing, snapshot, store, address),
            "recipients": [_recipient(config, snapshot, client, trust, question.sender, text,
                                      listing, counter) for text in question.recipients],
        }
    finally:
        if snapshot.dnsbl is not None:
            snapshot.dnsbl.close()
        if store.storage is not None:
            store.storage.close()
    actions = {entry["decision"]["action"] for entry in report["recipients"]}
    report["verdict"] = ("refused" if "reject" in actions else
                         "deferred" if "defer" in actions else "accepted")
    return report


def _sorted(names: frozenset[str] | None) -> list[str] | None:
    return None if names is None else sorted(names)


def _dnsbl(listing, snapshot, store: _Store, address: IPAddress) -> dict[str, Any] | None:
    if snapshot.dnsbl is None:
        return {"asked": False, "why": "no zones configured"}
    if listing is None:
        return {"asked": False, "why": "trusted network: never looked up"}
    result = listing.result()
    return {"asked": True, "listed": result.listed, "score": result.score,
            "threshold": result.threshold, "reply_zone": result.reply_zone, "txt": result.txt,
            "zones": [{"zone": answer.zone.display_name, "weight": answer.zone.weight,
                       "status": answer.status.value, "answer": list(answer.addresses),
                       "ttl": answer.ttl, "txt": answer.txt} for answer in result.answers],
            "lines": zone_lines(result),
            "exempting_entries": exemptions(store.storage, address) if result.listed else []}


def _recipient(config: Config, snapshot, client: ClientFacts, trust: Trust, sender: str,
               text: str, listing, counter: LimitCounter) -> dict[str, Any]:
    facts = RecipientFacts(client=client, sender=sender, recipient=text, listing=listing)
    decision = enforce(decide_recipient(facts, snapshot, counter), config.decisions.dry_run)
    entry: dict[str, Any] = {"recipient": text, "decision": _decision(decision)}
    try:
        recipient = parse_recipient(text)
    except AddressSyntaxError as error:
        entry["syntax_error"] = str(error)
        return entry
    verdict = relay_verdict(recipient, None, snapshot.relay_rules)
    entry["ours"] = verdict.allowed
    entry["why"] = verdict.reason.word
    entry["domain"] = recipient.domain
    entry["other_readings"] = list(mta_readings(recipient.domain)) if recipient.domain else []
    policy = snapshot.domain_policy
    setting = policy.domain_dnsbl(recipient.domain)
    entry["domain_dnsbl"] = None if setting is None else {"enabled": setting.enabled,
                                                          "threshold": setting.threshold}
    entry["allowlisted"] = policy.allowlisted(client.address, recipient.domain)
    if not verdict.allowed and trust is not Trust.UNTRUSTED:
        kind, value = (("user", client.auth_user) if trust is Trust.AUTHENTICATED
                       else ("client", client.address))
        limit = policy.limit(kind, value)
        entry["limit"] = None if limit is None else {"kind": kind, "value": str(value),
                                                     **limit._asdict()}
    return entry


def _decision(decision: Decision) -> dict[str, Any]:
    return {"action": decision.action.value, "verdict": VERDICTS[decision.action],
            "reason": decision.reason.word, "reply": decision.reply,
            "dry_run": decision.dry_run}


def exit_status(report: dict[str, Any]) -> int:
    """0 every recipient accepted, 2 one refused (5xx), else 3 one deferred (4xx)."""
    return {"accepted": EX_OK, "refused": EX_REFUSED, "deferred": EX_DEFERRED}[report["verdict"]]


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as text for a terminal."""
    client = report["client"]
    who = f"SASL user {client['sasl_user']}" if client["sasl_user"] else "no SASL user"
    lines = [f"client {client['address']} (helo {client['helo'] or '-'}, {who}): "
             f"{client['trust']}",
             f"  domain policy: {report['store']}"]
    hold = client["hold"]
    lines.append("  hold: none" if hold is None else
                 f"  hold: {hold['kind']} {hold['value']}: {hold['reason'] or '(no reason)'}")
    relay = client["relay_client"]
    if relay is not None:
        domains = ", ".join(relay["sender_domains"]) or "any sender"
        lines.append(f"  relay client: {relay['network']} ({domains})")
    if client["owned_domains"] is not None:
        lines.append(f"  sender domains owned: {', '.join(client['owned_domains'])}")
    dnsbl = report["dnsbl"]
    if not dnsbl["asked"]:
        lines.append(f"dnsbl: not asked ({dnsbl['why']})")
    else:
        lines.append("dnsbl: " + dnsbl["lines"][0].split(": ", 1)[1])
        lines += ["  " + line for line in dnsbl["lines"][1:]]
        lines += [f"  exempted by {entry}" for entry in dnsbl["exempting_entries"]]
    for entry in report["recipients"]:
        decision = entry["decision"]
        head = f"{entry['recipient']}: {decision['verdict'].upper()}"
        if decision["reply"]:
            head += f" {decision['reply']}"
        head += f" (reason {decision['reason']})"
        if decision["dry_run"]:
            head += " [dry run: answered as accepted]"
        lines.append(head)
        if "syntax_error" in entry:
            lines.append(f"  not an address: {entry['syntax_error']}")
            continue
        lines.append(f"  ours: {'yes' if entry['ours'] else 'no'} ({entry['why']})")
        if entry["other_readings"]:
            lines.append(f"  an MTA may read the domain as: {', '.join(entry['other_readings'])}")
        setting = entry["domain_dnsbl"]
        if setting is not None:
            threshold = setting["threshold"] if setting["threshold"] is not None else "global"
            lines.append(f"  domain {entry['domain']}: dnsbl {'on' if setting['enabled'] else 'off'}"
                         f", threshold {threshold}")
        if entry["allowlisted"]:
            lines.append("  allowlisted for this domain")
        if entry.get("limit"):
            limit = entry["limit"]
            rates = Limit(*(limit[name] for name in RATE_NAMES)).describe()
            lines.append(f"  outbound limit: {rates} for {limit['kind']} {limit['value']} "
                         "(counted here from zero; the running daemon keeps its own count)")
    lines.append(f"verdict: {report['verdict']}")
    return lines
