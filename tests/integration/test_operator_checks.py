"""Traps an operator falls into, refused or warned about at start (issue 12).

Each test runs the real command as a subprocess: check-config and the
daemons warn about a config without local domains, and --syslog without a
syslog daemon is one clear error at start instead of a traceback per line.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from relaymilter_process import RELAYMILTER, RelaymilterProcess, public_subdirectory

NO_LOCAL_DOMAINS = "no local domains ([relay] local_domains and local_domains_file are empty)"


def test_check_config_warns_about_an_empty_local_domains(tmp_path):
    config = tmp_path / "relaymilter.toml"
    config.write_text('[store]\npath = ""\n', encoding="utf-8")
    done = subprocess.run([RELAYMILTER, "check-config", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"# warning: {NO_LOCAL_DOMAINS}" in done.stdout
    # The effective values, defaults included.
    for line in ("timeout = 600    # takes effect at restart", 'on_error = "tempfail"',
                 "max_entries = 100000", 'trusted_networks = ["127.0.0.0/8", "::1/128"]'):
        assert line in done.stdout.splitlines(), line


def test_check_config_is_silent_with_local_domains(tmp_path):
    config = tmp_path / "relaymilter.toml"
    config.write_text('[relay]\nlocal_domains = ["local.test"]\n[store]\npath = ""\n',
                      encoding="utf-8")
    done = subprocess.run([RELAYMILTER, "check-config", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "no local domains" not in done.stdout + done.stderr


@pytest.mark.parametrize("front_end", ["milter", "policyd"])
def test_a_daemon_without_local_domains_warns_at_start(public_tree, front_end):
    directory = public_subdirectory(public_tree, f"no-domains-{front_end}")
    with RelaymilterProcess(directory, front_end=front_end, relay={"local_domains": []}) as daemon:
        assert daemon.wait_for_log(r"warning: .*no local domains")


def _without_syslog(command: list[str]) -> list[str]:
    """command in a mount namespace where /dev/log is no syslog socket."""
    if not os.path.exists("/dev/log"):
        return command
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind /dev/null /dev/log && exec "$@"', "sh", *command]


@pytest.mark.parametrize("verb", ["run", "policyd"])
def test_syslog_without_a_syslog_daemon_is_one_clear_error_at_start(tmp_path, verb):
    config = tmp_path / "relaymilter.toml"
    config.write_text(f'[milter]\nsocket = "unix:{tmp_path}/m.sock"\n'
                      f'[policyd]\nsocket = "unix:{tmp_path}/p.sock"\n'
                      '[relay]\nlocal_domains = ["local.test"]\n[store]\npath = ""\n',
                      encoding="utf-8")
    done = subprocess.run(_without_syslog([RELAYMILTER, verb, "--syslog", "-c", str(config)]),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 69, done.stdout + done.stderr
    assert "relaymilter: fatal: --syslog: nothing listens on /dev/log" in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path(f"{tmp_path}/m.sock").exists() and not Path(f"{tmp_path}/p.sock").exists()
