"""Relay, DNSBL and per-domain policy end to end through a real Sendmail.

SMTP client -> private Sendmail (an open relay: see sendmail_instance) ->
relaymilter over TCP -> rbldnsd and the policy store. Sendmail has no
XCLIENT, so clients are real loopback source addresses: 127.0.0.1 is the
only trusted address besides 127.0.9.0/24 (relaymilter's default trusts all
of 127.0.0.0/8), and the DNSBL lists 127.0.0.x addresses other than the
RFC 5782 test points 127.0.0.1 and 127.0.0.2. Every refusal asserted here
comes from relaymilter; nothing is delivered (Sendmail only queues).
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
from typing import Callable, Iterator

import pytest

from rbldnsd import Rbldnsd, RbldnsdZone
from relaymilter_process import RELAYMILTER, RelaymilterProcess, public_subdirectory
from sendmail_instance import SendmailInstance
from smtp_dialog import Reply, SmtpDialog

TRUSTED = "127.0.0.1"           # trusted_networks: 127.0.0.1/32 and TRUSTED_NET
TRUSTED_NET = "127.0.9.0/24"
HELD_NET = "127.0.9.0/28"       # a hold inside the trusted network
HELD_CLIENT = "127.0.9.7"
TRUSTED_LISTED = "127.0.9.77"   # trusted, and listed on BL all the same
UNTRUSTED = "127.0.0.5"
LISTED = "127.0.0.20"           # on BL, with a TXT record
ALLOWED = "127.0.0.30"          # on BL and on the allowlist WL
CLEAN = "127.0.0.99"
LOCAL_DOMAINS = ["local.test", "other.test"]
RELAY = {"local_domains": LOCAL_DOMAINS, "trusted_networks": [f"{TRUSTED}/32", TRUSTED_NET]}
RELAY_DENIED = 554
USERS = {"alice": "alice-secret", "mallory": "mallory-secret"}   # Sendmail's sasldb
PICKUP = 2.0                    # a store change is in force within 2 s

ZONES = [
    RbldnsdZone("bl.test", "ip4set", [":127.0.0.2:Listed for spam, see http://bl.test/$",
                                      "127.0.0.2", LISTED, ALLOWED, TRUSTED_LISTED]),
    RbldnsdZone("wl.test", "ip4set", [":127.0.10.2:", "127.0.0.2", ALLOWED]),
]
ZONE_CONFIG = [{"name": "bl.test", "display_name": "BL", "weight": 2},
               {"name": "wl.test", "display_name": "WL", "weight": -2}]


class ClientDialog(SmtpDialog):
    """SmtpDialog from a chosen loopback source address (Sendmail has no XCLIENT)."""

    def __init__(self, port: int, client: str, timeout: float = 30.0) -> None:
        self.smtp = smtplib.SMTP(timeout=timeout, source_address=(client, 0))
        code, text = self.smtp.connect("127.0.0.1", port)
        self.banner = Reply(code, text.decode("utf-8", "replace"))
        self.helo_name = "client.test"


    def login(self, user: str, password: str) -> Reply:
        """SMTP AUTH (PLAIN) with Sendmail's own SASL; a refusal is a Reply too."""
        try:
            code, text = self.smtp.login(user, password)
        except smtplib.SMTPAuthenticationError as refused:
            code, text = refused.smtp_code, refused.smtp_error
        return Reply(code, text.decode("utf-8", "replace"))


def rcpt_reply(port: int, recipient: bytes | str, client: str = UNTRUSTED,
               sender: str = "<sender@sender.test>", login: str | None = None,
               password: str = "") -> Reply:
    """One session from `client`: EHLO, [AUTH], MAIL FROM, one RCPT TO."""
    with ClientDialog(port, client) as smtp:
        smtp.ehlo()
        if login:
            reply = smtp.login(login, password or USERS.get(login, ""))
            if reply.code != 235:
                raise AssertionError(f"AUTH refused: {reply}")
        reply = smtp.mail_from(sender)
        if reply.code != 250:
            return reply
        return smtp.rcpt_to(recipient)


