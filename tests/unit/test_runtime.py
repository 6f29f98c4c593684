"""relaymilter.runtime.Runtime and reload.ConfigReloader: change detection, snapshot swaps, failed reloads.

refresh() is called directly, except in the one test of the watcher thread.
File changes are made visible regardless of the file system's mtime
granularity by changing the size or by moving the mtime explicitly.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from relaymilter.config import load_config
from relaymilter.runtime import Runtime
from relaymilter.relay import is_local_domain

RUNNING_SOCKET = "inet:8894@127.0.0.1"


class Files:
    """A config file and its local domains file in tmp_path."""

    def __init__(self, tmp_path):
        self.config = tmp_path / "relaymilter.toml"
        self.domains = tmp_path / "local-domains"

    def write_config(self, local_domains=("config.test",), domains_file: str | None = "default",
                     socket: str = RUNNING_SOCKET, extra: str = "") -> None:
        if domains_file == "default":
            domains_file = str(self.domains)
        listed = ", ".join(f'"{domain}"' for domain in local_domains)
        text = f'[milter]\nsocket = "{socket}"\n{extra}\n[relay]\nlocal_domains = [{listed}]\n'
        if domains_file is not None:
            text += f'local_domains_file = "{domains_file}"\n'
        rewrite(self.config, text)

    def write_domains(self, *lines: str) -> None:
        rewrite(self.domains, "".join(line + "\n" for line in lines))

    def start(self) -> Runtime:
        return Runtime.start(load_config(str(self.config)))


def rewrite(path, text: str) -> None:
    """Write text and move the mtime on, so that even a same-size rewrite shows."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    bump_mtime(path, before)


def bump_mtime(path, before_ns: int) -> None:
    later = max(path.stat().st_mtime_ns, before_ns) + 1_000_000_000
    os.utime(path, ns=(later, later))


def is_local(live: Runtime, domain: str) -> bool:
    return is_local_domain(domain, live.snapshot.relay_rules)


@pytest.fixture
def files(tmp_path) -> Files:
    files = Files(tmp_path)
    files.write_domains("file.test")
    files.write_config()
    return files


def reload_errors(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "relaymilter.reload" and record.levelno == logging.ERROR]


# ---------------------------------------------------------- unchanged files ---

def test_start_reads_config_and_domains_file(files):
    live = files.start()
    assert is_local(live, "config.test") and is_local(live, "file.test")
    assert live.snapshot.local_domain_count == 2


def test_refresh_without_changes_keeps_the_same_snapshot(files):
    live = files.start()
    snapshot = live.snapshot
    assert live.refresh() is False
    assert live.snapshot is snapshot


# ---------------------------------------------------------- domains file ---

def test_changed_domains_file_is_picked_up(files):
    live = files.start()
    files.write_domains("file.test", "added.test")
    assert live.refresh() is True
    assert is_local(live, "added.test")


def test_domains_file_rewritten_with_same_size_is_picked_up(files):
    live = files.start()
    files.write_domains("fila.test")          # same size as "file.test"
    assert live.refresh() is True
    assert is_local(live, "fila.test") and not is_local(live, "file.test")


def test_domains_file_with_bad_line_keeps_previous_snapshot(files, caplog):
    live = files.start()
    snapshot = live.snapshot
    files.write_domains("file.test", "# a comment", "bad domain!.test")
    assert live.refresh() is False
    assert live.snapshot is snapshot
    [message] = reload_errors(caplog)
    assert str(files.domains) in message
    assert "line 3" in message
    assert "is not a domain" in message


def test_domains_file_error_is_not_logged_again_when_nothing_changed(files, caplog):
    live = files.start()
    files.write_domains("bad domain!.test")
    live.refresh()
    live.refresh()
    live.refresh()
    assert len(reload_errors(caplog)) == 1


def test_same_domains_file_error_after_a_touch_is_not_logged_again(files, caplog):
    live = files.start()
    files.write_domains("bad domain!.test")
    live.refresh()
    bump_mtime(files.domains, files.domains.stat().st_mtime_ns)
    live.refresh()
    assert len(reload_errors(caplog)) == 1


def test_fixed_domains_file_is_picked_up_after_a_bad_line(files):
    live = files.start()
    files.write_domains("bad domain!.test")
    live.refresh()
    files.write_domains("fixed.test")
    assert live.refresh() is True
    assert is_local(live, "fixed.test")


def test_deleted_domains_file_keeps_previous_snapshot(files, caplog):
    live = files.start()
    snapshot = live.snapshot
    files.domains.unlink()
    assert live.refresh() is False
    assert live.snapshot is snapshot
    assert is_local(live, "file.test")
    [message] = reload_errors(caplog)
    assert str(files.domains) in message


