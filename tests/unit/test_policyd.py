"""policyd.py: the policy protocol, request by request (no sockets)."""

from __future__ import annotations

import io

import pytest

from relaymilter.decision import Action, Decision, bad_recipient_syntax, internal_fault, permit
from relaymilter.reason import Reason
from relaymilter.policyd import (MAX_ATTRIBUTES, MAX_LINE, MAX_REQUEST, MalformedRequest,
                                 RequestSplitter, action_for, client_facts)


class Trickle:
    """A stream that hands out a few bytes at a time, as a socket may."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step = data, step

    def __call__(self, size: int) -> bytes:
        chunk, self.data = self.data[:min(size, self.step)], self.data[min(size, self.step):]
        return chunk


class Fed:
    """A RequestSplitter fed from a Trickle, as the connection feeds it what arrives."""

    def __init__(self, source: Trickle) -> None:
        self.source, self.splitter = source, RequestSplitter()


def stream(text: bytes, step: int = 65536) -> Fed:
    return Fed(Trickle(text, step))


def read_request(fed: Fed):
    """The next request; None when the stream ends before one is complete."""
    while True:
        request = fed.splitter.next()
        if request is not None:
            return request
        chunk = fed.source(65536)
        if not chunk:
            return None
        fed.splitter.feed(chunk)


# ------------------------------------------------------------- requests ---

def test_reads_one_request_up_to_the_empty_line():
    source = stream(b"request=smtpd_access_policy\nrecipient=u@x.test\n\nnext=1\n\n")
    assert read_request(source) == {"request": "smtpd_access_policy", "recipient": "u@x.test"}
    assert read_request(source) == {"next": "1"}
    assert read_request(source) is None


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_requests_split_across_reads_are_put_together(step):
    source = stream(b"a=1\nb=2\n\nc=3\n\n", step)
    assert [read_request(source), read_request(source), read_request(source)] == \
        [{"a": "1", "b": "2"}, {"c": "3"}, None]


def test_request_without_end_beyond_the_size_limit_is_malformed():
    with pytest.raises(MalformedRequest, match="request longer"):
        read_request(stream(b"a=" + b"x" * 200 + b"\n" + b"b=1\n" * (MAX_REQUEST // 4)))


def test_requests_in_crlf_lines_are_read():
    source = stream(b"a=1\r\nb=2\r\n\r\nc=3\r\n\r\n")
    assert [read_request(source), read_request(source), read_request(source)] == \
        [{"a": "1", "b": "2"}, {"c": "3"}, None]


@pytest.mark.parametrize("step", [1, 2, 5])
def test_a_crlf_empty_line_split_across_reads_ends_the_request(step):
    source = stream(b"a=1\r\n\r\nb=2\n\n", step)
    assert [read_request(source), read_request(source)] == [{"a": "1"}, {"b": "2"}]


def sized_request(size: int) -> bytes:
    """A request of exactly size bytes, its empty line included."""
    count, rest = divmod(size - 1, 4000)
    lengths = [4000 + rest] + [4000] * (count - 1)
    return b"".join(b"x%05d=" % i + b"a" * (length - 8) + b"\n"
                    for i, length in enumerate(lengths)) + b"\n"


def test_a_request_of_max_request_bytes_is_read():
    raw = sized_request(MAX_REQUEST)
    assert len(raw) == MAX_REQUEST
    assert len(read_request(stream(raw + b"next=1\n\n"))) == MAX_REQUEST // 4000


@pytest.mark.parametrize("step", [65536, 1000, 7])
def test_a_request_one_byte_over_max_request_is_malformed(step):
    raw = sized_request(MAX_REQUEST + 1)
    with pytest.raises(MalformedRequest, match=f"request longer than {MAX_REQUEST} bytes"):
        read_request(stream(raw, step))


def test_a_request_of_nearly_twice_max_request_is_malformed():
    """Once parsed whole: the limit was only checked before a read."""
    raw = sized_request(MAX_REQUEST - 10)[:-1] + b"y=" + b"b" * 6000 + b"\n\n"
    raw = raw + raw[:MAX_REQUEST - 100]
    with pytest.raises(MalformedRequest, match="request longer"):
        read_request(stream(raw))


def test_value_may_hold_equals_signs_and_be_empty():
    assert read_request(stream(b"sender=\nccert=a=b=c\n\n")) == {"sender": "", "ccert": "a=b=c"}


def test_stray_empty_lines_between_requests_are_skipped():
    assert read_request(stream(b"\n\nname=v\n\n")) == {"name": "v"}


def test_request_cut_by_end_of_stream_is_dropped_not_answered():
    assert read_request(stream(b"name=v\nother=w\n")) is None
    assert read_request(stream(b"name=v\nother=w")) is None


def test_line_without_equals_is_malformed():
    with pytest.raises(MalformedRequest, match="not name=value"):
        read_request(stream(b"garbage\n\n"))


@pytest.mark.parametrize("raw", [b"a=1\ngarbage\nb=2\n\n", b"=v\n\n", b"a=1\n=v\n\n",
                                 b"a=1\nb=2\nlast\n\n"])
def test_any_line_without_a_name_and_equals_is_malformed(raw):
    with pytest.raises(MalformedRequest, match="not name=value"):
        read_request(stream(raw))


def test_a_request_reads_as_the_mapping_of_its_lines():
    request = read_request(stream(b"request=smtpd_access_policy\nsender=\nx=a=b\n\n"))
    assert request.get("sender") == "" and request.get("x") == "a=b"
    assert request.get("recipient") is None and request.get("recipient", "") == ""
    assert list(request) == ["request", "sender", "x"] and len(request) == 3
    with pytest.raises(KeyError):
        request["recipient"]


def test_huge_attribute_is_malformed():
    with pytest.raises(MalformedRequest, match="longer than"):
        read_request(stream(b"recipient=" + b"a" * MAX_LINE + b"\n\n"))


def test_too_many_attributes_is_malformed():
    lines = b"".join(b"n%d=v\n" % number for number in range(MAX_ATTRIBUTES + 1))
    with pytest.raises(MalformedRequest, match="attributes"):
        read_request(stream(lines + b"\n"))


def test_non_utf8_bytes_survive_as_surrogate_escapes():
    attributes = read_request(stream(b"recipient=us\xffer@x.test\n\n"))
    assert attributes["recipient"] == "us\udcffer@x.test"


def test_client_facts_from_attributes():
    client = client_facts({"client_address": "::ffff:192.0.2.7", "client_name": "mx.example",
                           "helo_name": "helo.example", "sasl_username": "alice"})
    assert (str(client.address), client.name, client.helo, client.auth_user) == \
        ("192.0.2.7", "mx.example", "helo.example", "alice")


@pytest.mark.parametrize("address", ["unknown", "", "999.1.1.1"])
def test_unknown_client_address_is_no_address(address):
    assert client_facts({"client_address": address}).address is None


def test_empty_sasl_username_is_no_authentication():
    assert client_facts({"sasl_username": ""}).auth_user is None


# -------------------------------------------------------------- answers ---

@pytest.mark.parametrize("decision, action", [
    (permit(Reason.LOCAL_DOMAIN), "DUNNO"),
    (permit(Reason.POSTMASTER), "DUNNO"),
    (permit(Reason.TRUSTED_NETWORK), "OK"),
    (permit(Reason.AUTHENTICATED), "OK"),
    (permit(Reason.RELAY_CLIENT), "OK"),
    (bad_recipient_syntax(), "501 5.1.3 Bad recipient address syntax"),
    (internal_fault("tempfail"), "451 4.3.0 Temporary policy failure, try again later"),
    (internal_fault("accept"), "DUNNO"),
])
def test_decision_becomes_a_postfix_action(decision, action):
    assert action_for(decision) == action


def test_dry_run_reject_is_dunno():
    decision = Decision(Action.REJECT, Reason.REMOTE_DOMAIN, 554, "5.7.1", "x", dry_run=True)
    assert action_for(decision) == "DUNNO"


@pytest.mark.parametrize("internal, path", [
    ("user@local.test", "<user@local.test>"),
    ("john doe@local.test", '<"john doe"@local.test>'),
    ('a"b@local.test', '<"a\\"b"@local.test>'),
    ("user@remote.test@local.test", '<"user@remote.test"@local.test>'),
    ("user%remote.test@local.test", "<user%remote.test@local.test>"),
    ("remote.test!user@local.test", "<remote.test!user@local.test>"),
    ("müller@local.test", "<müller@local.test>"),
    ("postmaster", "<postmaster>"),
    ("", "<>"),
])
def test_postfix_internal_form_becomes_a_path_again(internal, path):
    from relaymilter.policyd import _path
    assert _path(internal) == path


def test_relay_refusal_does_not_name_the_recipient_twice():
    from relaymilter.policyd import _without_recipient
    assert _without_recipient("554 5.7.1 <u@r.test>: Relay access denied") == \
        "554 5.7.1 Relay access denied"
    assert _without_recipient("553 5.7.1 <s@x.test>: Sender address rejected: not owned by user") \
        == "553 5.7.1 <s@x.test>: Sender address rejected: not owned by user"
    assert _without_recipient("DUNNO") == "DUNNO"
