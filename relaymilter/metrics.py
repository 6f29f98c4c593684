"""metrics - Prometheus metrics and a health check, on a listener of their own.

NAME
    metrics - what relaymilter counts, and the HTTP listener that shows it

SYNOPSIS
    recorder = make_recorder(config.metrics)    # NO_METRICS when listen = ""
    runtime = Runtime.start(config, metrics=recorder)
    listener = MetricsListener(config.metrics.address, recorder, lambda: runtime.snapshot)
    listener.start()                            # GET /metrics, GET /healthz
    recorder.decided("rcpt", decision, client, sender, recipient)   # one call per event,
                                                                    # any thread
    listener.stop()

DESCRIPTION
    Off by default ([metrics] listen = "" for the milter, policyd_listen =
    "" for the policy service: each daemon has a listener of its own, so
    both run from one config). The modules that see an event
    make one call into a Recorder. With metrics off that is NO_METRICS,
    whose methods do nothing: the hot path pays one empty method call per
    event. With metrics on it is a PrometheusRecorder; prometheus_client
    (the `metrics` extra) is imported only then, and make_recorder() raises
    MetricsUnavailable when it is missing.

    Labels take values from closed sets only: stage, action, reason (the
    label of a reason.Reason), zone display names (from the
    config, never the zone's real name, which may hold a key), DNSBL
    statuses, callback names, results. Never a domain, an address or a user.

    Metrics:
      relaymilter_build_info{version,python}              1
      relaymilter_connections_total                       milter connects (Postfix
                                                          repeats connect after XCLIENT)
      relaymilter_decisions_total{stage,action,reason}    stage connect|rcpt; action
                                                          permit|reject|defer, or
                                                          would-reject|would-defer (dry run)
      relaymilter_internal_errors_total{callback}         exceptions caught at the edge
      relaymilter_dnsbl_lookups_total{zone,result}        one per zone and client verdict,
                                                          cached answers included; result
                                                          is a dnsbl.Status value
      relaymilter_dnsbl_query_duration_seconds{zone}      histogram of the A queries sent
                                                          (cache misses only), failures too
      relaymilter_dnsbl_zone_enabled{zone}                0 while a health check disables it
      relaymilter_dns_cache_hits_total                    cache.stats(), read at scrape
      relaymilter_dns_cache_misses_total                  time, summed over the caches a
      relaymilter_dns_cache_coalesced_total               reload replaced
      relaymilter_dns_cache_entries, _in_flight
      relaymilter_config_reloads_total{result}            success|failure
      relaymilter_config_last_load_timestamp_seconds
      relaymilter_store_reloads_total{result}             success|failure; a store that
                                                          cannot be read fails once a poll
      relaymilter_store_last_load_duration_seconds
      relaymilter_store_last_load_timestamp_seconds
      relaymilter_counter_errors_total                    Redis calls failed or timed out
      relaymilter_counter_fallbacks_total                 recipients not counted in Redis
      relaymilter_probe_blocks_total                      clients blocked for relay probing
      relaymilter_auto_holds_total                        senders put on hold over their limit
      process_*                                           prometheus_client's own
    /metrics answers in Prometheus' text format, or in OpenMetrics when the
    scraper's Accept header asks for it.

    Health. GET /healthz answers JSON, so that monitoring never has to
    probe the milter port. HTTP 200 while decisions are being made, with
    "status": "ok" when every part is ok and "degraded" when one is not
    (the decisions go on from what is in force); HTTP 503 with "status":
    "down" only when the service cannot decide (no configuration in force):
      {"ok": true, "status": "ok",
       "config": {"ok": true, "path": "/etc/...", "loaded": "2024-05-01T12:00:00Z",
                  "error": null},
       "store": {"ok": true, "path": "/var/...", "loaded": "...", "error": null},
       "counters": {"ok": true, "url": "redis://...", "error": null},
       "dnsbl": {"ok": true, "zones": {"zen": "enabled", "world": "disabled"}}}
    config is not ok while its last reload failed (the previous one stays
    in force); store is not ok while its last read failed; counters is not
    ok while the shared counters (Redis) do not answer (url null: counted
    in each process); dnsbl is not ok while a health check has disabled a
    zone.
"""

from __future__ import annotations