def test_recreated_domains_file_is_picked_up(files):
    live = files.start()
    files.domains.unlink()
    live.refresh()
    files.write_domains("file.test", "back.test")
    assert live.refresh() is True
    assert is_local(live, "back.test")


# ----------------------------------------------------------- config file ---

def test_changed_config_file_is_picked_up(files):
    live = files.start()
    files.write_config(local_domains=("config.test", "new-in-config.test"))
    assert live.refresh() is True
    assert is_local(live, "new-in-config.test")


def test_broken_config_file_keeps_running_snapshot(files, caplog):
    live = files.start()
    snapshot = live.snapshot
    rewrite(files.config, "[relay\nlocal_domains = [\n")
    assert live.refresh() is False
    assert live.snapshot is snapshot
    [message] = reload_errors(caplog)
    assert str(files.config) in message and "not valid TOML" in message


def test_config_with_unknown_key_keeps_running_snapshot_and_names_key(files, caplog):
    live = files.start()
    snapshot = live.snapshot
    files.write_config(extra="dry_runn = true")
    assert live.refresh() is False
    assert live.snapshot is snapshot
    [message] = reload_errors(caplog)
    assert f"{files.config}: milter.dry_runn: unknown key" in message


def test_non_utf8_config_file_keeps_running_snapshot(files, caplog):
    # BUG: load_config lets tomllib's UnicodeDecodeError through; refresh()
    # raises, and the watcher thread logs a traceback every interval.
    live = files.start()
    snapshot = live.snapshot
    files.config.write_bytes(b'[relay]\nlocal_domains = ["caf\xe9.test"]\n')
    bump_mtime(files.config, 0)
    assert live.refresh() is False
    assert live.snapshot is snapshot
    assert len(reload_errors(caplog)) == 1


def test_fixed_config_file_is_picked_up_after_a_broken_one(files):
    live = files.start()
    rewrite(files.config, "[relay\n")
    live.refresh()
    files.write_config(local_domains=("repaired.test",))
    assert live.refresh() is True
    assert is_local(live, "repaired.test")


def test_changed_socket_keeps_running_socket_and_warns(files, caplog):
    live = files.start()
    files.write_config(local_domains=("config.test", "also-new.test"),
                       socket="unix:/run/relaymilter/relaymilter.sock")
    assert live.refresh() is True
    assert live.snapshot.config.milter.socket == RUNNING_SOCKET
    assert live.snapshot.config.values["milter.socket"] == RUNNING_SOCKET
    assert is_local(live, "also-new.test")   # the rest of the change applies
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "relaymilter.reload" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "milter.socket" in warnings[0]


def test_changed_timeout_keeps_running_timeout(files):
    live = files.start()
    files.write_config(extra="timeout = 30")
    live.refresh()
    assert live.snapshot.config.milter.timeout == 600


def test_config_naming_a_new_domains_file_is_picked_up(files, tmp_path):
    live = files.start()
    other = tmp_path / "other-domains"
    other.write_text("other.test\n", encoding="utf-8")
    files.write_config(domains_file=str(other))
    assert live.refresh() is True
    assert is_local(live, "other.test") and not is_local(live, "file.test")
    rewrite(other, "other.test\nmore.test\n")
    assert live.refresh() is True
    assert is_local(live, "more.test")


def test_domains_file_named_by_a_failed_reload_is_picked_up_once_it_exists(files, tmp_path):
    # BUG: after the failed reload, only the running config's files are
    # watched, so creating the file the new config names goes unnoticed
    # until the config file itself is touched again.
    live = files.start()
    later = tmp_path / "later-domains"
    files.write_config(domains_file=str(later))
    assert live.refresh() is False               # later-domains does not exist yet
    later.write_text("later.test\n", encoding="utf-8")
    assert live.refresh() is True
    assert is_local(live, "later.test")


# --------------------------------------------------------- watcher thread ---

def test_watcher_thread_makes_a_change_visible_within_two_seconds(files):
    live = files.start()
    live.watch(interval=0.05)
    try:
        files.write_domains("file.test", "watched.test")
        deadline = time.monotonic() + 2.0
        while not is_local(live, "watched.test") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert is_local(live, "watched.test")
    finally:
        live.stop()


def test_local_idn_with_an_idna_2003_variant_is_warned_about(files, caplog):
    files.write_config(local_domains=("straße.test",))
    with caplog.at_level(logging.WARNING, logger="relaymilter.reload"):
        files.start()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("strasse.test" in message for message in warnings)


def test_no_idna_warning_when_both_forms_are_listed(files, caplog):
    files.write_config(local_domains=("straße.test", "strasse.test"))
    with caplog.at_level(logging.WARNING, logger="relaymilter.reload"):
        files.start()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------ DNSBL checker ---

