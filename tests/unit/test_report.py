"""report: decision lines read back from the log shapes they land in, and added up."""

import datetime

import pytest

from relaymilter.address import parse_ip
from relaymilter.decision import ClientFacts, client_blocked, rate_limited, relay_denied
from relaymilter.logline import format_decision
from relaymilter.reason import Reason
from relaymilter.report import Summary, parse_line, text_lines

TODAY = datetime.date(2026, 12, 4)
LINE = format_decision("RCPT", relay_denied("u@remote.example", Reason.REMOTE_DOMAIN),
                       ClientFacts(parse_ip("192.0.2.9"), "unknown", "x"),
                       "<s@example.org>", "<u@remote.example>", None)


@pytest.mark.parametrize("prefix, day", [
    ("Dec  4 10:00:01 mx relaymilter[812]: ", "2026-12-04"),
    ("Dec 31 23:59:59 mx relaymilter[812]: ", "2025-12-31"),     # no year: not the future
    ("2026-11-30T10:00:01.123456+00:00 mx relaymilter[812]: ", "2026-11-30"),
    ("2026-12-01 10:00:01,123 relaymilter[812]: ", "2026-12-01"),  # relaymilter's stderr
])
def test_a_decision_line_is_read_in_every_log_shape(prefix, day):
    entry = parse_line(prefix + LINE, TODAY)
    assert (entry.day, entry.verdict, entry.client, entry.code, entry.recipient,
            entry.reason) == (day, "reject", "192.0.2.9", 554, "u@remote.example",
                              "remote-domain")


def test_every_field_a_client_controls_is_read_back_whole():
    # A ">" of the client's does not end a field: the next field name does.
    facts = ClientFacts(parse_ip("192.0.2.9"), "evil>name", "helo> reason=permit", "bob> x")
    line = format_decision("RCPT", rate_limited(), facts, "<a>b@x>", "<c@d.example>", "Q1")
    entry = parse_line("Dec  4 10:00:01 mx relaymilter[1]: " + line, TODAY)
    assert (entry.sender, entry.user, entry.reason) == ("a>b@x", "bob> x", "rate-limit")


def test_hold_reasons_and_blocks_are_read():
    line = format_decision("RCPT", client_blocked(parse_ip("192.0.2.77"), "relay probing"),
                           ClientFacts(parse_ip("192.0.2.77")), "<>", "<u@local.test>", None)
    entry = parse_line("Dec  4 10:00:01 mx relaymilter[1]: " + line, TODAY)
    assert (entry.reason, entry.hold_reason) == ("blocked", "relay probing")


def test_other_lines_are_skipped_and_broken_decisions_counted_not_guessed():
    assert parse_line("Dec  4 10:00:01 mx postfix/smtpd[2]: NOQUEUE: reject: RCPT from x[1.2.3.4]: "
                      "554 5.7.1 nope; from=<> to=<a@b> proto=ESMTP helo=<x>", TODAY) is None
    assert parse_line("Dec  4 10:00:01 mx relaymilter[2]: policy store loaded", TODAY) is None
    assert parse_line("Dec  4 10:00:01 mx relaymilter[2]: NOQUEUE: reject: RCPT from cut",
                      TODAY) is False


def test_the_summary_adds_refusals_and_keeps_a_dry_run_apart():
    summary = Summary(TODAY)
    prefix = "Dec  4 10:00:01 mx relaymilter[1]: "
    alice = ClientFacts(parse_ip("198.51.100.7"), "c", "h", "alice")
    for _ in range(3):
        summary.add_line(prefix + LINE)
    summary.add_line(prefix + format_decision("RCPT", rate_limited(), alice, "<a@c.test>",
                                              "<b@far.example>", "Q"))
    would = LINE.replace(": reject: ", ": would reject: ")
    summary.add_line(prefix + would)
    summary.add_line("noise")
    document = summary.document(top=1)
    assert document["lines"] == 5 and document["unreadable"] == 0
    assert document["verdicts"] == {"reject": 3, "defer": 1, "would reject": 1}
    assert document["refusals_by_reason"] == {"remote-domain": 3, "rate-limit": 1}
    assert document["dry_run_by_reason"] == {"remote-domain": 1}
    assert document["top_clients"] == [{"client": "192.0.2.9", "refusals": 3,
                                        "reasons": {"remote-domain": 3}}]
    assert document["top_users"] == [{"user": "alice", "refusals": 1}]
    assert document["days"] == {"2026-12-04": {"reject": 3, "defer": 1, "would reject": 1}}
    text = "\n".join(text_lines(document))
    assert "        3  192.0.2.9  (remote-domain 3)" in text
    assert "Would refuse (dry run), by reason" in text
