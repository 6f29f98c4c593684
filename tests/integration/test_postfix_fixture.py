"""The Postfix test instance itself: open relay, XCLIENT, milter wiring, life cycle."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from postfix_instance import free_loopback_port
from smtp_dialog import SmtpDialog

UNTRUSTED = "192.0.2.9"  # TEST-NET-1: only ever claimed through XCLIENT, never contacted

# A milter that refuses every recipient: enough to prove Postfix consults it.
REFUSING_MILTER = """
import sys, Milter
class Refuse(Milter.Base):
    def envrcpt(self, to, *params):
        self.setreply("550", "5.7.1", "refused by test milter")
        return Milter.REJECT
Milter.factory = Refuse
Milter.runmilter("refuse", sys.argv[1], 10, rmsock=True)
"""


@pytest.fixture
def public_directory() -> Iterator[Path]:
    """A directory the postfix user can traverse (pytest's tmp_path is 0700 root)."""
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_without_milter_postfix_relays_for_an_untrusted_client(postfix_factory) -> None:
    postfix = postfix_factory()
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        assert smtp.xclient(addr=UNTRUSTED).code == 220
        assert smtp.mail_from("<sender@remote.test>").code == 250
        assert smtp.rcpt_to("<user@remote.test>").code == 250
        assert smtp.data().code == 250
    # Delivered to the "smtp" transport, which is discard(8): relayed, sent nowhere.
    postfix.wait_for_log(r"to=<user@remote\.test>, relay=none, .*status=sent \(remote\.test\)")


def test_xclient_addr_becomes_the_client_address(postfix_factory) -> None:
    postfix = postfix_factory()
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        smtp.xclient(addr=UNTRUSTED)
        smtp.mail_from("<sender@remote.test>")
        assert smtp.rcpt_to("<user@local.test>").code == 250
    postfix.wait_for_log(r": client=unknown\[192\.0\.2\.9\]$")


def test_rcpt_bytes_reach_postfix_unchanged(postfix_factory) -> None:
    postfix = postfix_factory()
    longest = b"<" + b"a" * (2048 - len(b"RCPT TO:<@local.test>")) + b"@local.test>"
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        smtp.mail_from("<sender@remote.test>")
        assert smtp.rcpt_to(b"<us\xffer@local.test>") == (500, "5.5.2 Error: bad UTF-8 syntax")
        assert smtp.rcpt_to(longest).code == 250  # 2048 bytes: line_length_limit
        assert smtp.rcpt_to(b"<a" + longest[1:]).code == 501
    postfix.wait_for_log(r"request longer than 2048: RCPT TO:<aaa")


@pytest.mark.parametrize("socket_kind", ["inet", "unix"])
def test_unreachable_milter_with_tempfail_refuses_mail_from_with_451(
    postfix_factory, public_directory, socket_kind
) -> None:
    dead = {
        "inet": f"inet:127.0.0.1:{free_loopback_port()}",
        "unix": f"unix:{public_directory}/nothing.sock",
    }[socket_kind]
    postfix = postfix_factory(milter=dead, milter_default_action="tempfail")
    with SmtpDialog(postfix.port) as smtp:
        # Postfix notes the failure at connect but answers 4xx only from MAIL FROM on.
        assert smtp.banner.code == 220
        assert smtp.ehlo().code == 250
        assert smtp.xclient(addr=UNTRUSTED).code == 220
        assert smtp.mail_from("<sender@remote.test>") == (
            451,
            "4.7.1 Service unavailable - try again later",
        )
        assert smtp.rcpt_to("<user@remote.test>").code == 503  # no MAIL transaction
    postfix.wait_for_log(r"milter-reject: MAIL from unknown\[192\.0\.2\.9\]: 451 4\.7\.1")


def test_milter_on_a_unix_socket_outside_any_chroot_is_consulted(
    postfix_factory, public_directory
) -> None:
    socket_path = public_directory / "milter.sock"
    script = public_directory / "refusing_milter.py"
    script.write_text(REFUSING_MILTER)
    milter = subprocess.Popen([sys.executable, str(script), f"unix:{socket_path}"])
    try:
        _wait_for_path(socket_path)
        socket_path.chmod(0o666)  # smtpd connects as the postfix user
        postfix = postfix_factory(milter=f"unix:{socket_path}")
        with SmtpDialog(postfix.port) as smtp:
            smtp.ehlo()
            smtp.xclient(addr=UNTRUSTED)
            smtp.mail_from("<sender@remote.test>")
            assert smtp.rcpt_to("<user@remote.test>") == (550, "5.7.1 refused by test milter")
    finally:
        milter.kill()  # libmilter polls for SIGTERM only every 5 s
        milter.wait(timeout=10)


def test_two_instances_run_side_by_side_and_stop_cleanly(postfix_factory) -> None:
    first, second = postfix_factory(), postfix_factory()
    assert first.port != second.port
    assert first.pids() and set(first.pids()).isdisjoint(second.pids())
    first.stop()
    assert first.pids() == []
    with SmtpDialog(second.port) as smtp:
        assert smtp.banner.code == 220
    assert "daemon started" in first.log_text()  # the log outlives stop()


def test_reload_applies_new_main_cf_settings(postfix_factory) -> None:
    postfix = postfix_factory()
    postfix.reload({"smtpd_banner": "$myhostname ESMTP reloaded"})
    deadline = time.monotonic() + 10
    while True:  # idle smtpd processes of the old generation exit first
        with SmtpDialog(postfix.port) as smtp:
            if "reloaded" in smtp.banner.text:
                break
        assert time.monotonic() < deadline, "banner did not change after reload"
        time.sleep(0.1)


def _wait_for_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)
