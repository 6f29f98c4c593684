"""relaymilter probe against real servers: a private Postfix left open, closed by itself,
closed by relaymilter's milter or policy service alone, deferring everything; no listener;
and hostile servers that trickle or never end a reply.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time

import pytest

from postfix_instance import PostfixInstance, free_loopback_port
from relaymilter_process import RELAYMILTER, RelaymilterProcess, public_subdirectory

CLOSED, OPEN, UNAVAILABLE, TEMPFAIL = 0, 1, 69, 75
CLOSED_BY_POSTFIX = {"smtpd_relay_restrictions": "reject_unauth_destination"}


def probe(*words: str, timeout: float = 120) -> tuple[int, dict]:
    done = subprocess.run([RELAYMILTER, "probe", *words, "--json"], capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode in (CLOSED, OPEN, UNAVAILABLE, TEMPFAIL), done.stderr
    assert "Traceback" not in done.stderr
    return done.returncode, (json.loads(done.stdout) if done.stdout else {})


def verdicts(report: dict) -> dict[str, str]:
    return {form["form"]: form["verdict"] for form in report["forms"]}


def test_an_open_postfix_is_reported_open_with_the_forms_it_took(postfix_factory):
    postfix = postfix_factory()
    status, report = probe(f"127.0.0.1:{postfix.port}")
    assert status == OPEN and report["verdict"] == "open"
    assert report["local_domain"] == "mx.local.test"        # from the greeting
    assert report["control"]["verdict"] == "accepted"
    taken = verdicts(report)
    assert taken["plain"] == "relayed" and taken["percent-hack"] == "relayed"
    assert taken["literal-foreign"] == "relayed"
    assert set(taken.values()) <= {"relayed", "skipped"}      # it takes anything
    text = subprocess.run([RELAYMILTER, "probe", f"127.0.0.1:{postfix.port}"],
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == OPEN
    assert f"OPEN RELAY: {report['counts']['relayed']} of " in text.stdout
    assert "plain, upper-case" in text.stdout
    # Nothing was queued: DATA was never sent.
    queued = [path for name in ("incoming", "active", "deferred", "hold")
              for path in (postfix.queue_directory / name).rglob("*") if path.is_file()]
    assert queued == []
    assert re.search(r"qmgr\[\d+\]: \w+: from=<", postfix.log_text()) is None


def test_postfix_closed_by_its_own_restrictions_is_closed(postfix_factory):
    postfix = postfix_factory(extra_main_cf=CLOSED_BY_POSTFIX)
    status, report = probe(f"127.0.0.1:{postfix.port}", "--source", "127.0.0.2")
    assert "connect from unknown[127.0.0.2]" in postfix.log_text()
    assert status == CLOSED and report["verdict"] == "closed", verdicts(report)
    assert report["control"]["verdict"] == "accepted"
    assert set(verdicts(report).values()) <= {"refused", "skipped"}
    assert len(report["forms"]) >= 30
    plain = next(form for form in report["forms"] if form["form"] == "plain")
    assert plain["code"] == 554 and "Relay access denied" in plain["reply"]


@pytest.mark.parametrize("front_end", ["milter", "policyd"])
def test_postfix_closed_by_relaymilter_alone_is_closed(front_end, public_tree):
    service = RelaymilterProcess(public_subdirectory(public_tree, f"probe-{front_end}"),
                                 front_end=front_end,
                                 relay={"local_domains": ["local.test"],
                                        "trusted_networks": ["198.51.100.0/24"]})
    service.start()
    postfix = PostfixInstance(**service.postfix_kwargs(local_domains=("local.test",)))
    try:
        postfix.start()
        # Postfix itself would relay for anyone: only relaymilter stands in
        # the way. XCLIENT makes us a client relaymilter does not trust.
        status, report = probe(f"127.0.0.1:{postfix.port}", "--local-domain", "local.test",
                               "--as", "192.0.2.50")
        assert report["as_client"] == "192.0.2.50"
        assert status == CLOSED, [(f["form"], f["reply"]) for f in report["forms"]
                                  if f["verdict"] != "refused"]
        assert report["control"]["verdict"] == "accepted"
        # As a trusted client, the same server relays: the probe sees it.
        status, report = probe(f"127.0.0.1:{postfix.port}", "--local-domain", "local.test",
                               "--as", "198.51.100.7")
        assert status == OPEN and verdicts(report)["plain"] == "relayed"
    finally:
        postfix.stop()
        service.kill()


def test_self_probe_uses_the_config_and_xclient(postfix_factory, public_tree):
    service = RelaymilterProcess(public_subdirectory(public_tree, "probe-self"),
                                 front_end="policyd", relay={"local_domains": ["local.test"]})
    service.start()
    postfix = PostfixInstance(**service.postfix_kwargs(local_domains=("local.test",)))
    try:
        postfix.start()
        done = subprocess.run([RELAYMILTER, "probe", "--self", "-c", str(service.config_path),
                               f"127.0.0.1:{postfix.port}"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == CLOSED, done.stdout + done.stderr
        assert "local domain local.test, relay domain example.com" in done.stdout
        assert "seen as client 192.0.2.1" in done.stdout
        assert "closed: " in done.stdout.splitlines()[-1]
    finally:
        postfix.stop()
        service.kill()


@pytest.fixture
def submission(postfix_factory, tmp_path):
    """A Postfix that relays only for SASL users (Cyrus sasldb: alice@local.test,
    password s3cret), and offers AUTH only after STARTTLS."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=mx.local.test", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:mx.local.test", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True, timeout=60)
    tmp_path.chmod(0o755)
    key.chmod(0o644)            # read by smtpd as the postfix user
    postfix = postfix_factory(extra_main_cf={
        "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "cyrus", "smtpd_sasl_path": "smtpd",
        "smtpd_tls_security_level": "may", "smtpd_tls_auth_only": "yes",
        "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key),
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination"})
    # Debian's Postfix reads Cyrus's smtpd.conf from $config_directory/sasl
    # (cyrus_sasl_config_path is not used); smtpd reads it when it starts.
    sasl = postfix.config_directory / "sasl"
    sasl.mkdir()
    sasldb = sasl / "sasldb2"       # under the instance: the postfix user reaches it
    subprocess.run(["saslpasswd2", "-c", "-p", "-f", str(sasldb), "-u", "local.test", "alice"],
                   input=b"s3cret", check=True, timeout=30)
    sasldb.chmod(0o644)
    (sasl / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
        f"sasldb_path: {sasldb}\n")
    postfix.reload()
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    return postfix, cert, password


def test_authenticated_relaying_works_where_unauthenticated_does_not(submission):
    postfix, cert, password = submission
    status, report = probe(f"127.0.0.1:{postfix.port}", "--starttls", "--tls-cafile", str(cert),
                           "--auth", "alice@local.test", "--password-file", str(password))
    assert status == CLOSED and report["tls"] is True, report
    assert report["authenticated"]["verdict"] == "relayed"
    assert report["authenticated"]["code"] == 250


def test_a_refused_login_is_said_and_a_password_never_taken_from_the_command_line(submission,
                                                                                 tmp_path):
    postfix, cert, _ = submission
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    done = subprocess.run([RELAYMILTER, "probe", f"127.0.0.1:{postfix.port}", "--starttls",
                           "--tls-cafile", str(cert), "--auth", "alice@local.test",
                           "--password-file", str(wrong)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 77, done.stdout + done.stderr
    assert "authenticated: relaying NOT allowed" in done.stdout and "535" in done.stdout
    bare = subprocess.run([RELAYMILTER, "probe", f"127.0.0.1:{postfix.port}", "--auth", "alice"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert bare.returncode == 64 and "RELAYMILTER_PROBE_PASSWORD" in bare.stderr


def test_a_certificate_that_does_not_verify_stops_the_probe(submission):
    postfix, _, _ = submission
    status, report = probe(f"127.0.0.1:{postfix.port}", "--starttls")
    assert status == TEMPFAIL and report["forms"] == []
    assert "CERTIFICATE_VERIFY_FAILED" in " ".join(report["notes"])


def test_a_server_deferring_everything_is_not_proven(postfix_factory):
    postfix = postfix_factory(extra_main_cf={"smtpd_relay_restrictions": "defer"})
    status, report = probe(f"127.0.0.1:{postfix.port}")
    assert status == TEMPFAIL and report["verdict"] == "deferred"
    assert set(verdicts(report).values()) <= {"deferred", "skipped"}


def test_no_listener_is_unreachable():
    done = subprocess.run([RELAYMILTER, "probe", f"127.0.0.1:{free_loopback_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == UNAVAILABLE
    assert "cannot connect to 127.0.0.1:" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------- hostile servers ---

class FakeServer:
    """A loopback server that greets, then answers every line with reply(line)."""

    def __init__(self, reply) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply = reply
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopped:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(connection,), daemon=True).start()

    def _session(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.sendall(b"220 fake.local.test ESMTP\r\n")
                stream = connection.makefile("rb")
                for line in stream:
                    for chunk in self.reply(line):
                        if self.stopped:
                            return
                        connection.sendall(chunk)
            except OSError:
                return

    def close(self) -> None:
        self.stopped = True
        self.listener.close()


def endless(line: bytes):
    """A multi-line reply that never ends."""
    while True:
        yield b"250-more\r\n" * 100


def trickle(line: bytes):
    """One byte every 0.2 s: a reply that takes a minute."""
    for byte in b"250 fine, eventually\r\n" * 10:
        time.sleep(0.2)
        yield bytes([byte])


def poison(line: bytes):
    """Terminal escapes and invalid UTF-8 in every reply, and 250 to RCPT."""
    yield b"250 ok \x1b[31mred\xff\xfe\r\n"


@pytest.mark.parametrize("reply", [endless, trickle], ids=["endless", "trickle"])
def test_a_server_that_never_finishes_a_reply_costs_a_bounded_wait(reply):
    server = FakeServer(reply)
    try:
        started = time.monotonic()
        status, report = probe(f"127.0.0.1:{server.port}", "--timeout", "1", timeout=60)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert status in (TEMPFAIL, UNAVAILABLE)
    # A session per reconnect at most, each bounded by the timeout.
    assert elapsed < 30


def test_server_text_is_shown_escaped_never_raw():
    server = FakeServer(poison)
    try:
        done = subprocess.run([RELAYMILTER, "probe", f"127.0.0.1:{server.port}"],
                              capture_output=True, timeout=60)
    finally:
        server.close()
    assert done.returncode == OPEN
    assert b"\x1b" not in done.stdout and b"\xff" not in done.stdout
    assert b"Traceback" not in done.stderr
