"""`relaymilter explain` and `relaymilter lookup` as an admin runs them.

The CLI runs as a subprocess against rbldnsd on loopback and a real store
written by the CLI's own verbs: the decision, the checks behind it, and
the exit statuses scripts rely on (explain 0 accepted / 2 refused /
3 deferred; lookup 0 not listed / 2 listed / 75 no answer).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from rbldnsd import Rbldnsd, RbldnsdZone
from relaymilter_process import RELAYMILTER

LISTED = "192.0.2.20"
PARTNER = "192.0.2.21"          # listed, but on the store's allowlist
CLEAN = "192.0.2.99"
ZONES = [
    RbldnsdZone("bl.test", "ip4set", [":127.0.0.2:Listed for spam, see http://bl.test/$",
                                      "127.0.0.2", LISTED, PARTNER]),
    RbldnsdZone("wl.test", "ip4set", [":127.0.10.2:", "127.0.0.2"]),
]


@pytest.fixture(scope="module")
def rbldnsd(rbldnsd_installed):
    with Rbldnsd(ZONES) as server:
        yield server


def write_config(directory: Path, nameserver: str) -> Path:
    config = directory / "relaymilter.toml"
    config.write_text(
        '[relay]\nlocal_domains = ["local.test", "straße.test"]\n'
        'trusted_networks = ["198.51.100.0/24"]\n'
        f'[store]\npath = "{directory / "policy.sqlite3"}"\n'
        f'[dnsbl]\nnameservers = ["{nameserver}"]\ntimeout = 1.0\n'
        '[[dnsbl.zone]]\nname = "bl.test"\ndisplay_name = "BL"\nweight = 2\n'
        '[[dnsbl.zone]]\nname = "wl.test"\ndisplay_name = "WL"\nweight = -2\n',
        encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def config(rbldnsd, tmp_path_factory) -> Path:
    path = write_config(tmp_path_factory.mktemp("explain"), rbldnsd.nameserver)
    cli("allowlist", "add", PARTNER, "--domain", "local.test", "-c", str(path), check=True)
    cli("hold", "add", "--user", "mallory", "--reason", "password phished", "-c", str(path),
        check=True)
    cli("limit", "add", "--user", "alice", "1", "--messages-per-day", "9", "-c", str(path),
        check=True)
    return path


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run([RELAYMILTER, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def explain(config: Path, *args: str) -> subprocess.CompletedProcess:
    return cli("explain", "-c", str(config), *args)


# --------------------------------------------------------------- explain ---

def test_explain_refuses_a_listed_client_and_shows_each_zone(config):
    done = explain(config, "--client", LISTED, "--rcpt", "<user@local.test>")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("dnsbl: LISTED, blocked using BL") for line in lines)
    assert any(line.split()[:3] == ["BL", "2", "listed"] for line in lines)
    assert any(line.split()[:3] == ["WL", "-2", "not-listed"] for line in lines)
    assert (f"<user@local.test>: REFUSED 554 5.7.1 Service unavailable; Client host "
            f"[{LISTED}] blocked using BL") in done.stdout
    assert lines[-1] == "verdict: refused"


def test_explain_accepts_a_clean_client_and_says_why(config):
    done = explain(config, "--client", CLEAN, "--rcpt", "<user@local.test>")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<user@local.test>: ACCEPTED (reason local-domain)" in done.stdout
    assert "dnsbl: not listed (score 0, threshold 1)" in done.stdout
    assert "  ours: yes (local-domain)" in done.stdout


def test_explain_names_the_allowlist_that_exempts_a_listed_client(config):
    done = explain(config, "--client", PARTNER, "--rcpt", "<user@local.test>")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"  exempted by allowlist {PARTNER}/32 for local.test" in done.stdout
    assert "ACCEPTED (reason allowlisted)" in done.stdout


def test_explain_shows_a_relay_attempt_and_the_idn_twin(config):
    done = explain(config, "--client", CLEAN, "--rcpt", "<user%remote.test@local.test>",
                   "--rcpt", "<user@straße.test>")
    assert done.returncode == 2
    assert "REFUSED 554 5.7.1 <user%remote.test@local.test>: Relay access denied " \
           "(reason percent-hack)" in done.stdout
    assert "  an MTA may read the domain as: strasse.test" in done.stdout


def test_explain_shows_a_hold_with_its_reason(config):
    done = explain(config, "--client", CLEAN, "--sasl-user", "mallory",
                   "--rcpt", "<x@remote.test>")
    assert done.returncode == 2
    assert "  hold: user mallory: password phished" in done.stdout
    assert "REFUSED 550 5.7.1 Relaying suspended for this sender (reason hold-user)" in done.stdout


def test_explain_defers_past_the_outbound_limit_with_exit_3(config):
    done = explain(config, "--client", CLEAN, "--sasl-user", "alice",
                   "--rcpt", "<a@remote.test>", "--rcpt", "<b@remote.test>")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "<a@remote.test>: ACCEPTED (reason authenticated)" in done.stdout
    assert "<b@remote.test>: DEFERRED 450 4.7.1" in done.stdout
    assert "outbound limit: 1 recipients per hour, 9 messages per day for user alice" in done.stdout


def test_explain_json_is_the_same_report(config):
    done = explain(config, "--client", "198.51.100.7", "--rcpt", "<x@remote.test>", "--json")
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert report["client"]["trust"] == "trusted-network"
    assert report["dnsbl"] == {"asked": False, "why": "trusted network: never looked up"}
    assert report["recipients"][0]["decision"]["reason"] == "trusted-network"
    assert report["verdict"] == "accepted"


def test_explain_refuses_a_bad_client_address_with_64(config):
    assert explain(config, "--client", "not-an-ip", "--rcpt", "<a@local.test>").returncode == 64


def test_explain_never_creates_a_missing_store(rbldnsd, tmp_path):
    config = write_config(tmp_path, rbldnsd.nameserver)
    done = explain(config, "--client", CLEAN, "--rcpt", "<a@local.test>")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "does not exist: no domain policy" in done.stdout
    assert not (tmp_path / "policy.sqlite3").exists()


# ---------------------------------------------------------------- lookup ---

def test_lookup_exits_2_for_a_listed_address_and_names_its_exemptions(config):
    listed = cli("lookup", LISTED, "-c", str(config))
    assert listed.returncode == 2, listed.stdout + listed.stderr
    assert listed.stdout.startswith(f"{LISTED}: LISTED, blocked using BL")
    partner = cli("lookup", PARTNER, "-c", str(config))
    assert partner.returncode == 2
    assert f"# exempted from the listing by allowlist {PARTNER}/32 for local.test" \
           in partner.stdout


def test_lookup_exits_0_for_a_clean_address(config):
    done = cli("lookup", CLEAN, "-c", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"{CLEAN}: not listed")


def test_lookup_exits_75_when_a_zone_gives_no_answer(tmp_path):
    # A bound UDP socket that never answers: every query times out.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        config = write_config(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}")
        done = cli("lookup", CLEAN, "-c", str(config))
    assert done.returncode == 75, done.stdout + done.stderr
    assert "timeout" in done.stdout and "may be listed" in done.stdout
