"""logline - one Postfix-shaped log line per decision.

NAME
    logline - format and emit decision log lines

DESCRIPTION
    Lines look like Postfix's own smtpd rejects, so that the regular
    expressions admins already have (fail2ban's postfix filter, pflogsumm)
    match them:

      NOQUEUE: reject: RCPT from unknown[192.0.2.9]: 554 5.7.1 <u@remote.example>:
        Relay access denied; from=<s@example.org> to=<u@remote.example>
        helo=<client.example> reason=remote-domain

    (one line). A SASL login adds sasl_username=<alice> (Postfix's name for
    it) before reason=; a hold that refuses adds its reason text after it,
    hold_reason=<...>: the admin's note is for the log, never the reply.
    "would reject" replaces "reject" under dry_run, so that no filter
    written for real rejects fires during a trial. Rejects, defers and
    dry-run lines are logged at INFO, permits at DEBUG. Every field a client
    controls goes through text.printable(), so CR, LF, ESC or U+2028 in a
    queue ID, HELO, address, host name or login never split or colour a
    line: they are written as escapes (\\x0d, \\u2028; see text.py). Only
    the engine calls this.
"""

from __future__ import annotations

import logging

from relaymilter.decision import Action, ClientFacts, Decision
from relaymilter.text import printable

log = logging.getLogger("relaymilter.decision")


def client_label(client: ClientFacts) -> str:
    """Postfix's "name[address]" form."""
    address = client.address if client.address is not None else "unknown"
    return f"{printable(client.name or 'unknown')}[{address}]"


def format_decision(stage: str, decision: Decision, client: ClientFacts,
                    sender: str | None, recipient: str | None, queue_id: str | None) -> str:
    verb = decision.action.value
    if decision.dry_run:
        verb = "would " + verb
    head = f"{printable(queue_id or 'NOQUEUE')}: {verb}: {stage} from {client_label(client)}:"
    reply = decision.reply
    parts = [f"{head} {printable(reply)};" if reply else head]
    if sender is not None:
        parts.append(f"from=<{printable(sender.strip('<>'))}>")
    if recipient is not None:
        parts.append(f"to=<{printable(recipient.strip().strip('<>'))}>")
    parts.append(f"helo=<{printable(client.helo)}>")
    if client.auth_user:
        parts.append(f"sasl_username=<{printable(client.auth_user)}>")
    parts.append(f"reason={decision.reason.word}")
    if decision.hold_reason:
        parts.append(f"hold_reason=<{printable(decision.hold_reason)}>")
    return " ".join(parts)


def log_decision(stage: str, decision: Decision, client: ClientFacts,
                 sender: str | None = None, recipient: str | None = None,
                 queue_id: str | None = None) -> None:
    level = logging.DEBUG if decision.action is Action.PERMIT else logging.INFO
    if log.isEnabledFor(level):
        log.log(level, "%s", format_decision(stage, decision, client, sender, recipient, queue_id))