@pytest.fixture(scope="module")
def rbldnsd(rbldnsd_installed) -> Iterator[Rbldnsd]:
    server = Rbldnsd(ZONES, ttl=300)
    server.start()
    yield server
    server.stop()


class Site:
    """One relaymilter (relay rules, DNSBL, store) behind one Sendmail."""

    def __init__(self, milter: RelaymilterProcess, sendmail: SendmailInstance) -> None:
        self.milter, self.sendmail = milter, sendmail

    @property
    def port(self) -> int:
        return self.sendmail.port

    def cli(self, *words: str) -> str:
        done = subprocess.run([RELAYMILTER, *words, "-c", str(self.milter.config_path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (words, done.stdout, done.stderr)
        return done.stdout

    def becomes(self, expected: int, probe: Callable[[], int]) -> float:
        """Seconds until probe() answers expected; fails after PICKUP + margin."""
        started = time.monotonic()
        while True:
            code = probe()
            elapsed = time.monotonic() - started
            if code == expected:
                return elapsed
            assert elapsed < PICKUP + 1.0, f"still {code}, not {expected}, after {elapsed:.1f}s"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def site(sendmail_installed, rbldnsd, public_tree) -> Iterator[Site]:
    directory = public_subdirectory(public_tree, "sendmail-site")
    milter = RelaymilterProcess(
        directory, transport="inet", relay=RELAY,
        dnsbl={"nameservers": [rbldnsd.nameserver], "threshold": 2, "zone": ZONE_CONFIG},
        store={"path": str(directory / "policy.sqlite3")})
    milter.start()
    sendmail = SendmailInstance(milter.socket, local_domains=tuple(LOCAL_DOMAINS),
                                auth_users=USERS)
    try:
        sendmail.start()
        yield Site(milter, sendmail)
    finally:
        sendmail.stop()
        milter.kill()


# ------------------------------------------------------------------ relay ---

LOCAL_RECIPIENTS = [
    "<user@local.test>",
    "<USER@Local.Test>",
    "<user@local.test.>",
    "<postmaster>",
    "<postmaster@local.test>",
    '<"john doe"@local.test>',
]


@pytest.mark.parametrize("recipient", LOCAL_RECIPIENTS)
def test_untrusted_client_reaches_local_recipients(site, recipient):
    # Sendmail's {rcpt_addr} for these is "user" / "postmaster": no domain,
    # which the cross-check must read as "the MTA says nothing".
    assert rcpt_reply(site.port, recipient).code == 250


RELAY_ATTEMPTS = [
    ("<user@remote.test>", "remote-domain"),
    ("<USER@Remote.TEST>", "remote-domain"),
    ("<user@remote.test.>", "remote-domain"),
    ("<user%remote.test@local.test>", "percent-hack"),
    ("<remote.test!user@local.test>", "bang-path"),
    ("<@local.test:user@remote.test>", "source-route"),
    ('<"user@remote.test"@local.test>', "at-in-local-part"),
    ('<"user%remote.test"@local.test>', "percent-hack"),
    ("<user@[192.0.2.99]>", "foreign-literal"),
    ("<postmaster@remote.test>", "remote-domain"),
]


@pytest.mark.parametrize("recipient, reason", RELAY_ATTEMPTS)
def test_untrusted_relay_attempt_is_refused_by_the_milter(site, recipient, reason):
    reply = rcpt_reply(site.port, recipient)
    assert reply.code == RELAY_DENIED, reply
    assert reply.text == f"5.7.1 {recipient}: Relay access denied"
    site.milter.wait_for_log(rf"\w+: reject: RCPT from unknown\[{UNTRUSTED}\]: 554 5\.7\.1 .*"
                             rf"to=<{re.escape(recipient.strip('<>'))}> .*reason={reason}$")


def test_sendmail_alone_would_relay_the_routing_tricks(sendmail_installed):
    # Without the milter this instance rewrites every trick to a remote
    # address and queues it for the esmtp mailer: the milter is what closes it.
    with SendmailInstance(None) as sendmail:
        with ClientDialog(sendmail.port, UNTRUSTED) as smtp:
            smtp.ehlo()
            smtp.mail_from("<sender@sender.test>")
            for recipient, _ in RELAY_ATTEMPTS[3:7]:
                assert smtp.rcpt_to(recipient).code == 250
            assert smtp.data().code == 250
        log = sendmail.wait_for_log(r"mailer=esmtp, .*stat=queued")
        assert log


def test_relay_attempt_leaves_no_mail_in_the_queue(site):
    with ClientDialog(site.port, UNTRUSTED) as smtp:
        smtp.ehlo()
        smtp.mail_from("<sender@sender.test>")
        assert smtp.rcpt_to("<victim@remote.test>").code == RELAY_DENIED
        assert smtp.rcpt_to("<user@local.test>").code == 250
        assert smtp.data().code == 250
    site.sendmail.wait_for_log(r"to=<user@local\.test>, .*mailer=local, .*stat=queued")
    assert "victim@remote.test" not in _delivery_lines(site.sendmail)


@pytest.mark.parametrize("recipient, reason", RELAY_ATTEMPTS[:7])
def test_trusted_client_may_relay(site, recipient, reason):
    assert rcpt_reply(site.port, recipient, client=TRUSTED).code == 250


@pytest.mark.parametrize("recipient", ["<user@remote.test>", "<user%remote.test@local.test>"])
def test_authenticated_client_may_relay(site, recipient):
    # Sendmail's own AUTH (SASL PLAIN against a sasldb) sets {auth_authen}.
    assert rcpt_reply(site.port, recipient, login="alice").code == 250


def test_failed_authentication_earns_no_trust(site):
    with ClientDialog(site.port, UNTRUSTED) as smtp:
        smtp.ehlo()
        assert smtp.login("alice", "wrong").code == 535
        smtp.mail_from("<alice@local.test>")
        assert smtp.rcpt_to("<user@remote.test>").code == RELAY_DENIED


def test_mail_auth_parameter_without_authentication_earns_no_trust(site):
    reply = rcpt_reply(site.port, "<user@remote.test>",
                       sender="<alice@local.test> AUTH=<alice@local.test>")
    assert reply.code == RELAY_DENIED


def test_sendmail_sends_the_macros_relaymilter_asks_for(site):
    # relaymilter's symlist request ({rcpt_addr} i at RCPT, j {daemon_name}
    # at connect) is honoured: no "the MTA sent no ... macro" warning, and
    # the queue ID (macro i) is in the decision log instead of NOQUEUE.
    assert rcpt_reply(site.port, "<user@remote.test>").code == RELAY_DENIED
    site.milter.wait_for_log(r"^\S+ \S+ relaymilter\[\d+\]: [0-9A-Za-z]{14}: reject: RCPT "
                             rf"from unknown\[{UNTRUSTED}\]")
    assert "sent no" not in site.milter.log_text()


def test_killed_milter_means_4xx_and_no_relay_then_restart_restores(sendmail_installed,
                                                                   public_tree):
    milter = RelaymilterProcess(public_subdirectory(public_tree, "sendmail-crash"),
                                transport="inet", relay=RELAY)
    milter.start()
    try:
        with SendmailInstance(milter.socket) as sendmail:
            assert rcpt_reply(sendmail.port, "<user@remote.test>").code == RELAY_DENIED
            milter.kill()
            with ClientDialog(sendmail.port, UNTRUSTED) as smtp:
                # F=T: "451 4.3.2 Please try again later" at MAIL, then 503s.
                smtp.ehlo()
                replies = [smtp.mail_from("<sender@sender.test>"),
                           smtp.rcpt_to("<user@remote.test>")]
                assert any(400 <= reply.code < 500 for reply in replies), replies
                assert all(reply.code != 250 for reply in replies[1:]), replies
                assert smtp.data().code != 250
            assert "user@remote.test" not in _delivery_lines(sendmail)
            _restart(milter)
            assert rcpt_reply(sendmail.port, "<user@remote.test>").code == RELAY_DENIED
            assert rcpt_reply(sendmail.port, "<user@local.test>").code == 250
    finally:
        milter.kill()


# ------------------------------------------------------------------ DNSBL ---

def test_listed_client_gets_554_naming_the_list_and_its_txt(site):
    reply = rcpt_reply(site.port, "<user@local.test>", client=LISTED)
    assert reply.code == 554
    assert reply.text == (f"5.7.1 Service unavailable; Client host [{LISTED}] blocked using BL; "
                          f"Listed for spam, see http://bl.test/{LISTED}")
    site.milter.wait_for_log(rf"reject: RCPT from unknown\[{LISTED}\]: 554 5\.7\.1 "
                             r"Service unavailable; .* reason=dnsbl$")


def test_allowlist_zone_outweighs_a_listing(site):
    assert rcpt_reply(site.port, "<user@local.test>", client=ALLOWED).code == 250


def test_unlisted_client_passes(site):
    assert rcpt_reply(site.port, "<user@local.test>", client=CLEAN).code == 250


@pytest.mark.parametrize("recipient", ["<postmaster>", "<postmaster@local.test>"])
def test_postmaster_stays_reachable_for_a_listed_client(site, recipient):
    assert rcpt_reply(site.port, recipient, client=LISTED).code == 250


def test_trusted_client_is_not_refused_for_a_listing(site):
    assert rcpt_reply(site.port, "<user@remote.test>", client=TRUSTED_LISTED).code == 250


# ----------------------------------------------------- per-domain policy ---

def test_store_allowlist_lets_a_listed_client_in_and_removal_reverts(site):
    probe = lambda: rcpt_reply(site.port, "<user@local.test>", client=LISTED).code
    assert probe() == 554
    site.cli("allowlist", "add", LISTED, "--comment", "customer's own server")
    try:
        assert site.becomes(250, probe) < PICKUP
        assert rcpt_reply(site.port, "<user@remote.test>", client=LISTED).code == RELAY_DENIED
    finally:
        site.cli("allowlist", "remove", LISTED)
    assert site.becomes(554, probe) < PICKUP


def test_hold_on_a_trusted_client_network_is_refused(site):
    probe = lambda: rcpt_reply(site.port, "<user@remote.test>", client=HELD_CLIENT).code
    assert probe() == 250
    site.cli("hold", "add", "--client", HELD_NET, "--reason", "infected")
    try:
        assert site.becomes(550, probe) < PICKUP
        # Sendmail puts the recipient in front of a 550 from the milter
        # ("<rcpt>... text"); 554 replies come through as relaymilter wrote them.
        reply = rcpt_reply(site.port, "<user@remote.test>", client=HELD_CLIENT)
        assert reply.text == "5.7.1 <user@remote.test>... Relaying suspended for this sender"
        assert rcpt_reply(site.port, "<user@remote.test>", client=TRUSTED_LISTED).code == 250
        assert rcpt_reply(site.port, "<user@local.test>", client=HELD_CLIENT).code == 250
    finally:
        site.cli("hold", "remove", "--client", HELD_NET)
    assert site.becomes(250, probe) < PICKUP


def test_held_user_is_refused_while_other_users_relay(site):
    probe = lambda user: rcpt_reply(site.port, "<user@remote.test>", login=user).code
    site.cli("hold", "add", "--user", "mallory", "--reason", "phished password")
    try:
        assert site.becomes(550, lambda: probe("mallory")) < PICKUP
        assert probe("alice") == 250
        assert rcpt_reply(site.port, "<user@local.test>", login="mallory").code == 250
    finally:
        site.cli("hold", "remove", "--user", "mallory")
    assert site.becomes(250, lambda: probe("mallory")) < PICKUP


# ---------------------------------------------------------------- helpers ---

def _restart(milter: RelaymilterProcess, timeout: float = 10.0) -> None:
    """start() again on the same TCP port, which may take a moment to be free."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            milter.start()
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _delivery_lines(sendmail: SendmailInstance) -> str:
    return "\n".join(line for line in sendmail.log_text().splitlines() if "stat=" in line)
