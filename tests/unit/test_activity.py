"""activity.Activity and statuspage: the last hour, top lists, filters, escaping, access."""

import pytest

from relaymilter.activity import Activity, Seen
from relaymilter.statuspage import Filters, access_refused, status_html

T0 = 1_800_000_000.0        # the start of a minute


def seen(at, verdict="reject", client="192.0.2.9", user=None, recipient="u@remote.example",
         relayed=False, reason="remote-domain"):
    return Seen(at, "rcpt", verdict, reason, client, user, "s@sender.example", recipient,
                relayed)


def test_counts_per_minute_for_the_last_hour_only():
    activity = Activity(minutes=60)
    activity.record(seen(T0))
    activity.record(seen(T0 + 30, "permit"))
    activity.record(seen(T0 + 65, "defer"))
    assert activity.per_minute(T0 + 65) == [(int(T0), {"reject": 1, "permit": 1}),
                                            (int(T0) + 60, {"defer": 1})]
    activity.record(seen(T0 + 3600, "permit"))      # the first minute leaves the hour
    assert activity.totals(T0 + 3600) == {"defer": 1, "permit": 1}
    assert activity.per_minute(T0 + 7300) == []


def test_top_lists_count_refused_clients_and_outbound_senders():
    activity = Activity()
    for _ in range(3):
        activity.record(seen(T0, client="192.0.2.9"))
    activity.record(seen(T0, "defer", client="192.0.2.10"))
    activity.record(seen(T0, "would-reject", client="192.0.2.11"))     # dry run: not refused
    for _ in range(2):
        activity.record(seen(T0, "permit", client="198.51.100.7", user="alice", relayed=True))
    activity.record(seen(T0, "permit", client="198.51.100.8", relayed=True))
    activity.record(seen(T0, "permit", client="192.0.2.50"))            # inbound: not outbound
    assert activity.top_refused_clients(T0, 10) == [("192.0.2.9", 3), ("192.0.2.10", 1)]
    assert activity.top_senders(T0, 10) == [("alice", 2), ("198.51.100.8", 1)]
    assert activity.top_refused_clients(T0, 1) == [("192.0.2.9", 3)]


def test_the_last_decisions_filter_by_client_user_and_domain_newest_first():
    activity = Activity(recent=3)
    activity.record(seen(T0, client="192.0.2.1"))
    activity.record(seen(T0 + 1, client="192.0.2.2", user="Alice", recipient="x@Cust.Example"))
    activity.record(seen(T0 + 2, client="192.0.2.1"))
    activity.record(seen(T0 + 3, client="192.0.2.3"))           # the oldest falls out
    assert [s.at for s in activity.recent()] == [T0 + 3, T0 + 2, T0 + 1]
    assert [s.at for s in activity.recent(client="192.0.2.1")] == [T0 + 2]
    assert [s.at for s in activity.recent(user="alice")] == [T0 + 1]
    assert [s.at for s in activity.recent(domain="cust.example.")] == [T0 + 1]
    assert [s.at for s in activity.recent(limit=1)] == [T0 + 3]


def test_everything_a_client_wrote_is_escaped_in_the_page():
    hostile = "<script>alert(1)</script>@x"
    document = {"generated": "now", "version": "1", "health": {"status": "ok"},
                "zones": [], "cache": None, "decisions": {"totals": {}, "per_minute": []},
                "holds": [{"kind": "user", "value": hostile, "scope": "relay",
                           "reason": "<b>", "since": None, "expires": None}],
                "top_refused_clients": [], "top_senders": [{"sender": hostile,
                                                            "recipients": 1}]}
    found = {"filters": Filters(client='"><x')._asdict(),
             "decisions": [{"at": "t", "verdict": "reject", "reason": "r", "client": "c",
                            "user": hostile, "sender": hostile, "recipient": hostile}]}
    page = status_html(document, found)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '"><x' not in page and "&quot;&gt;&lt;x" in page


@pytest.mark.parametrize("bound, token, header, query, refused", [
    ("127.0.0.1", "", None, None, False),
    ("::1", "", None, None, False),
    ("192.0.2.5", "", "Bearer x", None, True),         # no token set: loopback only
    ("192.0.2.5", "s3cret", None, None, True),
    ("192.0.2.5", "s3cret", "Bearer s3cret", None, False),
    ("192.0.2.5", "s3cret", None, "s3cret", False),
    ("192.0.2.5", "s3cret", "Bearer wrong", "s3cret", True),   # the header wins
    ("192.0.2.5", "s3cret", "Basic s3cret", None, True),
])
def test_off_loopback_the_status_pages_need_the_token(bound, token, header, query, refused):
    assert (access_refused(bound, token, header, query) is not None) is refused


def test_filters_from_a_query_are_bounded():
    filters = Filters.from_query({"client": ["192.0.2.9 "], "user": ["x" * 999],
                                  "limit": ["99999"], "domain": [""]})
    assert filters == Filters("192.0.2.9", "x" * 255, None, 1000)
    assert Filters.from_query({"limit": ["many"]}).limit == 100


def test_top_never_writes_a_client_s_escape_sequence_to_the_terminal():
    from relaymilter.topcli import top_lines
    document = {"version": "1", "generated": "2026-12-04T10:00:00Z",
                "health": {"status": "ok"}, "zones": [{"name": "BL", "enabled": False}],
                "cache": None, "decisions": {"totals": {"reject": 2}, "per_minute": [
                    {"minute": "2026-12-04T10:00:00Z", "verdicts": {"reject": 2}}]},
                "holds": [], "top_refused_clients": [],
                "top_senders": [{"sender": "evil\x1b[2Jname", "recipients": 3}]}
    screen = "\n".join(top_lines(document))
    assert "\x1b" not in screen and "evil\\x1b[2Jname" in screen
    assert "BL DEAD" in screen and "10:00 UTC" in screen


def test_counts_are_kept_for_the_fleet_only_when_shared_and_drained_once():
    activity = Activity()
    activity.record(seen(T0, client="192.0.2.9"))
    assert activity.drain() == {}                   # not shared: nothing kept twice
    activity.sharing = True
    activity.record(seen(T0, client="192.0.2.9"))
    activity.record(seen(T0 + 61, "permit", client="198.51.100.7", user="alice", relayed=True))
    drained = activity.drain()
    assert drained == {int(T0): {"refused": {"192.0.2.9": 1}},
                       int(T0) + 60: {"senders": {"alice": 1}}}
    assert activity.drain() == {}
