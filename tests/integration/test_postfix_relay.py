"""The relay gate end to end: SMTP client -> real Postfix -> real relaymilter.

Postfix's own relay restrictions are open (see postfix_instance), so every
refusal asserted here comes from relaymilter. XCLIENT plays the client:
untrusted (TEST-NET addresses), trusted (a configured network) and
authenticated (LOGIN=). Nothing is delivered: every transport discards.

Each scenario that takes the front_end fixture (conftest) runs twice: with
relaymilter as Postfix's milter, and as its policy service
(check_policy_service), expecting the same SMTP codes. Where the policy
service cannot see what the milter sees, the expectation says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from postfix_instance import PostfixInstance
from relaymilter_process import RelaymilterProcess, public_subdirectory
from smtp_dialog import SmtpDialog
from smtp_dialog import rcpt_reply as one_rcpt

UNTRUSTED = "192.0.2.9"
UNTRUSTED_V6 = "IPV6:2001:db8:99::9"
TRUSTED = "198.51.100.7"
TRUSTED_V6 = "IPV6:2001:db8:1::7"
LOCAL_DOMAINS = ["local.test", ".hosted.test", "bücher.test", "straße.test", "strasse.test"]
POSTFIX_DOMAINS = ("local.test", "bücher.test", "straße.test")
RELAY = {
    "local_domains": LOCAL_DOMAINS,
    "trusted_networks": ["198.51.100.0/24", "2001:db8:1::/48"],
    "local_address_literals": ["192.0.2.10"],
}
RELAY_DENIED = 554


def relaymilter_and_postfix(directory: Path, front_end: str, relay: dict,
                            postfix_domains: tuple[str, ...]
                            ) -> Iterator[tuple[RelaymilterProcess, PostfixInstance]]:
    """A relaymilter with [relay] relay, and a Postfix in front of it."""
    service = RelaymilterProcess(directory, front_end=front_end, relay=relay)
    service.start()
    postfix = PostfixInstance(**service.postfix_kwargs(local_domains=postfix_domains))
    try:
        postfix.start()
        yield service, postfix
    finally:
        postfix.stop()
        service.kill()


@pytest.fixture(scope="module")
def gate(postfix_installed, public_tree,
         front_end) -> Iterator[tuple[RelaymilterProcess, PostfixInstance]]:
    """One relaymilter and one Postfix for the read-only cases of this module."""
    yield from relaymilter_and_postfix(public_subdirectory(public_tree, f"gate-{front_end}"),
                                       front_end, RELAY, POSTFIX_DOMAINS)


def rcpt_reply(port: int, recipient: bytes | str, addr: str | None = UNTRUSTED,
               login: str | None = None, smtputf8: bool = False):
    return one_rcpt(port, recipient, addr=addr, login=login, smtputf8=smtputf8)


# --------------------------------------------------------- untrusted client ---

LOCAL_RECIPIENTS = [
    "<user@local.test>",
    "<USER@Local.Test>",
    "<user@local.test.>",
    "<postmaster>",
    "<postmaster@local.test>",
    '<"john doe"@local.test>',
]


@pytest.mark.parametrize("recipient", LOCAL_RECIPIENTS)
def test_untrusted_client_reaches_local_recipients(gate, recipient):
    # Postfix hands a policy service "john doe@local.test", quotes removed;
    # policyd quotes the local part again.
    service, postfix = gate
    assert rcpt_reply(postfix.port, recipient).code == 250


@pytest.mark.parametrize("recipient", ["<user@bücher.test>", "<user@straße.test>"])
def test_untrusted_client_reaches_local_international_domains(gate, recipient):
    # straße.test: Postfix resolves it to strasse.test (IDNA 2003), which is
    # listed too, so the {rcpt_addr} cross-check agrees.
    service, postfix = gate
    assert rcpt_reply(postfix.port, recipient, smtputf8=True).code == 250


RELAY_ATTEMPTS = [
    ("<user@remote.test>", "remote-domain"),
    ("<USER@Remote.TEST>", "remote-domain"),
    ("<user@remote.test.>", "remote-domain"),
    ("<user@mx.local.test>", "remote-domain"),      # Postfix's $myhostname, not listed here
    ("<user%remote.test@local.test>", "percent-hack"),
    ("<remote.test!user@local.test>", "bang-path"),
    ("<@local.test:user@remote.test>", "source-route"),
    ("<@local.test,@local.test:user@local.test>", "source-route"),
    ('<"user@remote.test"@local.test>', "at-in-local-part"),
    ('<"user%remote.test"@local.test>', "percent-hack"),
    ("<user@[192.0.2.99]>", "foreign-literal"),
    ("<user@[IPv6:2001:db8::99]>", "foreign-literal"),
    ("<postmaster@remote.test>", "remote-domain"),
]
# The policy service gets the recipient in Postfix's internal form, source
# route stripped and quotes removed (policyd quotes a local part again where
# it must): (what it sees, reason), reason None for plain local mail. Same
# verdict but for source routes.
POLICYD_SEES = {
    "<@local.test:user@remote.test>": ("<user@remote.test>", "remote-domain"),
    "<@local.test,@local.test:user@local.test>": ("<user@local.test>", None),
    '<"user%remote.test"@local.test>': ("<user%remote.test@local.test>", "percent-hack"),
}


@pytest.mark.parametrize("recipient, reason", RELAY_ATTEMPTS)
def test_untrusted_relay_attempt_is_refused(gate, recipient, reason):
    service, postfix = gate
    seen = recipient
    if service.front_end == "policyd":
        seen, reason = POLICYD_SEES.get(recipient, (recipient, reason))
    reply = rcpt_reply(postfix.port, recipient)
    if reason is None:          # a source route to a local mailbox: Postfix delivers locally
        assert reply.code == 250, reply
        return
    assert reply.code == RELAY_DENIED, reply
    assert reply.text == service.reply_text(f"5.7.1 <{seen.strip('<>')}>: Relay access denied",
                                            seen)
    service.wait_for_log(rf"NOQUEUE: reject: RCPT from unknown\[{UNTRUSTED}\]: 554 5\.7\.1 .*"
                         rf"to=<{_re(seen)}> .*reason={reason}$")


def test_international_remote_domain_is_refused(gate):
    service, postfix = gate
    assert rcpt_reply(postfix.port, "<user@münchen.test>", smtputf8=True).code == RELAY_DENIED


def test_own_address_literal_is_local(gate):
    service, postfix = gate
    # Postfix sends [192.0.2.10] to smtp: it is not its own address, so
    # {rcpt_addr} shows the literal, which relaymilter knows as its own.
    assert rcpt_reply(postfix.port, "<user@[192.0.2.10]>").code == 250


def test_untrusted_ipv6_client_is_refused_and_trusted_ipv6_client_relays(gate):
    service, postfix = gate
    assert rcpt_reply(postfix.port, "<user@remote.test>", addr=UNTRUSTED_V6).code == RELAY_DENIED
    assert rcpt_reply(postfix.port, "<user@local.test>", addr=UNTRUSTED_V6).code == 250
    assert rcpt_reply(postfix.port, "<user@remote.test>", addr=TRUSTED_V6).code == 250


def test_relay_attempt_leaves_no_mail_in_postfix(gate):
    service, postfix = gate
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        smtp.xclient(addr=UNTRUSTED)
        smtp.mail_from("<sender@sender.test>")
        assert smtp.rcpt_to("<victim@remote.test>").code == RELAY_DENIED
        assert smtp.rcpt_to("<user@local.test>").code == 250
        assert smtp.data().code == 250
    postfix.wait_for_log(r"to=<user@local\.test>.*status=sent")
    assert "victim@remote.test" not in _delivery_lines(postfix)


# ----------------------------------------------- trusted and authenticated ---

@pytest.mark.parametrize("recipient, reason", RELAY_ATTEMPTS[:8])
def test_trusted_network_client_may_relay(gate, recipient, reason):
    service, postfix = gate
    assert rcpt_reply(postfix.port, recipient, addr=TRUSTED).code == 250


@pytest.mark.parametrize("recipient", ["<user@remote.test>", "<user%remote.test@local.test>"])
def test_authenticated_client_may_relay(gate, recipient):
    service, postfix = gate
    assert rcpt_reply(postfix.port, recipient, login="alice").code == 250


def test_authenticated_relay_is_delivered(gate):
    service, postfix = gate
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        smtp.xclient(addr=UNTRUSTED, login="alice")
        smtp.mail_from("<alice@local.test>")
        assert smtp.rcpt_to("<friend@remote.test>").code == 250
        assert smtp.data().code == 250
    postfix.wait_for_log(r"to=<friend@remote\.test>, relay=none, .*status=sent")


def test_second_xclient_in_one_session_drops_authentication(gate):
    service, postfix = gate
    with SmtpDialog(postfix.port) as smtp:
        smtp.ehlo()
        # 127.0.0.5 may send XCLIENT again; it is not trusted by relaymilter.
        assert smtp.xclient(addr="127.0.0.5", login="alice").code == 220
        smtp.mail_from("<sender@sender.test>")
        assert smtp.rcpt_to("<user@remote.test>").code == 250
        smtp.rset()
        assert smtp.xclient(addr=UNTRUSTED, login="[UNAVAILABLE]").code == 220
        smtp.mail_from("<sender@sender.test>")
        assert smtp.rcpt_to("<user@remote.test>").code == RELAY_DENIED


# ------------------------------------------------------------- bad input ---

@pytest.mark.parametrize("recipient", [
    b"<user@local.test",                     # unbalanced
    b"<us\x01er@local.test>",                # control byte
    b"<" + b"a" * 1000 + b"@local.test>",    # 1000-byte local part (Postfix passes it on)
    b"<user@local..test>",
    b"<user@[192.0.2.1>",
])
def test_malformed_recipient_gets_a_clear_5xx(gate, recipient):
    service, postfix = gate
    reply = rcpt_reply(postfix.port, recipient)
    assert 500 <= reply.code < 600, reply
    assert reply.code in (501, RELAY_DENIED)
    assert "Bad recipient address syntax" in reply.text or "Relay access denied" in reply.text
    assert "Traceback" not in service.log_text()


def test_malformed_input_refused_by_postfix_itself_never_reaches_a_250(gate):
    service, postfix = gate
    for recipient in (b"<user@>", b"<us\x00er@local.test>", b"<" + b"a" * 4000 + b"@local.test>"):
        assert 500 <= rcpt_reply(postfix.port, recipient).code < 600


def test_non_utf8_recipient_reaching_relaymilter_is_bad_syntax(postfix_factory, public_tree,
                                                               front_end):
    # With smtputf8_enable = no, Postfix hands raw 8-bit bytes in a local part
    # to the milter (and to the policy service); the 8-bit domain it refuses
    # itself (501 5.1.3, relaymilter not asked).
    service = RelaymilterProcess(public_subdirectory(public_tree, f"non-utf8-{front_end}"),
                                 front_end=front_end, relay=RELAY)
    with service:
        postfix = postfix_factory(**service.postfix_kwargs(
            extra_main_cf={"smtputf8_enable": "no"}))
        for recipient in (b"<us\xffer@local.test>", b"<user@remote\xe9.test>"):
            reply = rcpt_reply(postfix.port, recipient)
            assert reply.code == 501, reply
            assert reply.text.startswith("5.1.3 "), reply
            assert reply.text.endswith(" Bad recipient address syntax"), reply
            if front_end == "milter":
                assert reply.text == "5.1.3 Bad recipient address syntax"
        assert rcpt_reply(postfix.port, "<user@local.test>").code == 250
        service.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[192\.0\.2\.9\]: 501 5\.1\.3 "
                             r"Bad recipient address syntax; .*to=<us\\xffer@local\.test> "
                             r".*reason=bad-syntax$")
    assert "Traceback" not in service.log_text()


# ------------------------------------------------- dry run, reload, crash ---

def test_dry_run_accepts_and_logs_would_reject(postfix_factory, public_tree, front_end):
    service = RelaymilterProcess(public_subdirectory(public_tree, f"dry-{front_end}"),
                                 front_end=front_end, relay=RELAY, decisions={"dry_run": True})
    with service:
        postfix = postfix_factory(**service.postfix_kwargs())
        assert rcpt_reply(postfix.port, "<user@remote.test>").code == 250
        service.wait_for_log(r"NOQUEUE: would reject: RCPT from unknown\[192\.0\.2\.9\]: "
                             r"554 5\.7\.1 <user@remote\.test>: Relay access denied;.*"
                             r"reason=remote-domain$")


def test_local_domains_file_change_takes_effect_without_restart(postfix_factory, public_tree,
                                                                front_end):
    directory = public_subdirectory(public_tree, f"reload-{front_end}")
    domains = directory / "local-domains"
    domains.write_text("local.test\n", encoding="utf-8")
    service = RelaymilterProcess(directory, front_end=front_end,
                                 relay={"local_domains_file": str(domains)})
    with service:
        postfix = postfix_factory(**service.postfix_kwargs())
        assert rcpt_reply(postfix.port, "<user@new.test>").code == RELAY_DENIED
        domains.write_text("local.test\nnew.test\n", encoding="utf-8")
        service.wait_for_log(r"configuration reloaded .*\(2 local domains\)", timeout=10)
        assert rcpt_reply(postfix.port, "<user@new.test>").code == 250
        domains.write_text("local.test\nnot a domain\n", encoding="utf-8")
        service.wait_for_log(r"error: reload failed, keeping the running configuration: "
                             r".*local-domains: line 2", timeout=10)
        assert rcpt_reply(postfix.port, "<user@new.test>").code == 250
        assert service.process.poll() is None


def test_killed_relaymilter_means_4xx_and_no_relay_then_restart_restores(postfix_factory,
                                                                        public_tree, front_end):
    # The milter's loss shows at MAIL FROM (milter_default_action = tempfail:
    # 451 4.7.1); the policy service's at RCPT, after smtpd_policy_service_try_limit
    # attempts (smtpd_policy_service_default_action: 451 4.3.5).
    service = RelaymilterProcess(public_subdirectory(public_tree, f"crash-{front_end}"),
                                 front_end=front_end, relay=RELAY)
    service.start()
    try:
        postfix = postfix_factory(**service.postfix_kwargs(milter_default_action="tempfail"))
        assert rcpt_reply(postfix.port, "<user@remote.test>").code == RELAY_DENIED
        service.kill()
        with SmtpDialog(postfix.port) as smtp:
            smtp.ehlo()
            smtp.xclient(addr=UNTRUSTED)
            replies = [smtp.mail_from("<sender@sender.test>"), smtp.rcpt_to("<user@remote.test>")]
            assert any(400 <= reply.code < 500 for reply in replies), replies
            assert all(reply.code != 250 for reply in replies[1:]), replies
            failed = replies[0] if front_end == "milter" else replies[1]
            assert failed.code == 451, replies
            assert failed.text.startswith("4.7.1" if front_end == "milter" else "4.3.5"), replies
            assert smtp.data().code != 250
        assert "user@remote.test" not in _delivery_lines(postfix)
        service.start()
        assert rcpt_reply(postfix.port, "<user@remote.test>").code == RELAY_DENIED
        assert rcpt_reply(postfix.port, "<user@local.test>").code == 250
    finally:
        service.kill()


def test_sigterm_stops_relaymilter_cleanly(public_tree, front_end):
    service = RelaymilterProcess(public_subdirectory(public_tree, f"term-{front_end}"),
                                 front_end=front_end, relay=RELAY)
    service.start()
    started = time.monotonic()
    assert service.stop() == 0, service.log_text()
    assert time.monotonic() - started < 10
    service.wait_for_log(r"relaymilter stopped")


# --------------------------------------------------------------- helpers ---

def _delivery_lines(postfix: PostfixInstance) -> str:
    return "\n".join(line for line in postfix.log_text().splitlines() if "status=" in line)


def _re(recipient: str) -> str:
    import re
    return re.escape(recipient.strip("<>"))


# ------------------------------------------------------- IDN twins (#12.2) ---

@pytest.fixture(scope="module")
def idna_2008_only(postfix_installed, public_tree, front_end):
    """relaymilter with straße.test local but not its IDNA 2003 twin strasse.test."""
    relay = {**RELAY, "local_domains": ["local.test", "straße.test"]}
    yield from relaymilter_and_postfix(public_subdirectory(public_tree, f"idna-{front_end}"),
                                       front_end, relay, ("local.test",))


@pytest.mark.parametrize("recipient", ["<user@straße.test>", "<user@STRASSE.test>"])
def test_a_local_idn_whose_idna_2003_twin_is_not_local_is_refused(idna_2008_only, recipient):
    # Postfix reads straße.test as strasse.test and would relay there: with
    # the policy service as the only gate, relaymilter's own reading of the
    # twins must refuse it (the milter has {rcpt_addr} too).
    service, postfix = idna_2008_only
    reply = rcpt_reply(postfix.port, recipient, smtputf8=True)
    assert reply.code == RELAY_DENIED, reply
    assert service.wait_for_log("mta-resolves-remote" if "ß" in recipient else "remote-domain")
