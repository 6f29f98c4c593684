"""The status page and its API on a real daemon, after real traffic through Postfix:
a refused relay, a listed client, a held user, an authenticated sender, a dead zone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from postfix_instance import PostfixInstance
from rbldnsd import Rbldnsd, RbldnsdZone
from relaymilter_process import RELAYMILTER, RelaymilterProcess, _free_port, public_subdirectory
from smtp_dialog import SmtpDialog
from test_postfix_metrics import get

CLEAN, LISTED, HELD_FROM, OUR_USER = "192.0.2.99", "192.0.2.20", "192.0.2.30", "192.0.2.40"
HOSTILE = "<a&b'c@local.test>"      # what Postfix lets through that HTML must escape


class Site:
    def __init__(self, service: RelaymilterProcess, postfix: PostfixInstance, url: str) -> None:
        self.service, self.postfix, self.url = service, postfix, url

    def rcpt(self, client: str, recipient: str, login: str | None = None) -> int:
        with SmtpDialog(self.postfix.port) as smtp:
            smtp.ehlo()
            smtp.xclient(addr=client, login=login)
            assert smtp.mail_from("<someone@sender.test>").code == 250
            return smtp.rcpt_to(recipient).code


@pytest.fixture(scope="module")
def site(postfix_installed, rbldnsd_installed, public_tree) -> Iterator[Site]:
    zones = Rbldnsd([RbldnsdZone("bl.test", "ip4set", [":127.0.0.2:Listed", "127.0.0.2",
                                                       LISTED]),
                     RbldnsdZone("world.test", "ip4trie", ["0.0.0.0/0"])], ttl=2)
    zones.start()
    directory = public_subdirectory(public_tree, "status")
    port = _free_port()
    service = RelaymilterProcess(
        directory, relay={"local_domains": ["local.test"]},
        dnsbl={"nameservers": [zones.nameserver],
               "zone": [{"name": "bl.test", "display_name": "BL"},
                        {"name": "world.test", "display_name": "WORLD"}]},
        store={"path": str(directory / "policy.sqlite3")},
        metrics={"listen": f"127.0.0.1:{port}"})
    service.start()
    postfix = PostfixInstance(**service.postfix_kwargs(local_domains=("local.test",)))
    try:
        postfix.start()
        service.wait_for_log(r"error: dnsbl WORLD: .*disabled", timeout=10)
        done = subprocess.run([RELAYMILTER, "hold", "add", "--user", "mallory", "--reason",
                               "password phished", "-c", str(service.config_path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        site = Site(service, postfix, f"http://127.0.0.1:{port}")
        service.wait_for_log(r"policy store .* loaded in .*1 holds", timeout=10)
        assert site.rcpt(CLEAN, "<user@remote.test>") == 554              # relay refused
        assert site.rcpt(LISTED, "<user@local.test>") == 554              # listed
        assert site.rcpt(HELD_FROM, "<user@remote.test>", "mallory") == 550   # held
        for number in range(2):
            assert site.rcpt(OUR_USER, f"<r{number}@remote.test>", "alice") == 250
        assert site.rcpt(CLEAN, HOSTILE) == 250
        yield site
    finally:
        postfix.stop()
        service.kill()
        zones.stop()


def test_the_api_says_what_happened_in_the_last_hour(site):
    status, content_type, body = get(site.url + "/api/v1/status")
    assert status == 200 and content_type == "application/json"
    document = json.loads(body)
    assert document["zones"] == [{"name": "BL", "enabled": True},
                                 {"name": "WORLD", "enabled": False}]
    assert document["health"]["status"] == "degraded"       # a zone is dead
    assert [(hold["value"], hold["reason"], hold["expires"]) for hold in document["holds"]] \
        == [("mallory", "password phished", None)]
    assert document["holds"][0]["since"].endswith("Z")
    refused = {row["client"]: row["refusals"] for row in document["top_refused_clients"]}
    assert refused == {CLEAN: 1, LISTED: 1, HELD_FROM: 1}
    assert document["top_senders"] == [{"sender": "alice", "recipients": 2}]
    totals = document["decisions"]["totals"]
    assert totals["reject"] == 3 and totals["permit"] >= 3
    assert document["cache"]["entries"] >= 1


def test_the_decisions_api_filters(site):
    status, _, body = get(site.url + "/api/v1/decisions?user=ALICE")
    decisions = json.loads(body)["decisions"]
    assert status == 200 and len(decisions) == 2
    assert {decision["recipient"] for decision in decisions} == {"r0@remote.test",
                                                                  "r1@remote.test"}
    assert all(decision["verdict"] == "permit" and decision["reason"] == "authenticated"
               for decision in decisions)
    _, _, body = get(site.url + f"/api/v1/decisions?client={LISTED}")
    assert [(d["verdict"], d["reason"]) for d in json.loads(body)["decisions"]] == [
        ("reject", "dnsbl")]


def test_the_page_shows_the_hold_the_refused_client_and_the_dead_zone(site):
    status, content_type, page = get(site.url + "/status")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert "a&b'c" not in page and "a&amp;b&#x27;c@local.test" in page
    assert "password phished" in page and "mallory" in page
    assert "DEAD: disabled by its health check" in page
    assert f"<td>{CLEAN}</td>" in page and f"<td>{LISTED}</td>" in page
    assert "<script" not in page.lower().replace("&lt;script", "")      # no JavaScript
    _, _, filtered = get(site.url + f"/status?client={LISTED}")
    last = filtered.split("<h2>Last decisions</h2>")[1]
    assert LISTED in last and "remote.test" not in last


def test_unknown_paths_are_404_and_the_metrics_stay_where_they_were(site):
    assert get(site.url + "/api/v2/anything")[0] == 404
    status, content_type, body = get(site.url + "/metrics")
    assert status == 200 and "relaymilter_decisions_total" in body


def test_top_shows_the_same_in_a_terminal(site):
    done = subprocess.run([RELAYMILTER, "top", site.url, "--once"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    screen = done.stdout
    assert "health: degraded" in screen and "WORLD DEAD" in screen and "BL ok" in screen
    assert "mallory" in screen and "password phished" in screen
    assert f"1  {CLEAN}" in screen and "2  alice" in screen
    config = subprocess.run([RELAYMILTER, "top", "--once", "-c", str(site.service.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0 and "mallory" in config.stdout      # URL from the config


def test_top_without_a_daemon_says_so():
    from postfix_instance import free_loopback_port
    done = subprocess.run([RELAYMILTER, "top", f"http://127.0.0.1:{free_loopback_port()}",
                           "--once"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 69 and "Connection refused" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------ a real browser, and monitoring ---

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = ROOT / "build" / "test-artifacts"
# Nothing may leave loopback: every request but 127.0.0.1's goes to a proxy
# that is not there, and Chromium's own background traffic is off.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-default-apps", "--disable-extensions",
                  "--disable-domain-reliability", "--no-pings", "--dns-prefetch-disable",
                  "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"]


def chromium(*arguments: str, home: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: run scripts/install-debian-deps test"
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={home}", *arguments],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(home)})


def test_a_real_browser_shows_the_hold_the_refused_client_and_the_dead_zone(site, tmp_path):
    dom = chromium("--dump-dom", site.url + "/status", home=tmp_path).stdout
    assert "relaymilter status" in dom
    assert "mallory" in dom and "password phished" in dom
    assert CLEAN in dom and LISTED in dom
    assert "DEAD: disabled by its health check" in dom
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    chromium(f"--screenshot={shot}", "--window-size=1280,2200", site.url + "/status",
             home=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_alert_rules_pass_promtool_and_fire_when_they_should():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run scripts/install-debian-deps test"
    rules = ROOT / "packaging" / "prometheus" / "relaymilter-alerts.yml"
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and "SUCCESS: 9 rules found" in checked.stdout, checked
    tested = subprocess.run([promtool, "test", "rules", "relaymilter-alerts-test.yml"],
                            cwd=ROOT / "tests" / "prometheus", capture_output=True, text=True,
                            timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_metric_the_rules_and_the_dashboard_read_is_one_the_daemon_exports(site):
    _, _, exposition = get(site.url + "/metrics")
    exported = set(re.findall(r"^(relaymilter_\w+)", exposition, re.M))
    rules = (ROOT / "packaging" / "prometheus" / "relaymilter-alerts.yml").read_text()
    dashboard = json.loads((ROOT / "packaging" / "grafana" /
                            "relaymilter-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"]
                   for target in panel["targets"]]
    used = set(re.findall(r"relaymilter_\w+", rules + "\n".join(expressions)))
    assert used and not used - exported, sorted(used - exported)
    assert {"relaymilter_auto_holds_total", "relaymilter_dnsbl_zone_enabled"} <= used
