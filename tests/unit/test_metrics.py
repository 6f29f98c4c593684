"""metrics.py: the recorder, its labels, the cache collector and /healthz's document.

No sockets: the registry is read with get_sample_value(); the HTTP listener
itself is tested end to end in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import ipaddress
import pathlib
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from relaymilter.address import Trick
from relaymilter.cache import LookupCache
from relaymilter.config import ConfigError, parse_config
from relaymilter.dnsbl import DnsAnswer, DnsblChecker, query_name
from relaymilter.endpoint import split_host_port as split_listen
from relaymilter.zones import Status, Zone, ZoneAnswer, summarise
from relaymilter.decision import (Action, Decision, client_listed, internal_fault, permit,
                                  rate_limited, relay_denied)
from relaymilter.metrics import (HealthState, MetricsUnavailable, PrometheusRecorder,
                                 health_report, make_recorder)
from relaymilter.reason import Reason
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.relay import Trust
from relaymilter.reload import build_snapshot
from relaymilter.runtime import Runtime
from relaymilter.openstore import open_store
from relaymilter.storewatch import StoreWatcher

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIENT = ipaddress.ip_address("192.0.2.10")
BL = Zone.build("key123.bl.test", weight=2, display_name="BL")
WL = Zone.build("wl.test", weight=-2, display_name="WL")


@pytest.fixture
def recorder():
    return PrometheusRecorder(clock=lambda: 1_700_000_000.0)


def count(recorder, stage, decision):
    """What the engine records for an answered decision."""
    recorder.decision(stage, decision.action_label, decision.reason.label)


def value(recorder, name, **labels):
    """A sample's value; 0 for a series never written."""
    found = recorder.registry.get_sample_value(name, labels)
    return 0 if found is None else found


# ------------------------------------------------------------- off / on ---

def test_metrics_are_off_by_default():
    assert parse_config({}).metrics.listen == ""
    assert make_recorder(parse_config({}).metrics) is NO_METRICS


def test_the_off_recorder_accepts_every_event_and_does_nothing():
    NO_METRICS.connection()
    NO_METRICS.decision("rcpt", "permit", "local-domain")
    NO_METRICS.dnsbl_answer("BL", "listed")
    NO_METRICS.internal_error("rcpt")
    NO_METRICS.dns_query("BL", 0.1)
    NO_METRICS.config_loaded("/x", reload=True)
    NO_METRICS.config_failed("x")
    NO_METRICS.store_loaded(0.1)
    NO_METRICS.store_failed("x")


def test_every_recorder_event_exists_on_the_off_recorder():
    events = {name for name in vars(PrometheusRecorder) if not name.startswith("_")}
    events -= {"watch", "exposition", "health"}
    assert events <= set(vars(Recorder))


def test_listen_set_makes_a_prometheus_recorder():
    settings = parse_config({"metrics": {"listen": "127.0.0.1:9894"}}).metrics
    assert isinstance(make_recorder(settings), PrometheusRecorder)


def test_missing_prometheus_client_raises_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)     # import fails
    settings = parse_config({"metrics": {"listen": "127.0.0.1:9894"}}).metrics
    with pytest.raises(MetricsUnavailable, match=r"prometheus_client .*relaymilter\[metrics\]"):
        make_recorder(settings)


# ---------------------------------------------------------------- config ---

@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:9894", ("127.0.0.1", 9894)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9894", ("::1", 9894)),
    ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
])
def test_listen_address_is_parsed(text, address):
    assert split_listen(text) == address
    assert parse_config({"metrics": {"listen": text}}).metrics.address == address


@pytest.mark.parametrize("text", ["9894", "127.0.0.1", "localhost:9894", "::1:9894",
                                  "[127.0.0.1]:9894", "[::1]", "127.0.0.1:0", "127.0.0.1:65536",
                                  "127.0.0.1:http", "[::1]9894"])
def test_bad_listen_address_is_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"metrics\.listen: "):
        parse_config({"metrics": {"listen": text}}, "relaymilter.toml")


