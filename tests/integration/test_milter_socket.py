"""The milter socket of a real `relaymilter run`, spoken to packet by packet.

No MTA: milter_client.MilterClient plays the MTA's side, so that a test can
send what Postfix or Sendmail would pass on from a hostile client (bytes
that are not UTF-8, control characters) and sequences an MTA produces only
now and then (ABORT, QUIT_NC and a second client on one milter connection).
Every test reads relaymilter's own log file as an admin would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from logwait import decision_lines_escaped
from milter_client import MilterClient
from relaymilter_process import RelaymilterProcess, public_subdirectory

TRUSTED = "192.0.2.9"
UNTRUSTED = "198.51.100.7"
REMOTE = b"<user@remote.example>"
LOCAL = b"<user@local.test>"
RELAY_DENIED = b"554 5.7.1 <user@remote.example>: Relay access denied"


@pytest.fixture(scope="module")
def milter(tmp_path_factory) -> Iterator[RelaymilterProcess]:
    directory = public_subdirectory(tmp_path_factory.mktemp("milter-socket"), "run")
    process = RelaymilterProcess(
        directory,
        relay={"local_domains": ["local.test"], "trusted_networks": ["127.0.0.0/8", f"{TRUSTED}/32"]},
        store={"path": str(directory / "policy.sqlite3")})
    process.start(debug=True)       # permits are logged at DEBUG
    try:
        yield process
    finally:
        process.kill()


def session(milter: RelaymilterProcess) -> MilterClient:
    mta = MilterClient.unix(str(milter.socket_path))
    mta.negotiate()
    return mta


def connect(mta: MilterClient, address: str, hostname: bytes = b"client.example") -> None:
    mta.connect(hostname, address, macros={"j": "mx.local.test", "{client_addr}": address})


def rcpt(mta: MilterClient, recipient: bytes = REMOTE, queue_id: str = "NOQUEUE"):
    return mta.rcpt(recipient, macros={"i": queue_id, "{rcpt_addr}": recipient.strip(b"<>")})


def refused(reply) -> bool:
    return reply is not None and reply[0] == "y" and reply[1].startswith(b"554 5.7.1")


def decision_lines(milter: RelaymilterProcess, marker: str) -> list[str]:
    """The log lines of the decisions whose queue ID is marker."""
    return [line for line in milter.log_text().split("\n") if f" {marker}: " in line]


# ------------------------------------------------------ stale trust (#6) ---

def test_trust_does_not_carry_over_to_the_next_client_after_abort_and_quit_nc(milter):
    with session(milter) as mta:
        connect(mta, TRUSTED, b"trusted.example")
        mta.helo(b"trusted.example")
        mta.mail(b"<a@local.test>", macros={"{auth_authen}": "alice", "{mail_addr}": "a@local.test"})
        assert rcpt(mta, queue_id="STALE1") == ("c", b"")
        mta.abort()
        mta.quit_nc()
        connect(mta, UNTRUSTED, b"untrusted.example")
        mta.helo(b"untrusted.example")
        mta.mail(b"<a@local.test>")
        assert rcpt(mta, queue_id="STALE2") == ("y", RELAY_DENIED + b"\0")


def test_second_connect_after_abort_without_quit_is_a_new_client(milter):
    with session(milter) as mta:
        connect(mta, TRUSTED)
        mta.mail(b"<a@local.test>")
        assert rcpt(mta) == ("c", b"")
        mta.abort()
        connect(mta, UNTRUSTED)             # Postfix after XCLIENT
        mta.mail(b"<a@local.test>")
        assert refused(rcpt(mta))


def test_sasl_login_does_not_survive_an_aborted_transaction(milter):
    with session(milter) as mta:
        connect(mta, UNTRUSTED)
        mta.helo(b"client.example")
        mta.mail(b"<a@local.test>", macros={"{auth_authen}": "alice", "{mail_addr}": "a@local.test"})
        assert rcpt(mta, queue_id="AUTH1") == ("c", b"")
        mta.abort()
        mta.mail(b"<b@elsewhere.example>")  # the MTA sent no macros for this MAIL
        assert refused(rcpt(mta, queue_id="AUTH2"))
    [line] = decision_lines(milter, "AUTH2")
    assert "reason=remote-domain" in line and "sasl_username" not in line


def test_sasl_login_sent_again_after_an_abort_still_counts(milter):
    with session(milter) as mta:
        connect(mta, UNTRUSTED)
        for _ in range(2):
            mta.mail(b"<a@local.test>",
                     macros={"{auth_authen}": "alice", "{mail_addr}": "a@local.test"})
            assert rcpt(mta) == ("c", b"")
            mta.abort()


# ------------------------------------------- bytes that are not UTF-8 (#5) ---

@pytest.mark.parametrize("address, relays", [(TRUSTED, True), (UNTRUSTED, False)],
                         ids=["trusted", "untrusted"])
def test_host_name_and_helo_that_are_not_utf8_get_a_decision(milter, address, relays):
    marker = f"RAW{address.replace('.', '')}"
    with session(milter) as mta:
        connect(mta, address, b"\xff\xfe.example")
        mta.helo(b"\xff\xfe")
        mta.mail(b"<a@local.test>")
        reply = rcpt(mta, queue_id=marker)
        assert reply == ("c", b"") if relays else refused(reply)
        assert refused(rcpt(mta, REMOTE.replace(b"user", b"u2"), queue_id=marker)) is not relays
    [line, _] = decision_lines(milter, marker)
    assert f"RCPT from \\xff\\xfe.example[{address}]" in line
    assert "helo=<\\xff\\xfe>" in line
    assert "Traceback" not in milter.log_text()


def test_undecodable_connect_after_quit_nc_still_gets_a_decision(milter):
    """After QUIT_NC pymilter makes no RelayMilter when connect cannot be decoded."""
    with session(milter) as mta:
        connect(mta, TRUSTED)
        mta.quit_nc()
        connect(mta, UNTRUSTED, b"\xff")
        mta.helo(b"\xfe")
        mta.mail(b"<a@local.test>")
        assert refused(rcpt(mta, queue_id="RAWQNC"))
        connect(mta, UNTRUSTED, b"ok.example")   # and the session goes on normally
        mta.mail(b"<a@local.test>")
        assert rcpt(mta, LOCAL) == ("c", b"")
    [line] = decision_lines(milter, "RAWQNC")
    # pymilter calls nothing for this connect (its host name is lost); the
    # address comes from {client_addr}.
    assert f"[{UNTRUSTED}]: 554 5.7.1" in line
    assert "Traceback" not in milter.log_text()


def test_helo_that_is_not_utf8_keeps_a_trusted_client_trusted(milter):
    with session(milter) as mta:
        connect(mta, TRUSTED)
        mta.helo(b"caf\xe9")
        mta.mail(b"<a@local.test>")
        assert rcpt(mta, queue_id="RAWHELO") == ("c", b"")
    [line] = decision_lines(milter, "RAWHELO")
    assert "helo=<caf\\xe9>" in line


# --------------------------------------------------------- log injection (#4) ---

HOSTILE = "\r\nNOQUEUE: reject: fake\x1b[2J\u2028\u0085"


def test_control_characters_never_reach_the_log_raw(milter):
    hostile = HOSTILE.encode("utf-8")
    before = milter.log_text().count("\n")
    with session(milter) as mta:
        connect(mta, UNTRUSTED, b"h" + hostile)
        mta.helo(b"helo" + hostile)
        mta.mail(b"<s" + hostile + b"@x.example>",
                 macros={"{auth_authen}": b"u" + hostile, "{mail_addr}": b"s" + hostile + b"@x.example"})
        rcpt(mta, b"<r" + hostile + b"@remote.example>", queue_id="Q" + HOSTILE)
        mta.abort()
        mta.mail(b"<s@x.example>", macros={"{mail_addr}": "s@x.example"})
        rcpt(mta, b"<r" + hostile + b"@remote.example>", queue_id="Q" + HOSTILE)
    time.sleep(0.2)
    new = milter.log_text().split("\n")[before:]
    decisions = decision_lines_escaped(new)
    assert len(decisions) == 2, new
    assert "Q\\x0d\\x0aNOQUEUE: reject: fake\\x1b[2J\\u2028\\x85: " in decisions[0]
    assert "sasl_username=<u\\x0d\\x0aNOQUEUE:" in decisions[0]
    raw = Path(milter.log_path).read_bytes()
    assert b"\xe2\x80\xa8" not in raw and b"\xc2\x85" not in raw and b"\x1b" not in raw