DNSBL = '[dnsbl]\nnameservers = ["127.0.0.1:9"]\ntimeout = 0.2\n[[dnsbl.zone]]\nname = "bl.test"\n'


def test_reload_without_dnsbl_change_keeps_the_checker(files):
    files.write_config(extra="", local_domains=("config.test",))
    files.config.write_text(files.config.read_text() + DNSBL)
    live = files.start()
    checker = live.snapshot.dnsbl
    assert checker is not None
    files.write_domains("file.test", "more.test")
    assert live.refresh() is True
    assert live.snapshot.dnsbl is checker
    live.stop()


def test_reload_with_new_zones_keeps_the_cache_and_closes_the_old_checker_later(files):
    rewrite(files.config, files.config.read_text() + DNSBL)
    live = files.start()
    old = live.snapshot.dnsbl
    rewrite(files.config, files.config.read_text() + '[[dnsbl.zone]]\nname = "bl2.test"\n')
    assert live.refresh() is True
    new = live.snapshot.dnsbl
    assert new is not old and new.cache is old.cache
    assert [zone.name for zone in new.zones] == ["bl.test", "bl2.test"]
    old.start("192.0.2.1").result()      # still usable during the grace period
    live.stop()


def test_reload_with_new_cache_limits_starts_a_new_cache(files):
    rewrite(files.config, files.config.read_text() + DNSBL)
    live = files.start()
    old = live.snapshot.dnsbl
    rewrite(files.config, files.config.read_text() + "[cache]\nmax_entries = 10\n")
    assert live.refresh() is True
    assert live.snapshot.dnsbl.cache is not old.cache
    live.stop()


def test_removing_every_zone_turns_lookups_off(files):
    rewrite(files.config, files.config.read_text() + DNSBL)
    live = files.start()
    files.write_config()
    assert live.refresh() is True
    assert live.snapshot.dnsbl is None
    live.stop()


# ------------------------------------------------------------ policy store ---

def test_unreadable_store_is_reported_once_and_mail_runs_without_policy(files, tmp_path, caplog):
    rewrite(files.config, files.config.read_text()
            + f'[store]\npath = "{tmp_path}/missing-dir/policy.sqlite3"\n')
    live = files.start()
    with caplog.at_level(logging.ERROR, logger="relaymilter.storewatch"):
        assert live.load_domain_policy() is False
        assert live.refresh_domain_policy() is False       # the watcher thread's first poll
        assert live.refresh_domain_policy() is False
    errors = [r.getMessage() for r in caplog.records if r.name == "relaymilter.storewatch"]
    assert len(errors) == 1 and "running without per-domain policy" in errors[0]
    (tmp_path / "missing-dir").mkdir()
    assert live.refresh_domain_policy() is True           # created on first use, now readable
    assert live.snapshot.domain_policy.counts == {kind: 0 for kind in live.snapshot.domain_policy.counts}


# ---------------------------------------------------------------- SIGHUP ---

def test_refresh_with_force_reloads_an_unchanged_config(files):
    live = files.start()
    snapshot = live.snapshot
    assert live.refresh(force=True) is True
    assert live.snapshot is not snapshot and is_local(live, "config.test")


def test_reload_now_wakes_the_watcher_at_once(files):
    live = files.start()
    live.watch(interval=60)         # the poll alone would not come for a minute
    try:
        snapshot = live.snapshot
        live.reload_now()
        deadline = time.monotonic() + 5
        while live.snapshot is snapshot and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live.snapshot is not snapshot
    finally:
        live.stop()


def test_a_forced_reload_of_a_broken_config_keeps_the_running_one(files, caplog):
    live = files.start()
    snapshot = live.snapshot
    files.config.write_text("[relay]\nlocal_domains = 7\n", encoding="utf-8")
    assert live.refresh(force=True) is False
    assert live.snapshot is snapshot
    assert any("relay.local_domains" in error for error in reload_errors(caplog))


def test_an_automatic_hold_is_stored_as_the_login_was_written(tmp_path):
    # The log line escapes a login; the store must keep it as it is, or the
    # hold would never match the login it was written for.
    from relaymilter.autohold import HoldRequest
    from relaymilter.openstore import open_store
    from relaymilter.storefollow import StoreFollower
    path = str(tmp_path / "policy.sqlite3")
    follower = StoreFollower()
    follower.put_on_hold(path, HoldRequest("user", "jürgen@exämple.test", "over its limit"))
    follower.close()
    with open_store(path) as store:
        assert [hold["value"] for hold in store.list_holds()] == ["jürgen@exämple.test"]