import datetime
import http.server
import json
import logging
import platform
import socket
import socketserver
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Iterator

from relaymilter import __version__
from relaymilter.activity import Activity, Seen
from relaymilter.recorder import NO_METRICS, Recorder

if TYPE_CHECKING:
    from relaymilter.cache import LookupCache
    from relaymilter.config import MetricsConfig
    from relaymilter.engine import Snapshot

log = logging.getLogger(__name__)

CALLBACKS = ("connect", "helo", "mail", "rcpt", "data")

# Seconds; a query ends within [dnsbl] timeout (at most 30 s).
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class MetricsUnavailable(Exception):
    """Metrics are configured, but prometheus_client cannot be imported."""


def make_recorder(settings: "MetricsConfig", front_end: str = "milter") -> Recorder:
    """NO_METRICS when the front end's metrics are off, else a PrometheusRecorder.

    front_end "milter" reads [metrics] listen, "policyd" [metrics]
    policyd_listen. Raises MetricsUnavailable when prometheus_client is
    not installed.
    """
    if not (settings.listen if front_end == "milter" else settings.policyd_listen):
        return NO_METRICS
    return PrometheusRecorder()


def _import_prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core   # the metric families of SnapshotCollector
        import prometheus_client.exposition
    except ImportError:
        raise MetricsUnavailable(
            "metrics need the prometheus_client package, which is not installed: "
            "pip install 'relaymilter[metrics]' (Debian: apt install python3-prometheus-client), "
            "or set listen = \"\" to turn metrics off") from None
    return prometheus_client


