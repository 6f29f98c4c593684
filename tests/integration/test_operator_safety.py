"""Safe in an operator's hands: the store verbs and the config, across the process boundary.

Every test runs the installed `relaymilter` command as a subprocess, as an
admin would, and where the daemon matters starts it on a unix socket in
tmp_path (no MTA needed: the store and the config are the subject).
Through a real Postfix, case-insensitive holds and owners are in
test_postfix_policy.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relaymilter_process import RELAYMILTER, RelaymilterProcess

ROOT = Path(__file__).resolve().parents[2]
EX_NOINPUT, EX_CONFIG = 66, 78


def relaymilter(*words: str, expect: int | None = 0, stdin: str | None = None,
                umask: int = 0o022) -> subprocess.CompletedProcess:
    done = subprocess.run([RELAYMILTER, *words], capture_output=True, text=True, timeout=60,
                          input=stdin, umask=umask,
                          env={**os.environ, "RELAYMILTER_CONFIG": "/nonexistent"})
    if expect is not None:
        assert done.returncode == expect, (words, done.returncode, done.stdout, done.stderr)
    return done


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "policy.sqlite3"


def policy_document(**sections) -> str:
    return json.dumps({"format": "relaymilter-policy", "version": 1, **sections})


# ----------------------------------------------------- #1 letter case ---

def test_user_names_differing_in_case_are_one_entry_listed_as_written(store):
    relaymilter("hold", "add", "--user", "Zed@Example.COM", "--reason", "phished",
                "--store", str(store))
    relaymilter("hold", "add", "--user", "ZED@example.com", "--reason", "phished",
                "--store", str(store))
    holds = json.loads(relaymilter("hold", "list", "--json", "--store", str(store)).stdout)
    assert [(hold["value"], hold["reason"]) for hold in holds] == [("ZED@example.com", "phished")]
    relaymilter("hold", "remove", "--user", "zed@example.com", "--store", str(store))
    assert json.loads(relaymilter("hold", "list", "--json", "--store", str(store)).stdout) == []


# ---------------------------------------------------- #3 wide networks ---

@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "::ffff:0:0/96", "10.0.0.0/7"])
def test_wide_relay_client_is_refused_and_nothing_stored_unless_forced(store, network):
    refused = relaymilter("relay-client", "add", network, "--store", str(store), expect=1)
    assert "open relay" in refused.stderr and "--force" in refused.stderr
    assert json.loads(relaymilter("relay-client", "list", "--json", "--store",
                                  str(store)).stdout) == []
    relaymilter("relay-client", "add", network, "--force", "--store", str(store))
    assert len(json.loads(relaymilter("relay-client", "list", "--json", "--store",
                                      str(store)).stdout)) == 1


def test_import_with_a_wide_relay_client_fails_naming_the_row_unless_forced(store, tmp_path):
    document = tmp_path / "policy.json"
    document.write_text(policy_document(relay_clients=[{"network": "192.0.2.0/24"},
                                                       {"network": "0.0.0.0/0"}]))
    relaymilter("hold", "add", "--user", "alice", "--store", str(store))
    refused = relaymilter("policy", "import", str(document), "--store", str(store), expect=1)
    assert "relay_clients row 2" in refused.stderr and "0.0.0.0/0" in refused.stderr
    assert json.loads(relaymilter("relay-client", "list", "--json", "--store",
                                  str(store)).stdout) == []
    relaymilter("policy", "import", str(document), "--force", "--store", str(store))
    assert len(json.loads(relaymilter("relay-client", "list", "--json", "--store",
                                      str(store)).stdout)) == 2


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "::ffff:0:0/96"])
def test_check_config_refuses_a_wide_trusted_network_with_78_naming_file_and_key(
        tmp_path, network):
    config = tmp_path / "relaymilter.toml"
    config.write_text(f'[relay]\ntrusted_networks = ["{network}"]\n[store]\npath = ""\n')
    done = relaymilter("check-config", "-c", str(config), expect=EX_CONFIG)
    assert f"{config}: relay.trusted_networks: " in done.stderr
    assert "allow_wide_trusted_networks" in done.stderr


def test_allowed_wide_trusted_network_warns_in_check_config_and_at_start(tmp_path):
    relay = {"trusted_networks": ["0.0.0.0/0"], "allow_wide_trusted_networks": True}
    service = RelaymilterProcess(tmp_path, front_end="policyd", relay=relay,
                                 store={"path": ""})
    done = relaymilter("check-config", "-c", str(service.config_path))
    assert "relay.trusted_networks: 0.0.0.0/0 is wider than" in done.stderr
    with service:
        service.wait_for_log(r"warning: .*relay\.trusted_networks: 0\.0\.0\.0/0 is wider than")


# ------------------------------------------------- #8 file permissions ---

def test_store_wal_and_shm_are_created_0640_under_umask_022(store):
    """`policy import -` opens (and creates) the store before it reads standard
    input: while it waits, the CLI's own three files are there to stat."""
    importer = subprocess.Popen([RELAYMILTER, "policy", "import", "-", "--store", str(store)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, umask=0o022)
    try:
        deadline = time.monotonic() + 20
        while not all(os.path.exists(f"{store}{suffix}") for suffix in ("-wal", "-shm")):
            assert importer.poll() is None and time.monotonic() < deadline, importer.stderr
            time.sleep(0.02)
        modes = {suffix: stat.S_IMODE(os.stat(f"{store}{suffix}").st_mode)
                 for suffix in ("", "-wal", "-shm")}
        output, errors = importer.communicate(
            policy_document(holds=[{"kind": "user", "value": "alice"}]), timeout=30)
    finally:
        importer.kill()
        importer.wait()
    assert importer.returncode == 0, errors
    assert modes == {"": 0o640, "-wal": 0o640, "-shm": 0o640}
    assert stat.S_IMODE(store.stat().st_mode) == 0o640


def test_an_existing_store_readable_by_everyone_is_tightened_when_opened(store):
    relaymilter("hold", "add", "--user", "alice", "--store", str(store))
    for path in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        if path.exists():
            path.chmod(0o644)
    done = relaymilter("hold", "list", "--store", str(store))
    assert "alice" in done.stdout
    assert f"{store} was mode 0644, readable beyond its owner and group: now 0640" in done.stderr
    assert stat.S_IMODE(store.stat().st_mode) == 0o640
    assert "was mode" not in relaymilter("hold", "list", "--store", str(store)).stderr


def test_a_wide_relay_client_already_in_the_store_is_warned_about_at_load(tmp_path, store):
    relaymilter("relay-client", "add", "0.0.0.0/0", "--force", "--store", str(store))
    service = RelaymilterProcess(tmp_path, front_end="policyd",
                                 relay={"local_domains": ["local.test"]},
                                 store={"path": str(store)})
    with service:
        service.wait_for_log(r"warning: policy store .*: relay client 0\.0\.0\.0/0 wider than "
                             r"/8 \(IPv4\) or /32 \(IPv6\): every client in it may relay")


# -------------------------------------------------------- #18 safety ---

@pytest.mark.parametrize("words", [("hold", "list"), ("allowlist", "list", "--json"),
                                   ("policy", "export"),
                                   ("relay-client", "remove", "192.0.2.0/24")])
def test_read_verbs_on_a_missing_store_exit_66_and_create_nothing(tmp_path, words):
    typo = tmp_path / "polcy.sqlite3"
    done = relaymilter(*words, "--store", str(typo), expect=EX_NOINPUT)
    assert str(typo) in done.stderr
    assert os.listdir(tmp_path) == []


def test_add_refuses_to_replace_a_different_entry_without_replace(store):
    relaymilter("domain", "add", "cust.example", "--owner", "alice", "--store", str(store))
    relaymilter("domain", "add", "cust.example", "--owner", "ALICE", "--store", str(store))
    refused = relaymilter("domain", "add", "cust.example", "--threshold", "3",
                          "--store", str(store), expect=1)
    assert "owners=ALICE" in refused.stderr and "--replace" in refused.stderr
    relaymilter("relay-client", "add", "192.0.2.0/24", "--sender-domain", "cust.example",
                "--store", str(store))
    refused = relaymilter("relay-client", "add", "192.0.2.0/24", "--store", str(store), expect=1)
    assert "sender_domains=cust.example" in refused.stderr
    relaymilter("hold", "add", "--user", "eve", "--reason", "phished", "--store", str(store))
    relaymilter("hold", "add", "--user", "eve", "--reason", "phished", "--store", str(store))
    relaymilter("hold", "add", "--user", "eve", "--store", str(store), expect=1)
    exported = json.loads(relaymilter("policy", "export", "--store", str(store)).stdout)
    assert exported["domains"][0]["owners"] == ["ALICE"]     # as last written
    assert exported["domains"][0]["threshold"] is None
    assert exported["relay_clients"][0]["sender_domains"] == ["cust.example"]
    assert exported["holds"][0]["reason"] == "phished"
    relaymilter("relay-client", "add", "192.0.2.0/24", "--replace", "--store", str(store))
    relaymilter("hold", "add", "--user", "eve", "--replace", "--store", str(store))
    exported = json.loads(relaymilter("policy", "export", "--store", str(store)).stdout)
    assert exported["relay_clients"][0]["sender_domains"] == []
    assert exported["holds"][0]["reason"] == ""


def test_remove_that_matches_nothing_shows_the_nearest_entries(store):
    relaymilter("allowlist", "add", "198.51.100.0/24", "--domain", "cust.example",
                "--store", str(store))
    relaymilter("hold", "add", "--client", "203.0.113.0/28", "--store", str(store))
    relaymilter("hold", "add", "--user", "mallory@cust.example", "--store", str(store))
    done = relaymilter("allowlist", "remove", "198.51.100.0/24", "--store", str(store), expect=1)
    assert "no such entry: 198.51.100.0/24" in done.stderr
    assert "network=198.51.100.0/24  domain=cust.example" in done.stderr
    done = relaymilter("hold", "remove", "--client", "203.0.113.7", "--store", str(store),
                       expect=1)
    assert "value=203.0.113.0/28" in done.stderr
    done = relaymilter("hold", "remove", "--user", "malory@cust.example", "--store", str(store),
                       expect=1)
    assert "value=mallory@cust.example" in done.stderr
    assert len(json.loads(relaymilter("hold", "list", "--json", "--store",
                                      str(store)).stdout)) == 2


def test_import_dry_run_prints_the_changes_and_changes_nothing(store, tmp_path):
    relaymilter("hold", "add", "--user", "alice", "--reason", "phished", "--store", str(store))
    relaymilter("allowlist", "add", "192.0.2.0/24", "--store", str(store))
    before = relaymilter("policy", "export", "--store", str(store)).stdout
    document = policy_document(holds=[{"kind": "user", "value": "alice", "reason": "other"},
                                      {"kind": "client", "value": "203.0.113.9"}])
    done = relaymilter("policy", "import", "-", "--dry-run", "--replace", "--store", str(store),
                       stdin=document)
    assert done.stdout.splitlines() == [
        "allowlist: 0 added, 0 replaced, 1 removed", "  - 192.0.2.0/24",
        "relay_clients: 0 added, 0 replaced, 0 removed",
        "holds: 1 added, 1 replaced, 0 removed", "  + client 203.0.113.9/32", "  ~ user alice",
        "limits: 0 added, 0 replaced, 0 removed",
        "domains: 0 added, 0 replaced, 0 removed", "dry run: nothing changed"]
    assert relaymilter("policy", "export", "--store", str(store)).stdout == before
    missing = tmp_path / "new.sqlite3"
    done = relaymilter("policy", "import", "-", "--dry-run", "--store", str(missing),
                       stdin=document)
    assert "holds: 2 added, 0 replaced" in done.stdout and not missing.exists()


# ------------------------------------------- #21 make run's own config ---

def test_dev_config_puts_the_store_in_the_checkout_for_the_daemon_and_the_verbs(tmp_path):
    """What `make run` does (scripts/dev-config), in a checkout elsewhere."""
    checkout = tmp_path / "checkout"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "dev-config"),
                           str(ROOT / "packaging" / "relaymilter.toml"),
                           str(checkout / "build" / "dev")],
                          capture_output=True, text=True, check=True)
    config = Path(done.stdout.strip())
    assert config == checkout / "build" / "dev" / "relaymilter.toml"
    store = checkout / "build" / "dev" / "policy.sqlite3"
    packaged = (ROOT / "packaging" / "relaymilter.toml").read_text()
    assert 'path = "/var/lib/relaymilter/policy.sqlite3"' in packaged     # the package's
    assert config.read_text().count("/var/lib") == 0
    effective = relaymilter("check-config", "-c", str(config)).stdout
    assert f'path = "{store}"' in effective
    relaymilter("hold", "add", "--user", "mallory", "--reason", "phished", "-c", str(config))
    assert "phished" in relaymilter("hold", "list", "-c", str(config)).stdout
    # The daemon with that config (its socket moved off the fixed port into
    # tmp_path; the store line untouched) reads the same store.
    service = RelaymilterProcess(tmp_path)
    text = config.read_text().replace('socket = "inet:8894@127.0.0.1"',
                                      f'socket = "unix:{service.socket_path}"')
    assert text.count(str(service.socket_path)) == 1
    service.config_path.write_text(text)
    with service:
        service.wait_for_log(rf"policy store {store} loaded in .*1 holds")
    assert "store unreadable" not in service.log_text()


def test_make_run_uses_the_dev_config():
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "run"], capture_output=True,
                          text=True, timeout=60)
    assert "relaymilter run -c build/dev/relaymilter.toml" in done.stdout, done.stdout


# ------------------------------------------------ limits of several rates ---

def test_limit_add_takes_several_rates_and_refuses_none(store):
    done = relaymilter("limit", "add", "--user", "bob", "--store", str(store), expect=1)
    assert "a limit needs one rate at least" in done.stderr
    relaymilter("limit", "add", "--domain", "example.com", "500", "--per-day", "2000",
                "--messages-per-hour", "50", "--messages-per-day", "400", "--store", str(store))
    listed = relaymilter("limit", "list", "--store", str(store)).stdout.splitlines()
    assert listed[0].split()[:6] == ["kind", "value", "per_hour", "per_day",
                                     "messages_per_hour", "messages_per_day"]
    assert listed[1].split()[:6] == ["user", "@example.com", "500", "2000", "50", "400"]
