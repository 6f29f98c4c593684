"""Per-domain policy end to end: the CLI edits the store, the running milter obeys.

One relaymilter (with a store, a DNSBL zone on rbldnsd, a short limits
window and automatic holds) behind one Postfix, for the whole module. Each
test changes the store with the real `relaymilter` command, then polls the
SMTP outcome through Postfix until it changes: it must within 2 seconds.
Every test removes what it added, so the next one starts from an empty store.

The module runs twice (the front_end fixture of conftest): relaymilter as
Postfix's milter, then as its policy service, each with a store of its own,
expecting the same SMTP codes.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from postfix_instance import PostfixInstance
from rbldnsd import Rbldnsd, RbldnsdZone
from relaymilter_process import RELAYMILTER, RelaymilterProcess, public_subdirectory
from smtp_dialog import SmtpDialog, rcpt_reply

LISTED = "192.0.2.20"          # on BL
CLEAN = "192.0.2.99"
CUSTOMER = "192.0.2.50"        # a customer's web server, untrusted by config
TRUSTED = "198.51.100.7"       # in trusted_networks
WINDOW = 3                     # seconds: [limits] window
PICKUP = 2.0                   # the promise: a change is in force within 2 s


@pytest.fixture(scope="module")
def rbldnsd(rbldnsd_installed) -> Iterator[Rbldnsd]:
    server = Rbldnsd([RbldnsdZone("bl.test", "ip4set", [":127.0.0.2:Listed", "127.0.0.2",
                                                        LISTED])], ttl=300)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def site(postfix_installed, rbldnsd, public_tree, front_end):
    directory = public_subdirectory(public_tree, f"policy-{front_end}")
    service = RelaymilterProcess(
        directory, front_end=front_end,
        relay={"local_domains": ["local.test", "other.test"],
               "trusted_networks": ["198.51.100.0/24"]},
        dnsbl={"nameservers": [rbldnsd.nameserver], "threshold": 2,
               "zone": [{"name": "bl.test", "display_name": "BL", "weight": 2}]},
        store={"path": str(directory / "policy.sqlite3")},
        limits={"window": WINDOW, "auto_hold_factor": 3})
    service.start()
    postfix = PostfixInstance(**service.postfix_kwargs(local_domains=("local.test",
                                                                      "other.test")))
    try:
        postfix.start()
        yield Site(service, postfix)
    finally:
        postfix.stop()
        service.kill()


class Site:
    def __init__(self, service: RelaymilterProcess, postfix: PostfixInstance) -> None:
        self.service, self.postfix = service, postfix

    def cli(self, *words: str, expect: int = 0, stdin: str | None = None) -> str:
        done = subprocess.run([RELAYMILTER, *words, "-c", str(self.service.config_path)],
                              capture_output=True, text=True, timeout=60, input=stdin)
        assert done.returncode == expect, (words, done.stdout, done.stderr)
        return done.stdout + done.stderr

    def code(self, recipient: str, addr: str, login: str | None = None,
             sender: str = "<sender@sender.test>") -> int:
        with SmtpDialog(self.postfix.port) as smtp:
            smtp.ehlo()
            smtp.xclient(addr=addr, login=login)
            reply = smtp.mail_from(sender)
            if reply.code != 250:
                return reply.code
            return smtp.rcpt_to(recipient).code

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


def test_global_allowlist_lets_a_listed_client_in_and_removal_reverts(site):
    probe = lambda: site.code("<user@local.test>", LISTED)
    assert probe() == 554
    site.cli("allowlist", "add", LISTED, "--comment", "customer's own server")
    assert site.becomes(250, probe) < PICKUP
    site.cli("allowlist", "remove", LISTED)
    assert site.becomes(554, probe) < PICKUP


def test_domain_scoped_allowlist_covers_only_that_domain(site):
    site.cli("allowlist", "add", "192.0.2.0/24", "--domain", "other.test")
    assert site.becomes(250, lambda: site.code("<user@other.test>", LISTED)) < PICKUP
    assert site.code("<user@local.test>", LISTED) == 554
    site.cli("allowlist", "remove", "192.0.2.0/24", "--domain", "other.test")
    assert site.becomes(554, lambda: site.code("<user@other.test>", LISTED)) < PICKUP


def test_allowlist_never_opens_relaying(site):
    site.cli("allowlist", "add", CUSTOMER)
    time.sleep(PICKUP)
    assert site.code("<user@remote.test>", CUSTOMER) == 554
    site.cli("allowlist", "remove", CUSTOMER)


def test_domain_dnsbl_opt_out_and_threshold(site):
    probe = lambda: site.code("<user@other.test>", LISTED)
    site.cli("domain", "add", "other.test", "--dnsbl", "off")
    assert site.becomes(250, probe) < PICKUP
    assert site.code("<user@local.test>", LISTED) == 554
    site.cli("domain", "add", "other.test", "--threshold", "3")     # BL weighs 2
    time.sleep(PICKUP)
    assert probe() == 250
    site.cli("domain", "add", "other.test", "--threshold", "1")
    assert site.becomes(554, probe) < PICKUP
    site.cli("domain", "remove", "other.test")


def test_relay_client_may_relay_only_with_its_sender_domains(site):
    probe = lambda sender: site.code("<user@remote.test>", CUSTOMER, sender=sender)
    assert probe("<web@cust.test>") == 554
    site.cli("relay-client", "add", CUSTOMER, "--sender-domain", "cust.test")
    assert site.becomes(250, lambda: probe("<web@cust.test>")) < PICKUP
    assert probe("<web@elsewhere.test>") == 554
    site.cli("relay-client", "remove", CUSTOMER)
    assert site.becomes(554, lambda: probe("<web@cust.test>")) < PICKUP


def test_sasl_user_may_relay_only_with_owned_sender_domains(site):
    probe = lambda sender: site.code("<user@remote.test>", CLEAN, login="alice", sender=sender)
    assert probe("<alice@anything.test>") == 250                  # owns nothing: free
    site.cli("domain", "add", "cust.test", "--owner", "alice")
    assert site.becomes(553, lambda: probe("<alice@anything.test>")) < PICKUP
    assert probe("<alice@cust.test>") == 250
    assert site.code("<user@remote.test>", CLEAN, login="bob",
                     sender="<bob@anything.test>") == 250
    site.cli("domain", "remove", "cust.test")
    assert site.becomes(250, lambda: probe("<alice@anything.test>")) < PICKUP


def test_held_user_is_refused_while_other_users_relay(site):
    probe = lambda user: site.code("<user@remote.test>", CLEAN, login=user)
    site.cli("hold", "add", "--user", "mallory", "--reason", "phished password")
    assert site.becomes(550, lambda: probe("mallory")) < PICKUP
    assert probe("bob") == 250
    assert site.code("<user@local.test>", CLEAN, login="mallory") == 250    # inbound still
    assert "phished password" in site.cli("hold", "list")
    site.cli("hold", "remove", "--user", "mallory")
    assert site.becomes(250, lambda: probe("mallory")) < PICKUP


def test_hold_refusal_logs_the_sasl_user_and_the_hold_reason_not_in_the_reply(site):
    site.cli("hold", "add", "--user", "trudy", "--reason", "phished password, ticket 42")
    try:
        assert site.becomes(550, lambda: site.code("<user@remote.test>", CLEAN,
                                                   login="trudy")) < PICKUP
        line = site.service.wait_for_log(r"^.*sasl_username=<trudy> reason=hold-user.*$").group(0)
        assert line.endswith("hold_reason=<phished password, ticket 42>")
        assert "ticket 42" not in line.split("; from=", 1)[0]      # the reply does not carry it
        assert site.code("<user@local.test>", CLEAN, login="trudy") == 250
    finally:
        site.cli("hold", "remove", "--user", "trudy")


def test_hold_on_a_user_applies_whatever_the_letter_case_of_the_login(site):
    probe = lambda user: site.code("<user@remote.test>", CLEAN, login=user)
    assert probe("zed@example.com") == 250
    site.cli("hold", "add", "--user", "Zed@Example.COM", "--reason", "phished")
    assert site.becomes(550, lambda: probe("zed@example.com")) < PICKUP
    assert probe("ZED@EXAMPLE.COM") == 550
    site.cli("hold", "add", "--user", "zed@example.com", "--reason", "phished")   # the same one
    holds = json.loads(site.cli("hold", "list", "--json"))
    assert [(hold["value"], hold["reason"]) for hold in holds] == [("zed@example.com",
                                                                    "phished")]
    site.cli("hold", "remove", "--user", "ZED@example.com")
    assert site.becomes(250, lambda: probe("zed@example.com")) < PICKUP


def test_owned_domains_apply_whatever_the_letter_case_of_the_login(site):
    probe = lambda sender: site.code("<user@remote.test>", CLEAN, login="alice@example.com",
                                     sender=sender)
    site.cli("domain", "add", "cust.test", "--owner", "Alice@Example.COM")
    assert site.becomes(553, lambda: probe("<alice@anything.test>")) < PICKUP
    assert probe("<alice@cust.test>") == 250
    site.cli("domain", "remove", "cust.test")
    assert site.becomes(250, lambda: probe("<alice@anything.test>")) < PICKUP


def test_held_client_network_is_refused(site):
    probe = lambda: site.code("<user@remote.test>", TRUSTED)
    assert probe() == 250
    site.cli("hold", "add", "--client", "198.51.100.0/28", "--reason", "infected")
    assert site.becomes(550, probe) < PICKUP
    assert site.code("<user@remote.test>", "198.51.100.77") == 250
    site.cli("hold", "remove", "--client", "198.51.100.0/28")
    assert site.becomes(250, probe) < PICKUP


def test_limit_trips_at_the_count_and_resets_after_the_window(site):
    site.cli("limit", "add", "--user", "carol", "3")
    time.sleep(PICKUP)
    time.sleep(WINDOW)              # no window of carol's left from another test
    codes = [site.code(f"<r{n}@remote.test>", CLEAN, login="carol") for n in range(5)]
    assert codes == [250, 250, 250, 450, 450]
    time.sleep(WINDOW + 0.2)
    assert site.code("<r9@remote.test>", CLEAN, login="carol") == 250
    site.cli("limit", "remove", "--user", "carol")


def test_a_message_counts_once_whatever_its_recipients(site):
    # Both front ends: Postfix's policy `instance`, the milter's own message id.
    site.cli("limit", "add", "--user", "dora", "--messages-per-hour", "2")
    time.sleep(PICKUP)
    messages = []
    with SmtpDialog(site.postfix.port) as smtp:
        smtp.ehlo()
        smtp.xclient(addr=CLEAN, login="dora")
        for number in range(3):
            assert smtp.mail_from("<dora@sender.test>").code == 250
            messages.append([smtp.rcpt_to(f"<r{n}@remote.test>").code for n in range(3)])
            smtp.rset()
    assert messages == [[250] * 3, [250] * 3, [450] * 3]
    site.cli("limit", "remove", "--user", "dora")


def test_sender_far_over_its_limit_is_put_on_hold(site):
    site.cli("limit", "add", "--user", "spammer", "2")
    time.sleep(PICKUP)
    codes = [site.code(f"<r{n}@remote.test>", CLEAN, login="spammer") for n in range(6)]
    assert codes == [250, 250, 450, 450, 450, 450]
    site.service.wait_for_log(r"warning: user spammer put on hold")
    holds = json.loads(site.cli("hold", "list", "--json"))
    assert [(h["kind"], h["value"], h["added_by"]) for h in holds] == \
        [("user", "spammer", "relaymilter")]
    time.sleep(WINDOW + 0.2)        # a new window: the hold, not the limit, refuses
    assert site.becomes(550, lambda: site.code("<r@remote.test>", CLEAN, login="spammer")) < 1
    site.cli("hold", "remove", "--user", "spammer")
    site.cli("limit", "remove", "--user", "spammer")


def test_import_of_ten_thousand_entries_is_atomic(site, tmp_path):
    rows = [{"network": f"10.{n // 256}.{n % 256}.0/24", "domain": "", "comment": "bulk"}
            for n in range(9_999)]
    good = {"format": "relaymilter-policy", "version": 1,
            "allowlist": rows + [{"network": LISTED}]}
    bad = {**good, "allowlist": rows + [{"network": "10.0.0.0/33"}]}
    bad_file, good_file = tmp_path / "bad.json", tmp_path / "good.json"
    bad_file.write_text(json.dumps(bad))
    good_file.write_text(json.dumps(good))
    message = site.cli("policy", "import", str(bad_file), expect=1)
    assert "10.0.0.0/33" in message and "10000" in message
    assert json.loads(site.cli("allowlist", "list", "--json")) == []
    site.cli("policy", "import", str(good_file))
    assert len(json.loads(site.cli("allowlist", "list", "--json"))) == 10_000
    assert site.becomes(250, lambda: site.code("<user@local.test>", LISTED)) < PICKUP
    site.cli("policy", "import", "-", "--replace", stdin=json.dumps({"format": "relaymilter-policy",
                                                                   "version": 1}))
    assert site.becomes(554, lambda: site.code("<user@local.test>", LISTED)) < PICKUP


def test_cli_writes_while_fifty_connections_are_filtered(site):
    clients = [f"203.0.113.{n}" for n in range(1, 51)]

    def session(address: str) -> tuple[int, int]:
        return (site.code("<user@remote.test>", address),
                site.code("<user@local.test>", address))

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        sessions = [pool.submit(session, address) for address in clients]
        for n in range(20):
            site.cli("allowlist", "add", f"10.99.{n}.0/24", "--comment", "while busy")
        results = [future.result() for future in sessions]
    assert results == [(554, 250)] * 50
    # One command takes the 20 entries away again (20 would cost a second each).
    site.cli("policy", "import", "-", "--replace",
             stdin=json.dumps({"format": "relaymilter-policy", "version": 1}))
    assert json.loads(site.cli("allowlist", "list", "--json")) == []
    log = site.service.log_text()
    assert "Traceback" not in log and "database is locked" not in log
