"""[milter] session_timeout on a real `relaymilter run`: no peer holds a thread for ever.

libmilter's own timeout bounds each read, so a peer that trickles a byte
now and then is never idle. These tests trickle the first packet on the
real socket (the peer never reaches a callback), and let a real Postfix
session outlive the bound: its next relay attempt must get a 4xx, never
a 250, and the milter must go on serving.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator

import pytest
from milter_client import MilterClient
from relaymilter_process import RelaymilterProcess, _free_port, public_subdirectory
from smtp_dialog import SmtpDialog
from smtp_dialog import rcpt_reply

BOUND = 5           # seconds; the smallest [milter] session_timeout allowed
UNTRUSTED = "192.0.2.9"
CLOSED = r"closed a milter connection from (.*) open for (\d+) s \(\[milter\] session_timeout = 5\)"


@pytest.fixture
def bounded(public_tree, request) -> Iterator[RelaymilterProcess]:
    directory = public_subdirectory(public_tree, request.node.name[:30])
    process = RelaymilterProcess(
        directory, milter={"session_timeout": BOUND}, store={"path": str(directory / "policy.db")},
        relay={"local_domains": ["local.test"], "trusted_networks": ["127.0.0.1/32"]},
        metrics={"listen": f"127.0.0.1:{_free_port()}"})
    process.start()
    try:
        yield process
    finally:
        process.kill()


def sessions_closed(process: RelaymilterProcess) -> float:
    url = f"http://{process.sections['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return float(re.search(r"^relaymilter_milter_sessions_closed_total (\S+)$", text,
                           re.MULTILINE).group(1))


def test_a_peer_trickling_its_first_packet_is_closed_after_the_bound(bounded):
    trickler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    trickler.connect(str(bounded.socket_path))
    started = time.monotonic()
    # An option negotiation packet that announces 1000 bytes and never ends:
    # one byte every half second keeps every one of libmilter's reads short.
    trickle = iter(struct.pack("!I", 1000) + b"O" + b"\0" * 999)
    closed_after = None
    with trickler:
        trickler.settimeout(0.5)
        while closed_after is None and time.monotonic() - started < BOUND + 5:
            try:
                trickler.send(bytes([next(trickle)]))
                if trickler.recv(1) == b"":
                    closed_after = time.monotonic() - started
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
    assert closed_after is not None, "the trickling peer was never closed"
    assert BOUND <= closed_after < BOUND + 3
    peer, age = bounded.wait_for_log(CLOSED).groups()
    assert peer == f"pid {os.getpid()} (uid {os.getuid()})" and int(age) >= BOUND
    assert sessions_closed(bounded) == 1
    # The milter serves on: a new session gets its decision.
    with MilterClient.unix(str(bounded.socket_path)) as mta:
        mta.negotiate()
        mta.connect(b"client.example", UNTRUSTED, macros={"{client_addr}": UNTRUSTED})
        mta.mail(b"<s@example.org>", macros={"{mail_addr}": "s@example.org"})
        letter, text = mta.rcpt(b"<u@remote.example>", macros={"{rcpt_addr}": "u@remote.example"})
        assert letter == "y" and text.startswith(b"554 5.7.1")


def test_sessions_within_the_bound_are_left_alone(bounded):
    with MilterClient.unix(str(bounded.socket_path)) as mta:
        mta.negotiate()
        mta.connect(b"client.example", UNTRUSTED, macros={"{client_addr}": UNTRUSTED})
        for _ in range(3):      # three transactions, 1 s apart: 3 s in all
            time.sleep(1)
            mta.mail(b"<s@example.org>", macros={"{mail_addr}": "s@example.org"})
            letter, _ = mta.rcpt(b"<u@local.test>", macros={"{rcpt_addr}": "u@local.test"})
            assert letter == "c"
            mta.abort()
    assert sessions_closed(bounded) == 0


def test_postfix_session_that_outlives_the_bound_gets_4xx_never_a_relay(bounded,
                                                                       postfix_factory):
    postfix = postfix_factory(**bounded.postfix_kwargs(milter_default_action="tempfail"))
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        assert smtp.xclient(addr=UNTRUSTED).code == 220
        assert smtp.mail_from("<sender@sender.test>").code == 250
        assert smtp.rcpt_to("<user@remote.test>").code == 554
        smtp.rset()
        bounded.wait_for_log(CLOSED, timeout=BOUND + 5)
        replies = [smtp.mail_from("<sender@sender.test>"), smtp.rcpt_to("<user@remote.test>")]
        assert all(reply.code != 250 for reply in replies[1:]), replies
        assert any(400 <= reply.code < 500 for reply in replies), replies
    # A new SMTP session has the milter again.
    assert rcpt_reply(postfix.port, "<user@remote.test>", addr=UNTRUSTED).code == 554
    assert rcpt_reply(postfix.port, "<user@local.test>", addr=UNTRUSTED).code == 250