def test_metrics_off_has_no_address():
    assert parse_config({"metrics": {"listen": ""}}).metrics.address is None


def _cli(*args, block_prometheus=False, timeout=30):
    prelude = "import sys; sys.modules['prometheus_client'] = None; " if block_prometheus else ""
    code = prelude + "from relaymilter.cli import main; sys.exit(main(sys.argv[1:]))"
    if not block_prometheus:
        code = "import sys; " + code
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("verb", ["check-config", "run"])
def test_metrics_without_prometheus_client_refuse_to_start_with_exit_78(tmp_path, verb):
    config = tmp_path / "relaymilter.toml"
    config.write_text(f'[milter]\nsocket = "unix:{tmp_path}/milter.sock"\n[store]\npath = ""\n'
                      '[metrics]\nlisten = "127.0.0.1:9894"\n', encoding="utf-8")
    done = _cli(verb, "-c", str(config), block_prometheus=True)
    assert done.returncode == 78, done.stderr
    assert f"{config}: metrics.listen: metrics need the prometheus_client package" in done.stderr
    assert not (tmp_path / "milter.sock").exists()


# ---------------------------------------------------------------- labels ---

def test_every_relay_trick_and_trust_has_its_reason():
    assert {Reason.of_trick(trick).word for trick in Trick} == {trick.value for trick in Trick}
    granted = {trust.reason for trust in Trust if trust is not Trust.UNTRUSTED}
    assert {reason.word for reason in granted} == {trust.value for trust in Trust
                                                   if trust is not Trust.UNTRUSTED}
    assert {reason for reason in Reason if reason.grants_relay} == granted


def test_every_reason_the_guide_names_is_a_reason():
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    table = re.findall(r"^\|[^|]*\|[^|]*\| `([a-z-]+)` \|$", guide, re.M)
    bullet = re.search(r"^- `reason=` says which rule decided:(.*?)(?=^- )", guide, re.S | re.M)
    named = set(table) | set(re.findall(r"`([a-z][a-z-]+)`", bullet.group(1)))
    assert len(table) >= 10 and "rate-limit" in named
    words = {reason.word for reason in Reason}
    assert named <= words, named - words
    undocumented = [word for word in words if f"`{word}`" not in guide]
    assert not undocumented, f"the guide's \"Reading the log\" does not name {undocumented}"


@pytest.mark.parametrize("reason", ["percent-hack", "dnsbl", "hold-user", "not-listed"])
def test_a_reasons_word_is_its_label(reason):
    assert Reason(reason).label == Reason(reason).word == reason


# ---------------------------------------------------------------- events ---

def test_connections_are_counted(recorder):
    assert value(recorder, "relaymilter_connections_total") == 0
    recorder.connection()
    recorder.connection()
    assert value(recorder, "relaymilter_connections_total") == 2


def test_decisions_are_counted_by_stage_action_and_reason(recorder):
    count(recorder, "rcpt", relay_denied("user@remote.test", Reason.REMOTE_DOMAIN))
    count(recorder, "rcpt", relay_denied("user@remote.test", Reason.REMOTE_DOMAIN))
    count(recorder, "rcpt", permit(Reason.LOCAL_DOMAIN))
    count(recorder, "rcpt", rate_limited())
    count(recorder, "connect", Decision(Action.REJECT, Reason.DNSBL, 554, "5.7.1", "listed"))
    decisions = "relaymilter_decisions_total"
    assert value(recorder, decisions, stage="rcpt", action="reject", reason="remote-domain") == 2
    assert value(recorder, decisions, stage="rcpt", action="permit", reason="local-domain") == 1
    assert value(recorder, decisions, stage="rcpt", action="defer", reason="rate-limit") == 1
    assert value(recorder, decisions, stage="connect", action="reject", reason="dnsbl") == 1


