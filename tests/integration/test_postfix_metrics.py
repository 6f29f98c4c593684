"""Metrics and health check end to end: Postfix -> relaymilter (+ rbldnsd), scraped over HTTP.

The counters are scraped before and after a known set of SMTP sessions and
must have moved by exactly what those sessions decided. XCLIENT plays the
clients; every session is EHLO, XCLIENT, MAIL, one RCPT.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rbldnsd import Rbldnsd, RbldnsdZone
from relaymilter_process import RelaymilterProcess, _free_port, public_subdirectory
from smtp_dialog import rcpt_reply

LISTED = "192.0.2.20"
CLEAN = "192.0.2.99"
TRUSTED = "198.51.100.7"
RELAY = {"local_domains": ["local.test"],
         "trusted_networks": ["127.0.0.0/8", "::1/128", "198.51.100.0/24"]}
ZONES = [RbldnsdZone("bl.test", "ip4set", [":127.0.0.2:Listed, see http://bl.test/$",
                                            "127.0.0.2", LISTED])]


@pytest.fixture(scope="module")
def rbldnsd(rbldnsd_installed) -> Iterator[Rbldnsd]:
    server = Rbldnsd(ZONES, ttl=300)
    server.start()
    yield server
    server.stop()


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(url: str) -> Counter:
    """(sample name, sorted labels) -> value, from /metrics."""
    status, content_type, body = get(url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    samples: Counter = Counter()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before: Counter, after: Counter, prefix: str) -> dict:
    """The samples named prefix* that changed, by how much (labels as a dict tuple)."""
    changes = {}
    for key in set(before) | set(after):
        if key[0].startswith(prefix) and after[key] != before[key]:
            changes[key] = after[key] - before[key]
    return changes


def decision(stage: str, action: str, reason: str) -> tuple:
    return ("relaymilter_decisions_total",
            tuple(sorted({"stage": stage, "action": action, "reason": reason}.items())))


def lookup(zone: str, result: str) -> tuple:
    return ("relaymilter_dnsbl_lookups_total",
            tuple(sorted({"zone": zone, "result": result}.items())))


_numbers = itertools.count()     # short directory names: a unix socket path has 108 bytes


@pytest.fixture
def gate(postfix_factory, public_tree, rbldnsd):
    """relaymilter with metrics on a free loopback port, one zone, a store, and Postfix."""
    directory = public_subdirectory(public_tree, f"m{next(_numbers)}")
    port = _free_port()
    milter = RelaymilterProcess(directory, relay=RELAY,
                                dnsbl={"nameservers": [rbldnsd.nameserver],
                                       "zone": [{"name": "bl.test", "display_name": "BL"}]},
                                store={"path": str(directory / "policy.sqlite3")},
                                metrics={"listen": f"127.0.0.1:{port}"})
    with milter:
        postfix = postfix_factory(milter.socket)
        yield milter, postfix, f"http://127.0.0.1:{port}"


def test_counters_move_exactly_as_the_decisions_did(gate):
    milter, postfix, url = gate
    before = scrape(url)
    sessions = [
        (CLEAN, "<user@remote.test>", 554),             # relay denied, remote-domain
        (CLEAN, "<user@remote.test>", 554),
        (CLEAN, "<user%remote.test@local.test>", 554),  # relay denied, percent-hack
        (CLEAN, "<user@local.test>", 250),              # permitted, DNSBL not listed
        (CLEAN, "<user@local.test>", 250),
        (CLEAN, "<user@local.test>", 250),
        (LISTED, "<user@local.test>", 554),             # DNSBL reject
        (LISTED, "<user@local.test>", 554),
        (TRUSTED, "<user@remote.test>", 250),           # trusted network relays
    ]
    for client, recipient, code in sessions:
        assert rcpt_reply(postfix.port, recipient, addr=client).code == code, (client, recipient)
    after = scrape(url)

    assert moved(before, after, "relaymilter_decisions_total") == {
        decision("rcpt", "reject", "remote-domain"): 2,
        decision("rcpt", "reject", "percent-hack"): 1,
        decision("rcpt", "permit", "local-domain"): 3,
        decision("rcpt", "reject", "dnsbl"): 2,
        decision("rcpt", "permit", "trusted-network"): 1,
    }
    # The relay attempts were refused without waiting for DNS: no verdict collected.
    assert moved(before, after, "relaymilter_dnsbl_lookups_total") == {
        lookup("BL", "not-listed"): 3,
        lookup("BL", "listed"): 2,
    }
    # Each XCLIENT starts a milter connection of its own; the one Postfix
    # opened for the real client (127.0.0.1) reaches connect() only sometimes.
    connections = ("relaymilter_connections_total", ())
    assert len(sessions) <= after[connections] - before[connections] <= 2 * len(sessions)
    # One A query each for CLEAN and LISTED; LISTED's TXT is not timed.
    count = ("relaymilter_dnsbl_query_duration_seconds_count", (("zone", "BL"),))
    assert after[count] - before[count] == 2
    # Eight sessions asked BL for A (two misses: CLEAN, LISTED); LISTED's
    # TXT was asked three times (one miss; then joined in flight, or cached).
    cache = {name: after[(name, ())] - before[(name, ())] for name in (
        "relaymilter_dns_cache_hits_total", "relaymilter_dns_cache_misses_total",
        "relaymilter_dns_cache_coalesced_total")}
    assert cache["relaymilter_dns_cache_misses_total"] == 3
    assert (cache["relaymilter_dns_cache_hits_total"]
            + cache["relaymilter_dns_cache_coalesced_total"]) == 6 + 2
    assert moved(before, after, "relaymilter_internal_errors_total") == {}
    for forbidden in (CLEAN, LISTED, TRUSTED, "remote.test", "local.test", "bl.test"):
        assert not any(forbidden in value for key in after for _, value in key[1]), forbidden


def test_build_info_process_and_store_metrics_are_served(gate):
    milter, postfix, url = gate
    samples = scrape(url)
    from relaymilter import __version__
    assert any(name == "relaymilter_build_info" and ("version", __version__) in labels
               for name, labels in samples)
    assert samples[("relaymilter_store_reloads_total", (("result", "success"),))] >= 1
    assert samples[("relaymilter_store_reloads_total", (("result", "failure"),))] == 0
    assert samples[("relaymilter_dnsbl_zone_enabled", (("zone", "BL"),))] == 1
    assert samples[("process_open_fds", ())] > 0


def test_healthz_reports_config_store_and_lists(gate):
    milter, postfix, url = gate
    status, content_type, body = get(url + "/healthz")
    assert status == 200 and content_type == "application/json"
    report = json.loads(body)
    assert report["ok"] is True
    assert report["config"]["ok"] and report["config"]["path"] == str(milter.config_path)
    assert report["config"]["loaded"].endswith("Z") and report["config"]["error"] is None
    assert report["store"] == {"ok": True, "path": str(milter.directory / "policy.sqlite3"),
                               "loaded": report["store"]["loaded"], "error": None}
    assert report["store"]["loaded"] is not None
    assert report["dnsbl"] == {"ok": True, "zones": {"BL": "enabled"}}
    assert get(url + "/")[0] == 404


def wait_for_health(url: str, status: int, timeout: float = 5.0,
                    state: str | None = None) -> dict:
    """The /healthz document once it answers HTTP status (and "status": state)."""
    deadline = time.monotonic() + timeout
    while True:
        got, _, body = get(url + "/healthz")
        if got == status and (state is None or json.loads(body)["status"] == state):
            return json.loads(body)
        if time.monotonic() > deadline:
            raise AssertionError(f"/healthz stayed {got}: {body}")
        time.sleep(0.1)


def test_healthz_says_degraded_while_a_reload_fails_and_ok_once_fixed(gate):
    # Decisions go on with the running config: 200, "degraded", never 503.
    milter, postfix, url = gate
    good = milter.config_path.read_text(encoding="utf-8")
    milter.config_path.write_text(good + "\n[relay2]\n", encoding="utf-8")
    report = wait_for_health(url, 200, state="degraded")
    assert report["config"]["ok"] is False and report["ok"] is False
    assert "relay2: unknown section" in report["config"]["error"]
    assert rcpt_reply(postfix.port, "<user@remote.test>", addr=CLEAN).code == 554  # deciding
    milter.config_path.write_text(good + "\n# fixed\n", encoding="utf-8")
    assert wait_for_health(url, 200, state="ok")["config"]["error"] is None
    samples = scrape(url)
    assert samples[("relaymilter_config_reloads_total", (("result", "failure"),))] == 1
    assert samples[("relaymilter_config_reloads_total", (("result", "success"),))] == 1


def test_healthz_says_degraded_while_the_store_is_unreadable(public_tree):
    directory = public_subdirectory(public_tree, "broken-store")
    port = _free_port()
    milter = RelaymilterProcess(directory, relay=RELAY,
                                store={"path": str(directory / "missing" / "policy.sqlite3")},
                                metrics={"listen": f"127.0.0.1:{port}"})
    with milter:
        url = f"http://127.0.0.1:{port}"
        report = wait_for_health(url, 200, state="degraded")
        assert report["store"]["ok"] is False
        assert str(directory / "missing" / "policy.sqlite3") in report["store"]["error"]
        assert report["config"]["ok"] and report["dnsbl"] == {"ok": True, "zones": {}}
        assert scrape(url)[("relaymilter_store_reloads_total", (("result", "failure"),))] >= 1


def test_metrics_port_in_use_stops_the_milter_with_exit_69(public_tree):
    directory = public_subdirectory(public_tree, "port-in-use")
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        milter = RelaymilterProcess(directory, relay=RELAY, store={"path": ""},
                                    metrics={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(RuntimeError, match="exited with 69"):
            milter.start()
        assert f"cannot serve metrics on 127.0.0.1:{port}" in milter.log_text()
