"""report - a summary of relaymilter's decision lines in a mail log, pflogsumm-style.

NAME
    report - parse_line() reads one decision line; Summary adds them up

SYNOPSIS
    summary = Summary()
    for line in stream:
        summary.add_line(line)
    summary.document(top=10)       # JSON-ready: totals, per day, by reason, top lists

DESCRIPTION
    A decision line (logline.py) in whatever the log put before it:

      Dec  4 10:00:01 mx relaymilter[812]: NOQUEUE: reject: RCPT from
        unknown[192.0.2.9]: 554 5.7.1 <u@remote.example>: Relay access
        denied; from=<s@example.org> to=<u@remote.example> helo=<x>
        reason=remote-domain

    (one line). The time stamp is the line's first: a syslog one ("Dec  4
    10:00:01", the year taken as the latest that is not in the future), an
    RFC 3339 one (rsyslog, journalctl -o short-iso) or Python's (relaymilter
    logging to standard error). Lines of other programs, and relaymilter's
    lines that are not decisions, are skipped; a line that names
    relaymilter and a verdict but does not parse is counted as unreadable,
    never guessed at. The fields are read as logline.py writes them, the
    client's ones escaped (no ">" of a client can end a field early: a
    field ends at the "> " that the next field name follows).

    Counted: decisions by verdict (reject, defer, the "would" ones of a dry
    run, permit when --debug logged them) and per day; refusals (rejects
    and defers) by reason, by client address, by SASL user, by recipient
    domain; holds and blocks by their reason; a dry run's would-be
    refusals by reason, apart.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from typing import Any, NamedTuple

from relaymilter.address import shown_domain

_SYSLOG_TIME = re.compile(r"^(?P<month>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<time>\d\d:\d\d:\d\d)")
_ISO_TIME = re.compile(r"^(?P<date>\d{4}-\d\d-\d\d)[T ](?P<time>\d\d:\d\d:\d\d)")
_MONTHS = {name: number for number, name in enumerate(
    "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), start=1)}

_DECISION = re.compile(
    r"relaymilter(?:/[\w-]+)?\[\d+\]: (?:[\w-]+: )?"
    r"(?P<queue>\S+): (?P<verdict>(?:would )?(?:reject|defer|permit)): "
    r"(?P<stage>RCPT|CONNECT) from (?P<name>\S*)\[(?P<client>[^\]\s]*)\]:"
    r"(?: (?P<code>\d{3}) (?P<dsn>\d\.\d{1,3}\.\d{1,3}) (?P<text>.*?);)?"
    r"(?: from=<(?P<sender>.*?)>(?= ))?"
    r"(?: to=<(?P<recipient>.*?)>(?= ))?"
    r" helo=<(?P<helo>.*?)>"
    r"(?: sasl_username=<(?P<user>.*?)>)?"
    r" reason=(?P<reason>[a-z][a-z0-9-]*)"
    r"(?: hold_reason=<(?P<hold>.*)>)?$")
_MENTION = re.compile(r"relaymilter(?:/[\w-]+)?\[\d+\]: .*: (?:would )?(?:reject|defer|permit): ")


class Entry(NamedTuple):
    day: str | None             # "2026-12-04", None when the line has no time stamp
    verdict: str                # reject, defer, permit, would reject, ...
    stage: str                  # RCPT or CONNECT
    client: str                 # the address as logged ("unknown" when there was none)
    code: int | None
    sender: str | None
    recipient: str | None
    user: str | None            # the SASL login
    reason: str                 # reason= word
    hold_reason: str | None


def _day(line: str, today: datetime.date) -> str | None:
    match = _ISO_TIME.match(line)
    if match:
        return match.group("date")
    match = _SYSLOG_TIME.match(line)
    if match and match.group("month") in _MONTHS:
        month, day = _MONTHS[match.group("month")], int(match.group("day"))
        year = today.year if (month, day) <= (today.month, today.day) else today.year - 1
        try:
            return datetime.date(year, month, day).isoformat()
        except ValueError:          # Feb 29 of a year without one
            return None
    return None


def parse_line(line: str, today: datetime.date | None = None) -> Entry | None | bool:
    """The decision of a log line; None for a line that is not one; False for
    a relaymilter decision line that does not parse."""
    match = _DECISION.search(line.rstrip("\r\n"))
    if match is None:
        return False if _MENTION.search(line) else None
    fields = match.groupdict()
    return Entry(_day(line, today or datetime.date.today()), fields["verdict"], fields["stage"],
                 fields["client"] or "unknown", int(fields["code"]) if fields["code"] else None,
                 fields["sender"], fields["recipient"], fields["user"], fields["reason"],
                 fields["hold"])


class Summary:
    """Decisions added up; see the module docstring."""

    def __init__(self, today: datetime.date | None = None) -> None:
        self.today = today or datetime.date.today()
        self.lines = 0
        self.unreadable = 0
        self.verdicts: Counter = Counter()
        self.days: dict[str, Counter] = {}
        self.reasons: Counter = Counter()
        self.would: Counter = Counter()
        self.clients: Counter = Counter()
        self.client_reasons: dict[str, Counter] = {}
        self.users: Counter = Counter()
        self.domains: Counter = Counter()
        self.holds: Counter = Counter()
        self.first: str | None = None
        self.last: str | None = None

    def add_line(self, line: str) -> None:
        entry = parse_line(line, self.today)
        if entry is None:
            return
        self.lines += 1
        if entry is False:
            self.unreadable += 1
            return
        self.add(entry)

    def add(self, entry: Entry) -> None:
        self.verdicts[entry.verdict] += 1
        if entry.day is not None:
            self.days.setdefault(entry.day, Counter())[entry.verdict] += 1
            self.first = min(self.first or entry.day, entry.day)
            self.last = max(self.last or entry.day, entry.day)
        if entry.verdict.endswith("permit"):
            return
        if entry.verdict.startswith("would"):       # a dry run's: not a refusal
            self.would[entry.reason] += 1
            return
        self.reasons[entry.reason] += 1
        self.clients[entry.client] += 1
        self.client_reasons.setdefault(entry.client, Counter())[entry.reason] += 1
        if entry.user:
            self.users[entry.user] += 1
        domain = shown_domain(entry.recipient)
        if domain:
            self.domains[domain] += 1
        if entry.hold_reason:
            self.holds[(entry.reason, entry.hold_reason)] += 1

    def document(self, top: int = 10) -> dict[str, Any]:
        """Everything, JSON-ready; top lists of at most top entries."""
        return {
            "lines": self.lines, "unreadable": self.unreadable,
            "first_day": self.first, "last_day": self.last,
            "verdicts": dict(self.verdicts.most_common()),
            "days": {day: dict(counts) for day, counts in sorted(self.days.items())},
            "refusals_by_reason": dict(self.reasons.most_common()),
            "dry_run_by_reason": dict(self.would.most_common()),
            "top_clients": [{"client": client, "refusals": count,
                             "reasons": dict(self.client_reasons[client].most_common())}
                            for client, count in self.clients.most_common(top)],
            "top_users": [{"user": user, "refusals": count}
                          for user, count in self.users.most_common(top)],
            "top_recipient_domains": [{"domain": domain, "refusals": count}
                                      for domain, count in self.domains.most_common(top)],
            "holds": [{"reason": reason, "hold_reason": text, "refusals": count}
                      for (reason, text), count in self.holds.most_common(top)],
        }


VERDICT_ORDER = ("reject", "defer", "would reject", "would defer", "permit", "would permit")


def text_lines(document: dict[str, Any]) -> list[str]:
    """The document as a report for a terminal or a mail."""
    lines = ["relaymilter report"
             + (f", {document['first_day']} to {document['last_day']}"
                if document["first_day"] else ""), ""]
    verdicts = document["verdicts"]
    if not verdicts:
        lines.append("no relaymilter decisions found")
    lines += ["Decisions", "---------"] + [
        f"{verdicts[verdict]:>9}  {verdict}" for verdict in VERDICT_ORDER if verdict in verdicts]
    if document["unreadable"]:
        lines.append(f"{document['unreadable']:>9}  unreadable decision lines (not counted)")
    if document["days"]:
        columns = [verdict for verdict in VERDICT_ORDER if verdict in verdicts]
        lines += ["", "Per day", "-------",
                  "day         " + "".join(f"{column:>14}" for column in columns)]
        for day, counts in document["days"].items():
            lines.append(f"{day}  " + "".join(f"{counts.get(column, 0):>14}"
                                              for column in columns))

    def section(title: str, rows: list[tuple[int, str]]) -> None:
        if rows:
            lines.extend(["", title, "-" * len(title)]
                         + [f"{count:>9}  {label}" for count, label in rows])
    section("Refusals by reason", [(count, reason)
                                   for reason, count in document["refusals_by_reason"].items()])
    section("Would refuse (dry run), by reason", [
        (count, reason) for reason, count in document["dry_run_by_reason"].items()])
    section("Top refused clients", [
        (row["refusals"], f"{row['client']}  ("
         + ", ".join(f"{reason} {count}" for reason, count in row["reasons"].items()) + ")")
        for row in document["top_clients"]])
    section("Top refused SASL users", [(row["refusals"], row["user"])
                                       for row in document["top_users"]])
    section("Top recipient domains of refusals", [(row["refusals"], row["domain"])
                                                  for row in document["top_recipient_domains"]])
    section("Holds and blocks that refused", [
        (row["refusals"], f"{row['reason']}: {row['hold_reason']}")
        for row in document["holds"]])
    return lines