def test_dry_run_decisions_read_would_reject(recorder):
    decision = replace(relay_denied("user@remote.test", Reason.REMOTE_DOMAIN), dry_run=True)
    count(recorder, "rcpt", decision)
    count(recorder, "rcpt", replace(internal_fault("tempfail"), dry_run=True))
    decisions = "relaymilter_decisions_total"
    assert value(recorder, decisions, stage="rcpt", action="would-reject",
                 reason="remote-domain") == 1
    assert value(recorder, decisions, stage="rcpt", action="would-defer",
                 reason="internal-error") == 1
    assert value(recorder, decisions, stage="rcpt", action="reject", reason="remote-domain") == 0


def test_internal_errors_are_counted_by_callback_and_start_at_zero(recorder):
    for callback in ("connect", "helo", "mail", "rcpt", "data"):
        assert recorder.registry.get_sample_value("relaymilter_internal_errors_total",
                                                  {"callback": callback}) == 0
    recorder.internal_error("mail")
    assert value(recorder, "relaymilter_internal_errors_total", callback="mail") == 1


def test_dnsbl_results_are_counted_by_zone_display_name_and_status(recorder):
    answers = [ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",)), ZoneAnswer(WL, Status.TIMEOUT)]
    for answer in answers + [ZoneAnswer(BL, Status.NOT_LISTED), ZoneAnswer(WL, Status.DISABLED)]:
        recorder.dnsbl_answer(answer.zone.display_name, answer.status.value)
    lookups = "relaymilter_dnsbl_lookups_total"
    assert value(recorder, lookups, zone="BL", result="listed") == 1
    assert value(recorder, lookups, zone="BL", result="not-listed") == 1
    assert value(recorder, lookups, zone="WL", result="timeout") == 1
    assert value(recorder, lookups, zone="WL", result="disabled") == 1
    assert "key123" not in recorder.exposition()[0].decode()


def test_query_durations_fill_the_zone_histogram(recorder):
    recorder.dns_query("BL", 0.03)
    recorder.dns_query("BL", 1.5)
    name = "relaymilter_dnsbl_query_duration_seconds"
    assert value(recorder, name + "_count", zone="BL") == 2
    assert value(recorder, name + "_sum", zone="BL") == pytest.approx(1.53)
    assert value(recorder, name + "_bucket", zone="BL", le="0.05") == 1
    assert value(recorder, name + "_bucket", zone="BL", le="2.0") == 2


def test_exposition_is_text_unless_openmetrics_is_asked_for(recorder):
    body, content_type = recorder.exposition(None)
    assert content_type.startswith("text/plain") and b"relaymilter_connections_total" in body
    body, content_type = recorder.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_build_info_names_the_version(recorder):
    from relaymilter import __version__
    samples = [sample for family in recorder.registry.collect()
               for sample in family.samples if sample.name == "relaymilter_build_info"]
    assert len(samples) == 1 and samples[0].labels["version"] == __version__


def test_config_reloads_are_counted_and_time_stamped(recorder):
    recorder.config_loaded("/etc/relaymilter.toml", reload=False)
    assert value(recorder, "relaymilter_config_reloads_total", result="success") == 0
    assert value(recorder, "relaymilter_config_last_load_timestamp_seconds") == 1_700_000_000
    recorder.config_failed("bad")
    recorder.config_loaded("/etc/relaymilter.toml", reload=True)
    assert value(recorder, "relaymilter_config_reloads_total", result="success") == 1
    assert value(recorder, "relaymilter_config_reloads_total", result="failure") == 1


def test_store_reads_are_counted_with_their_duration(recorder):
    recorder.store_loaded(0.25)
    recorder.store_failed("OperationalError: unable to open database file")
    assert value(recorder, "relaymilter_store_reloads_total", result="success") == 1
    assert value(recorder, "relaymilter_store_reloads_total", result="failure") == 1
    assert value(recorder, "relaymilter_store_last_load_duration_seconds") == 0.25
    assert value(recorder, "relaymilter_store_last_load_timestamp_seconds") == 1_700_000_000


# --------------------------------------------------- wired into the modules ---

class CountingResolver:
    def __init__(self):
        self.calls = 0

    def query(self, name, rdtype, lifetime=None):
        self.calls += 1
        if name == query_name(CLIENT, BL.name) and rdtype == "A":
            return DnsAnswer(("127.0.0.2",), 300)
        return DnsAnswer((), 300, nxdomain=True)


def test_checker_times_queries_sent_but_not_cache_hits_and_counts_every_verdict(recorder):
    resolver = CountingResolver()
    checker = DnsblChecker([BL, WL], resolver, LookupCache(100, 60, 3600), timeout=2.0,
                           metrics=recorder)
    with checker:
        assert checker.lookup(CLIENT).listed
        assert checker.lookup(CLIENT).listed       # from the cache
    durations = "relaymilter_dnsbl_query_duration_seconds_count"
    assert value(recorder, durations, zone="BL") == 1
    assert value(recorder, durations, zone="WL") == 1
    assert value(recorder, "relaymilter_dnsbl_lookups_total", zone="BL", result="listed") == 2
    assert value(recorder, "relaymilter_dnsbl_lookups_total", zone="WL", result="not-listed") == 2


def test_runtime_reports_loads_and_failed_reloads(tmp_path, recorder):
    config = tmp_path / "relaymilter.toml"
    config.write_text('[store]\npath = ""\n', encoding="utf-8")
    live = Runtime.start(parse_config({"store": {"path": ""}}, str(config)), metrics=recorder)
    assert live.metrics is recorder
    assert recorder.health(live.snapshot)[0]
    config.write_text('[store]\npath = ""\nbad = 1\n', encoding="utf-8")
    assert not live.refresh()
    deciding, report = recorder.health(live.snapshot)
    assert deciding and report["status"] == "degraded" and not report["ok"]
    assert "store.bad: unknown key" in report["config"]["error"]
    config.write_text('[store]\npath = ""\n[relay]\nlocal_domains = ["a.test"]\n',
                      encoding="utf-8")
    assert live.refresh()
    assert recorder.health(live.snapshot)[0]
    assert value(recorder, "relaymilter_config_reloads_total", result="failure") == 1
    assert value(recorder, "relaymilter_config_reloads_total", result="success") == 1


def test_restart_only_listen_keeps_its_running_value(tmp_path, recorder):
    config = tmp_path / "relaymilter.toml"
    config.write_text('[metrics]\nlisten = "127.0.0.1:9894"\n[store]\npath = ""\n',
                      encoding="utf-8")
    live = Runtime.start(parse_config({"metrics": {"listen": "127.0.0.1:9894"},
                                          "store": {"path": ""}}, str(config)))
    config.write_text('[metrics]\nlisten = "127.0.0.1:9895"\n[store]\npath = ""\n'
                      '[relay]\nlocal_domains = ["a.test"]\n', encoding="utf-8")
    assert live.refresh()
    assert live.snapshot.config.metrics.listen == "127.0.0.1:9894"
    assert live.snapshot.config.values["metrics.listen"] == "127.0.0.1:9894"


def test_store_watcher_reports_reads_and_failures(tmp_path, recorder):
    path = str(tmp_path / "policy.sqlite3")
    with open_store(path) as store:
        store.add_hold("user", "alice")
    watcher = StoreWatcher(path, recorder)
    assert watcher.poll() is not None
    assert watcher.poll() is None                   # unchanged: not a reload
    assert value(recorder, "relaymilter_store_reloads_total", result="success") == 1
    broken = StoreWatcher(str(tmp_path / "missing" / "policy.sqlite3"), recorder)
    assert broken.poll() is None
    assert value(recorder, "relaymilter_store_reloads_total", result="failure") == 1
    assert recorder.health_state.store_error is not None
    watcher.close()
    broken.close()


# ---------------------------------------------------------- cache collector ---

def _snapshot(document):
    return build_snapshot(parse_config(document))


ZONES = {"nameservers": ["127.0.0.1:9"], "zone": [{"name": "bl.test", "display_name": "BL"}]}


def test_cache_statistics_are_read_at_scrape_time(recorder):
    snapshot = _snapshot({"dnsbl": ZONES, "store": {"path": ""}})
    recorder.watch(lambda: snapshot)
    cache = snapshot.dnsbl.cache
    cache._hits, cache._misses = 5, 2
    assert value(recorder, "relaymilter_dns_cache_hits_total") == 5
    assert value(recorder, "relaymilter_dns_cache_misses_total") == 2
    assert value(recorder, "relaymilter_dns_cache_entries") == 0
    assert value(recorder, "relaymilter_dnsbl_zone_enabled", zone="BL") == 1
    snapshot.dnsbl.close()


def test_cache_counters_stay_monotonic_when_a_reload_replaces_the_cache(recorder):
    first = _snapshot({"dnsbl": ZONES, "store": {"path": ""}})
    current = [first]
    recorder.watch(lambda: current[0])
    first.dnsbl.cache._hits = 7
    assert value(recorder, "relaymilter_dns_cache_hits_total") == 7
    first.dnsbl.cache._hits = 9                     # hits after the last scrape
    second = _snapshot({"dnsbl": ZONES, "cache": {"max_entries": 10}, "store": {"path": ""}})
    current[0] = second
    second.dnsbl.cache._hits = 1
    assert value(recorder, "relaymilter_dns_cache_hits_total") == 10
    first.dnsbl.close()
    second.dnsbl.close()


def test_no_zones_means_zero_cache_counters(recorder):
    recorder.watch(lambda: _snapshot({"store": {"path": ""}}))
    assert value(recorder, "relaymilter_dns_cache_hits_total") == 0


# ------------------------------------------------------------------ health ---

def test_health_is_ok_with_config_loaded_and_no_store():
    state = HealthState()
    state.config_path, state.config_loaded = "/etc/r.toml", 1_700_000_000.0
    ok, report = health_report(state, _snapshot({"store": {"path": ""}}))
    assert ok and report["ok"] and report["status"] == "ok"
    assert report["config"] == {"ok": True, "path": "/etc/r.toml",
                                "loaded": "2023-11-14T22:13:20Z", "error": None}
    assert report["store"]["ok"] and report["store"]["path"] is None
    assert report["dnsbl"] == {"ok": True, "zones": {}}


def test_health_is_degraded_while_the_store_is_unreadable():
    state = HealthState()
    state.store_error = "OperationalError: unable to open database file"
    deciding, report = health_report(state, _snapshot({"store": {"path": "/nonexistent/p.sqlite3"}}))
    assert deciding and (report["ok"], report["status"]) == (False, "degraded")
    assert report["store"] == {"ok": False, "path": "/nonexistent/p.sqlite3", "loaded": None,
                               "error": "OperationalError: unable to open database file"}


def test_health_is_degraded_while_a_zone_is_disabled():
    snapshot = _snapshot({"dnsbl": ZONES, "store": {"path": ""}})
    ok, report = health_report(HealthState(), snapshot)
    assert ok and report["dnsbl"]["zones"] == {"BL": "enabled"}
    snapshot.dnsbl._disabled = frozenset({"bl.test"})
    deciding, report = health_report(HealthState(), snapshot)
    assert deciding and report["status"] == "degraded"
    assert report["dnsbl"] == {"ok": False, "zones": {"BL": "disabled"}}
    snapshot.dnsbl.close()


def test_health_is_degraded_while_the_last_reload_failed():
    state = HealthState()
    state.config_error = "r.toml: relay.x: unknown key"
    deciding, report = health_report(state, _snapshot({"store": {"path": ""}}))
    assert deciding and report["status"] == "degraded"
    assert report["config"]["error"] == "r.toml: relay.x: unknown key"


def test_health_is_down_without_a_configuration_in_force():
    deciding, report = health_report(HealthState(), None)
    assert not deciding and report["status"] == "down"


def test_client_listed_decision_counts_as_dnsbl(recorder):
    result = summarise(CLIENT, [ZoneAnswer(BL, Status.LISTED, ("127.0.0.2",))], 1)
    count(recorder, "rcpt", client_listed(result.client, result.reply_zone, result.txt))
    assert value(recorder, "relaymilter_decisions_total", stage="rcpt", action="reject",
                 reason="dnsbl") == 1
