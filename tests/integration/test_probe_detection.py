"""[probes] through a real Postfix, with each front end: a client that keeps trying to
relay is blocked, local recipients included, and the block is an ordinary hold.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Iterator

import pytest

from postfix_instance import PostfixInstance
from relaymilter_process import RELAYMILTER, RelaymilterProcess, _free_port, public_subdirectory
from smtp_dialog import SmtpDialog
from test_postfix_metrics import scrape

PROBER, NEIGHBOUR = "192.0.2.77", "192.0.2.78"
REFUSALS, BLOCK_FOR = 3, 120
PICKUP = 2.0


class Site:
    def __init__(self, service: RelaymilterProcess, postfix: PostfixInstance, metrics: str):
        self.service, self.postfix, self.metrics = service, postfix, metrics

    def reply(self, client: str, recipient: str) -> tuple[int, str]:
        with SmtpDialog(self.postfix.port) as smtp:
            smtp.ehlo()
            smtp.xclient(addr=client)
            sent = smtp.mail_from("<someone@sender.test>")
            if sent.code != 250:
                return sent.code, sent.text
            answer = smtp.rcpt_to(recipient)
            return answer.code, answer.text

    def cli(self, *words: str) -> subprocess.CompletedProcess:
        return subprocess.run([RELAYMILTER, *words, "-c", str(self.service.config_path)],
                              capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def site(postfix_installed, public_tree, front_end) -> Iterator[Site]:
    directory = public_subdirectory(public_tree, f"probes-{front_end}")
    port = _free_port()
    metrics = {"listen" if front_end == "milter" else "policyd_listen": f"127.0.0.1:{port}"}
    service = RelaymilterProcess(
        directory, front_end=front_end,
        relay={"local_domains": ["local.test"], "trusted_networks": ["198.51.100.0/24"]},
        store={"path": str(directory / "policy.sqlite3")},
        probes={"refusals": REFUSALS, "window": 60, "block_for": BLOCK_FOR},
        metrics=metrics)
    service.start()
    postfix = PostfixInstance(**service.postfix_kwargs(local_domains=("local.test",)))
    try:
        postfix.start()
        yield Site(service, postfix, f"http://127.0.0.1:{port}")
    finally:
        postfix.stop()
        service.kill()


def test_a_client_that_keeps_trying_to_relay_is_blocked_for_everything(site):
    assert site.reply(PROBER, "<user@local.test>")[0] == 250
    before = scrape(site.metrics)
    forms = ["<a@remote.test>", "<b%remote.test@local.test>", "<remote.test!c@local.test>"]
    assert [site.reply(PROBER, form)[0] for form in forms] == [554] * REFUSALS
    started = time.monotonic()
    while site.reply(PROBER, "<user@local.test>")[0] == 250:
        assert time.monotonic() - started < PICKUP, "not blocked"
        time.sleep(0.05)
    code, text = site.reply(PROBER, "<user@local.test>")
    assert (code, text) == (554, site.service.reply_text(
        "5.7.1 Client host [192.0.2.77] blocked: relay probing", "<user@local.test>"))
    assert site.reply(NEIGHBOUR, "<user@local.test>")[0] == 250      # one client only
    holds = json.loads(site.cli("hold", "list", "--json").stdout)
    assert [(hold["value"], hold["scope"], hold["reason"], hold["added_by"])
            for hold in holds] == [(f"{PROBER}/32", "all", "relay probing", "relaymilter")]
    assert 0 < holds[0]["expires"] - time.time() <= BLOCK_FOR
    site.service.wait_for_log(rf"client {PROBER} made {REFUSALS} refused relay attempts "
                              rf"within 60 s: blocking it for {BLOCK_FOR} s")
    after = scrape(site.metrics)
    blocks = ("relaymilter_probe_blocks_total", ())
    assert after[blocks] - before[blocks] == 1
    assert site.cli("hold", "remove", "--client", PROBER).returncode == 0
    started = time.monotonic()
    while site.reply(PROBER, "<user@local.test>")[0] != 250:
        assert time.monotonic() - started < PICKUP, "still blocked"
        time.sleep(0.05)


def test_trusted_clients_are_never_counted(site):
    for number in range(REFUSALS * 2):
        # A trusted client may relay: nothing is refused, nothing counted.
        assert site.reply("198.51.100.7", f"<x{number}@remote.test>")[0] == 250
    assert json.loads(site.cli("hold", "list", "--json").stdout) == []


def test_relaymilter_probe_against_us_is_caught_and_still_finds_us_closed(site):
    tester = "192.0.2.90"
    done = subprocess.run([RELAYMILTER, "probe", f"127.0.0.1:{site.postfix.port}", "--as",
                           tester, "--local-domain", "local.test", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    replies = [form["reply"] for form in report["forms"]]
    # Refused as relaying at first, then blocked; never accepted.
    assert "Relay access denied" in replies[0]
    assert any("blocked: relay probing" in reply for reply in replies[REFUSALS:])
    holds = json.loads(site.cli("hold", "list", "--json").stdout)
    assert [(hold["value"], hold["scope"]) for hold in holds] == [(f"{tester}/32", "all")]
    assert site.cli("hold", "remove", "--client", tester).returncode == 0


def test_the_report_counts_what_the_daemon_logged(site):
    client = "192.0.2.99"
    assert site.reply(client, "<a@remote.test>")[0] == 554
    assert site.reply(client, "<b%remote.test@local.test>")[0] == 554
    assert site.reply(client, "<user@local.test>")[0] == 250
    site.service.wait_for_log(rf"RCPT from unknown\[{client}\]: .* reason=percent-hack")
    done = subprocess.run([RELAYMILTER, "report", str(site.service.log_path), "--top", "100",
                           "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["unreadable"] == 0
    mine = [row for row in report["top_clients"] if row["client"] == client]
    assert mine == [{"client": client, "refusals": 2,
                     "reasons": {"remote-domain": 1, "percent-hack": 1}}]