class HealthState:
    """What the recorder last heard about the config and the store. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.config_path: str | None = None
        self.config_loaded: float | None = None
        self.config_error: str | None = None
        self.store_loaded: float | None = None
        self.store_error: str | None = None
        self.counters_error: str | None = None


class PrometheusRecorder(Recorder):
    """Counts into a registry of its own (unit tests make as many as they like)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        prometheus = _import_prometheus()
        self.prometheus = prometheus   # the module, imported only when metrics are on
        self.registry = registry = prometheus.CollectorRegistry()
        self.health_state = HealthState()
        self.activity = Activity()      # the status page's last hour
        self._clock = clock
        counter, gauge = prometheus.Counter, prometheus.Gauge
        prometheus.Info("relaymilter_build", "relaymilter's version and Python's",
                        registry=registry).info({"version": __version__,
                                                 "python": platform.python_version()})
        self._connections = counter(
            "relaymilter_connections", "Milter connect callbacks (Postfix repeats connect "
            "after XCLIENT).", registry=registry)
        self._sessions_closed = counter(
            "relaymilter_milter_sessions_closed", "Milter connections closed for lasting "
            "over [milter] session_timeout.", registry=registry)
        self._decisions = counter(
            "relaymilter_decisions", "Decisions answered, by stage (connect, rcpt), action "
            "and reason.", ("stage", "action", "reason"), registry=registry)
        self._internal_errors = counter(
            "relaymilter_internal_errors", "Exceptions caught at the milter's error boundary, "
            "by callback.", ("callback",), registry=registry)
        self._dnsbl = counter(
            "relaymilter_dnsbl_lookups", "Zone answers about clients, cached ones included, "
            "by zone display name and result.", ("zone", "result"), registry=registry)
        self._query_seconds = prometheus.Histogram(
            "relaymilter_dnsbl_query_duration_seconds", "Time DNS A queries to a zone took "
            "(cache misses only; failures included).", ("zone",), buckets=QUERY_BUCKETS,
            registry=registry)
        self._config_reloads = counter(
            "relaymilter_config_reloads", "Config reloads, by result.", ("result",),
            registry=registry)
        self._config_loaded = gauge(
            "relaymilter_config_last_load_timestamp_seconds",
            "When the config in force was loaded (Unix time).", registry=registry)
        self._store_reloads = counter(
            "relaymilter_store_reloads", "Reads of the policy store into a new snapshot, by "
            "result; an unreadable store fails once per poll.", ("result",), registry=registry)
        self._store_seconds = gauge(
            "relaymilter_store_last_load_duration_seconds",
            "How long the last successful read of the policy store took.", registry=registry)
        self._store_loaded = gauge(
            "relaymilter_store_last_load_timestamp_seconds",
            "When the policy store was last read successfully (Unix time).", registry=registry)
        self._counter_errors = counter(
            "relaymilter_counter_errors", "Calls to the shared counters (Redis) that failed "
            "or timed out.", registry=registry)
        self._counter_fallbacks = counter(
            "relaymilter_counter_fallbacks", "Recipients not counted in the shared counters "
            "(counted in this process, or deferred: [counters] on_error).", registry=registry)
        self._auto_holds = counter(
            "relaymilter_auto_holds", "Senders put on hold automatically, far over their "
            "outbound limit ([limits] auto_hold_factor).", registry=registry)
        self._probe_blocks = counter(
            "relaymilter_probe_blocks", "Clients blocked for relay probing ([probes]).",
            registry=registry)
        for callback in CALLBACKS:
            self._internal_errors.labels(callback)
        for result in ("success", "failure"):
            self._config_reloads.labels(result)
            self._store_reloads.labels(result)
        prometheus.ProcessCollector(registry=registry)
        self._snapshot_collector: SnapshotCollector | None = None

    def watch(self, snapshot: Callable[[], "Snapshot | None"]) -> None:
        """Read the cache and zone health from snapshot() at every scrape."""
        if self._snapshot_collector is None:
            self._snapshot_collector = SnapshotCollector(self.prometheus, snapshot)
            self.registry.register(self._snapshot_collector)

    # -- events ------------------------------------------------------------
    def connection(self) -> None:
        self._connections.inc()

    def milter_session_closed(self) -> None:
        self._sessions_closed.inc()

    def decision(self, stage: str, action: str, reason: str) -> None:
        self._decisions.labels(stage, action, reason).inc()

    def decided(self, stage: str, decision: Any, client: Any, sender: str | None,
                recipient: str | None) -> None:
        self.decision(stage, decision.action_label, decision.reason.label)
        self.activity.record(Seen(
            self._clock(), stage, decision.action_label, decision.reason.word,
            str(client.address) if client.address is not None else "unknown",
            client.auth_user, sender.strip().strip("<>") if sender is not None else None,
            recipient.strip().strip("<>") if recipient is not None else None,
            decision.action.value == "permit" and decision.reason.grants_relay))

    def internal_error(self, callback: str) -> None:
        self._internal_errors.labels(callback).inc()

    def dnsbl_answer(self, zone: str, status: str) -> None:
        self._dnsbl.labels(zone, status).inc()

    def dns_query(self, zone: str, seconds: float) -> None:
        self._query_seconds.labels(zone).observe(seconds)

    def config_loaded(self, path: str, reload: bool) -> None:
        now = self._clock()
        if reload:
            self._config_reloads.labels("success").inc()
        self._config_loaded.set(now)
        state = self.health_state
        with state.lock:
            state.config_path, state.config_loaded, state.config_error = path, now, None

    def config_failed(self, error: str) -> None:
        self._config_reloads.labels("failure").inc()
        with self.health_state.lock:
            self.health_state.config_error = error

    def store_loaded(self, seconds: float) -> None:
        now = self._clock()
        self._store_reloads.labels("success").inc()
        self._store_seconds.set(seconds)
        self._store_loaded.set(now)
        with self.health_state.lock:
            self.health_state.store_loaded, self.health_state.store_error = now, None

    def store_failed(self, error: str) -> None:
        self._store_reloads.labels("failure").inc()
        with self.health_state.lock:
            self.health_state.store_error = error

    def counter_failed(self, error: str) -> None:
        self._counter_errors.inc()
        with self.health_state.lock:
            self.health_state.counters_error = error

    def counter_recovered(self) -> None:
        with self.health_state.lock:
            self.health_state.counters_error = None

    def counter_fallback(self) -> None:
        self._counter_fallbacks.inc()

    def probe_blocked(self) -> None:
        self._probe_blocks.inc()

    def auto_hold(self) -> None:
        self._auto_holds.inc()

    # -- reading -------------------------------------------------------------
    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(the registry, its content type): the text format, or OpenMetrics if accepted."""
        encoder, content_type = self.prometheus.exposition.choose_encoder(accept)
        return encoder(self.registry), content_type

    def health(self, snapshot: "Snapshot | None") -> tuple[bool, dict[str, Any]]:
        """(deciding, the /healthz document) for the snapshot in force."""
        return health_report(self.health_state, snapshot)


def health_report(state: HealthState, snapshot: "Snapshot | None") -> tuple[bool, dict[str, Any]]:
    """See "Health" in the module docstring."""
    with state.lock:
        config = {"ok": state.config_error is None, "path": state.config_path,
                  "loaded": _iso(state.config_loaded), "error": state.config_error}
        store_path = snapshot.config.store.shown if snapshot is not None else None
        if store_path is None:
            store = {"ok": True, "path": None, "loaded": None, "error": None}
        else:
            store = {"ok": state.store_error is None, "path": store_path,
                     "loaded": _iso(state.store_loaded), "error": state.store_error}
        counters_url = snapshot.config.counters.shown if snapshot is not None else None
        counters = {"ok": counters_url is None or state.counters_error is None,
                    "url": counters_url,
                    "error": state.counters_error if counters_url is not None else None}
    checker = snapshot.dnsbl if snapshot is not None else None
    zones: dict[str, str] = {}
    if checker is not None:
        disabled = checker.disabled_zones
        zones = {zone.display_name: "disabled" if zone.display_name in disabled else "enabled"
                 for zone in checker.zones}
    dnsbl = {"ok": "disabled" not in zones.values(), "zones": zones}
    ok = config["ok"] and store["ok"] and counters["ok"] and dnsbl["ok"]
    status = "down" if snapshot is None else "ok" if ok else "degraded"
    return status != "down", {"ok": ok, "status": status, "config": config, "store": store,
                              "counters": counters, "dnsbl": dnsbl}


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class SnapshotCollector:
    """Cache statistics and zone health, read from the snapshot at scrape time.

    Cache counters stay monotonic when a reload replaces the cache: the old
    cache's last counts are carried into the totals when the new one is
    first seen.
    """

    def __init__(self, prometheus: Any, snapshot: Callable[[], "Snapshot | None"]) -> None:
        self._families = prometheus.core
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._cache: "LookupCache | None" = None
        self._retired = (0, 0, 0)

    def describe(self) -> Iterator[Any]:
        return iter(self._build((0, 0, 0, 0, 0), {}))

    def collect(self) -> Iterator[Any]:
        snapshot = self._snapshot()
        checker = snapshot.dnsbl if snapshot is not None else None
        zones: dict[str, bool] = {}
        if checker is not None:
            disabled = checker.disabled_zones
            zones = {zone.display_name: zone.display_name not in disabled
                     for zone in checker.zones}
        return iter(self._build(self._cache_totals(checker.cache if checker else None), zones))

    def _cache_totals(self, cache: "LookupCache | None") -> tuple[int, int, int, int, int]:
        with self._lock:
            if cache is not self._cache:
                if self._cache is not None:
                    old = self._cache.stats()
                    hits, misses, coalesced = self._retired
                    self._retired = (hits + old.hits, misses + old.misses,
                                     coalesced + old.coalesced)
                self._cache = cache
            hits, misses, coalesced = self._retired
            if cache is None:
                return hits, misses, coalesced, 0, 0
            stats = cache.stats()
            return (hits + stats.hits, misses + stats.misses, coalesced + stats.coalesced,
                    stats.entries, stats.in_flight)

    def _build(self, cache: tuple[int, int, int, int, int], zones: dict[str, bool]) -> list[Any]:
        counter, gauge = self._families.CounterMetricFamily, self._families.GaugeMetricFamily
        hits, misses, coalesced, entries, in_flight = cache
        families = [
            counter("relaymilter_dns_cache_hits", "DNS answers served from the cache.",
                    value=hits),
            counter("relaymilter_dns_cache_misses", "Cache misses: lookups sent to DNS.",
                    value=misses),
            counter("relaymilter_dns_cache_coalesced",
                    "Lookups that joined an identical lookup in flight.", value=coalesced),
            gauge("relaymilter_dns_cache_entries", "DNS answers in the cache.", value=entries),
            gauge("relaymilter_dns_cache_in_flight", "DNS lookups running.", value=in_flight),
        ]
        enabled = gauge("relaymilter_dnsbl_zone_enabled",
                        "1 when the zone is asked, 0 while a health check disables it.",
                        labels=("zone",))
        for zone, on in zones.items():
            enabled.add_metric((zone,), 1 if on else 0)
        families.append(enabled)
        return families


# --------------------------------------------------------------- listener ---

class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics and GET /healthz; everything else is 404."""

    server: "_Server"
    timeout = 10            # seconds a client may take to send its request
    server_version = f"relaymilter/{__version__}"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        try:
            status, body, content_type = self._page(path)
        except Exception:   # the listener's edge: one bad scrape must not end it
            log.exception("metrics: could not answer GET %s", path)
            status, body, content_type = 500, b"internal error\n", "text/plain; charset=utf-8"
        try:
            self._send(status, body, content_type)
        except OSError:     # the client went away
            pass

    def _page(self, path: str) -> tuple[int, bytes, str]:
        recorder = self.server.recorder
        if path in ("/status", "/api/v1/status", "/api/v1/decisions"):
            return self._status(path)
        if path == "/metrics":
            body, content_type = recorder.exposition(self.headers.get("Accept"))
            return 200, body, content_type
        if path == "/healthz":
            ok, report = recorder.health(self.server.snapshot())
            body = json.dumps(report, indent=1).encode() + b"\n"
            return (200 if ok else 503), body, "application/json"
        return 404, b"not found: try /status, /metrics or /healthz\n", \
            "text/plain; charset=utf-8"

    def _status(self, path: str) -> tuple[int, bytes, str]:
        """The status page and its API (statuspage.py), for those allowed."""
        from relaymilter.statuspage import (Filters, decisions_document, status_document,
                                            status_html)
        snapshot = self.server.snapshot()
        query = urllib.parse.parse_qs(self.path.partition("?")[2], max_num_fields=20)
        refused = self._refused(snapshot, query)
        if refused is not None:
            return 403, refused.encode() + b"\n", "text/plain; charset=utf-8"
        recorder, now = self.server.recorder, time.time()
        filters = Filters.from_query(query)
        if path == "/api/v1/decisions":
            document = decisions_document(recorder, filters)
        else:
            document = status_document(recorder, snapshot, now, self.server.fleet)
        if path == "/status":
            page = status_html(document, decisions_document(recorder, filters))
            return 200, page.encode("utf-8"), "text/html; charset=utf-8"
        return 200, json.dumps(document, indent=1).encode() + b"\n", "application/json"

    def _refused(self, snapshot: "Snapshot | None",
                 query: dict[str, list[str]]) -> str | None:
        from relaymilter.statuspage import access_refused
        token = snapshot.config.metrics.status_token if snapshot is not None else ""
        return access_refused(self.server.server_address[0], token,
                              self.headers.get("Authorization"), (query.get("token") or [None])[0])

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics: %s %s", self.address_string(), format % args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], recorder: PrometheusRecorder,
                 snapshot: Callable[[], "Snapshot | None"]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.recorder = recorder
        self.snapshot = snapshot
        self.fleet: Any = None          # fleettops.FleetTops, with [counters] url
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own asks DNS for the name of the address (getfqdn).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class MetricsListener:
    """The HTTP listener: binds at construction, serves on a daemon thread.

    Threads inherit the signal mask of the thread that starts them: start()
    it after the milter's stop signals are blocked (cli.cmd_run).
    """

    def __init__(self, address: tuple[str, int], recorder: PrometheusRecorder,
                 snapshot: Callable[[], "Snapshot | None"]) -> None:
        host, port = address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._server = _Server(address, recorder, snapshot)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {shown}: {error.strerror or error}") from None
        recorder.watch(snapshot)
        self.port = self._server.server_address[1]
        self.url = f"http://{shown}"
        self._thread: threading.Thread | None = None

    def share_tops(self, url: str, timeout: float) -> None:
        """With [counters] url: the status page's top lists cover the fleet
        (fleettops.py; redis-py only then). Before start()."""
        from relaymilter.fleettops import FleetTops
        self._server.fleet = FleetTops(url, self._server.recorder.activity, timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()
        if self._server.fleet is not None:
            self._server.fleet.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        if self._server.fleet is not None:
            self._server.fleet.stop()
        self._server.server_close()
