"""live - the running configuration: one immutable snapshot, swapped on change.

NAME
    live - owner of the current Snapshot; change detection for reloads

SYNOPSIS
    live = LiveConfig.start(config)     # raises ConfigError on a bad domains file
    snapshot = live.snapshot            # one reference read, never locked
    live.watch(interval=1.0)            # daemon thread: reload on change

DESCRIPTION
    libmilter ends the process on SIGHUP, so reloads are driven by change
    detection: the config file and the local domains file are stat()ed every
    interval; when either changed, a complete new Snapshot is built and the
    single `snapshot` reference is replaced. Readers never see a half-built
    state and need no lock. A reload that fails (bad TOML, bad key, a
    domains file with a bad line, a file that vanished) keeps the running
    snapshot and logs the file, key and reason once per distinct error.

    Keys that only take effect at start (milter.socket, milter.timeout,
    metrics.listen) are reported when they change, and keep their running
    values. Loads, failed reloads and store reads are reported to `metrics`
    (metrics.py), which /healthz reads.

    The per-domain policy (store.py) is part of the snapshot too. The same
    watcher thread owns the store connection (storewatch.py): it polls the
    store's data_version every interval and swaps in a new snapshot with the
    new policy, and it writes the automatic holds the milter threads ask
    for (request_hold), so that one thread owns the connection.

    The DNSBL checker (dnsbl.py) is part of the snapshot. A reload that does
    not change [dnsbl] or [cache] keeps the same checker, cache and all; one
    that changes [dnsbl] only keeps the cache (it holds DNS answers, not
    verdicts). A replaced checker is closed a grace period later, so that
    sessions that started lookups on it can still collect them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, replace

from relaymilter.address import normalise_domain, transitional_variant
from relaymilter.cache import LookupCache
from relaymilter.config import Config, ConfigError, load_config
from relaymilter.dnsbl import DnsblChecker, DnsResolver, HealthMonitor
from relaymilter.limits import RecipientCounter
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.relay import RelayRules
from relaymilter.store import EMPTY_POLICY, PolicySnapshot
from relaymilter.storewatch import StoreWatcher

log = logging.getLogger(__name__)

RESTART_ONLY_KEYS = ("milter.socket", "milter.timeout", "metrics.listen", "policyd.socket",
                     "policyd.socket_mode")


@dataclass(frozen=True)
class Snapshot:
    """Everything a decision reads, frozen together."""

    config: Config
    relay_rules: RelayRules
    local_domain_count: int
    dnsbl: DnsblChecker | None = None     # None: no zones configured
    policy: PolicySnapshot = EMPTY_POLICY


def read_domains_file(path: str) -> list[str]:
    """One domain a line; "#" starts a comment. Raises ConfigError on a bad line."""
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, None, f"cannot read local domains: {error}") from None
    domains = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            RelayRules.build(local_domains=[entry])
        except ValueError as error:
            raise ConfigError(path, f"line {number}", str(error)) from None
        domains.append(entry)
    return domains


def build_dnsbl(config: Config, previous: Snapshot | None = None,
                metrics: Recorder = NO_METRICS) -> DnsblChecker | None:
    """The checker for config, reusing what `previous` has when it may."""
    settings = config.dnsbl
    if not settings.zones:
        return None
    old = previous.dnsbl if previous is not None else None
    same_cache = old is not None and previous.config.cache == config.cache
    if same_cache and previous.config.dnsbl == settings:
        return old
    if same_cache:
        cache = old.cache
    else:
        cache = LookupCache(config.cache.max_entries, config.cache.min_ttl, config.cache.max_ttl)
    try:
        resolver = DnsResolver(settings.nameservers, settings.timeout)
    except Exception as error:   # dnspython: no or unreadable /etc/resolv.conf
        raise ConfigError(config.path, "dnsbl.nameservers",
                          f"no system resolver to use ({error}); name the nameservers") from None
    return DnsblChecker(settings.zones, resolver, cache, timeout=settings.timeout,
                        threshold=settings.threshold, metrics=metrics)


def build_snapshot(config: Config, previous: Snapshot | None = None,
                   metrics: Recorder = NO_METRICS) -> Snapshot:
    """Config + the files it names -> Snapshot. Raises ConfigError."""
    domains = list(config.relay.local_domains)
    if config.relay.local_domains_file:
        domains += read_domains_file(config.relay.local_domains_file)
    _warn_idna_variants(domains)
    rules = RelayRules.build(local_domains=domains,
                             trusted_networks=config.relay.trusted_networks,
                             own_literals=config.relay.local_address_literals,
                             trust_authenticated=config.relay.trust_authenticated)
    same_store = previous is not None and previous.config.store == config.store
    return Snapshot(config=config, relay_rules=rules, local_domain_count=len(domains),
                    dnsbl=build_dnsbl(config, previous, metrics),
                    policy=previous.policy if same_store else EMPTY_POLICY)


def _warn_idna_variants(domains: list[str]) -> None:
    """An MTA using IDNA 2003 reports straße.test as strasse.test: say so."""
    listed = {normalise_domain(domain.lstrip(".")) for domain in domains}
    for domain in sorted(listed):
        variant = transitional_variant(domain)
        if variant and variant not in listed:
            log.warning("local domain %s is %s under IDNA 2003, which Postfix and Sendmail "
                        "use: mail the MTA resolves to %s is refused for untrusted clients "
                        "unless %s is listed too", domain, variant, variant, variant)


def _stamp(path: str | None) -> tuple | None:
    if not path:
        return None
    try:
        status = os.stat(path)
    except OSError:
        return ("missing",)
    return (status.st_ino, status.st_size, status.st_mtime_ns)


def _counter(config: Config) -> RecipientCounter:
    return RecipientCounter(window=config.limits.window,
                            auto_hold_factor=config.limits.auto_hold_factor)


def _watched_paths(config: Config) -> tuple:
    return (config.path, config.relay.local_domains_file)


class LiveConfig:
    """Owns the current Snapshot. Only the watcher thread writes `snapshot`."""

    def __init__(self, snapshot: Snapshot, metrics: Recorder = NO_METRICS):
        self.snapshot = snapshot
        self.metrics = metrics      # metrics.py; NO_METRICS when off
        # The files named by the newest config that parsed, even if it failed
        # to build: creating a missing domains file must trigger a retry.
        self._watched = _watched_paths(snapshot.config)
        self._stamps = tuple(_stamp(path) for path in self._watched)
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._health: HealthMonitor | None = None
        self._checking_health = False
        self.counter = _counter(snapshot.config)
        self._holds: queue.SimpleQueue = queue.SimpleQueue()
        self._store: StoreWatcher | None = None     # the watcher thread's own
        self._store_seen: tuple[str | None, bool] = (None, False)   # by load_policy()
        metrics.config_loaded(snapshot.config.path, reload=False)

    @classmethod
    def start(cls, config: Config, metrics: Recorder = NO_METRICS) -> "LiveConfig":
        return cls(build_snapshot(config, metrics=metrics), metrics)

    def refresh(self) -> bool:
        """Reload if a watched file changed. Returns True when swapped."""
        running = self.snapshot.config
        # Stamps are taken before reading, so a change during the read is
        # seen on the next pass instead of being lost.
        stamps = tuple(_stamp(path) for path in self._watched)
        if stamps == self._stamps:
            return False
        config_stamp = _stamp(running.path)
        try:
            config = load_config(running.path)
        except ConfigError as error:
            self._reload_failed(error, self._watched, stamps)
            return False
        watched = _watched_paths(config)
        stamps = (config_stamp,) + tuple(_stamp(path) for path in watched[1:])
        try:
            config = self._keep_restart_only_keys(running, config)
            snapshot = build_snapshot(config, self.snapshot, self.metrics)
        except ConfigError as error:
            self._reload_failed(error, watched, stamps)
            return False
        self._watched, self._stamps = watched, stamps
        self._last_error = None
        previous, self.snapshot = self.snapshot, snapshot
        if previous.dnsbl is not snapshot.dnsbl:
            self._replace_dnsbl(previous)
        if previous.config.limits != config.limits:
            self.counter = _counter(config)
        self.metrics.config_loaded(config.path, reload=True)
        log.info("configuration reloaded from %s (%d local domains)",
                 config.path, snapshot.local_domain_count)
        return True

    def _reload_failed(self, error: ConfigError, watched: tuple, stamps: tuple) -> None:
        self.metrics.config_failed(str(error))
        if str(error) != self._last_error:
            log.error("reload failed, keeping the running configuration: %s", error)
            self._last_error = str(error)
        # Do not retry the same broken files every second; retry on change.
        self._watched, self._stamps = watched, stamps

    def load_policy(self) -> bool:
        """Read the policy store now, on this thread, with a connection of its own."""
        path = self.snapshot.config.store.path
        if path is None:
            return False
        watcher = StoreWatcher(path, self.metrics)
        try:
            policy = watcher.poll()
        finally:
            watcher.close()
        # The watcher thread's own StoreWatcher starts from what this one saw.
        self._store_seen = (watcher.last_error, watcher.loaded)
        if policy is None:
            return False
        self.snapshot = replace(self.snapshot, policy=policy)
        return True

    def refresh_policy(self) -> bool:
        """Follow the store (watcher thread only). Returns True when swapped."""
        path = self.snapshot.config.store.path
        if self._store is not None and self._store.path != path:
            self._store.close()
            self._store = None
        if path is None:
            if self.snapshot.policy is EMPTY_POLICY:
                return False
            policy = EMPTY_POLICY
        else:
            if self._store is None:
                last_error, loaded = self._store_seen
                self._store = StoreWatcher(path, self.metrics, last_error, loaded)
            policy = self._store.poll()
            if policy is None:
                return False
        self.snapshot = replace(self.snapshot, policy=policy)
        return True

    def request_hold(self, kind: str, value: str, reason: str) -> None:
        """Ask the watcher thread to write a hold (any thread; never blocks)."""
        self._holds.put((kind, value, reason))

    def watch(self, interval: float = 1.0) -> None:
        """Start a daemon thread: reloads, store changes and hold writes."""
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    request = self._holds.get(timeout=interval)
                except queue.Empty:
                    request = None
                if self._stop.is_set():
                    break
                try:
                    if request is not None:
                        self._write_hold(*request)
                    self.refresh()
                    self.refresh_policy()
                except Exception:  # keep watching: a reload bug must not end reloads
                    log.exception("unexpected error while checking for a reload")
            if self._store is not None:
                self._store.close()
        self._thread = threading.Thread(target=loop, name="relaymilter-reload", daemon=True)
        self._thread.start()

    def _write_hold(self, kind: str, value: str, reason: str) -> None:
        path = self.snapshot.config.store.path
        if path is None:
            log.warning("%s %s should be put on hold (%s), but there is no [store] path",
                        kind, value, reason)
            return
        if self._store is None:
            self._store = StoreWatcher(path, self.metrics)
        self._store.put_on_hold(kind, value, reason)

    def check_health(self) -> None:
        """Start the DNSBL health checks (a thread) for this and later checkers."""
        self._checking_health = True
        self._start_health(self.snapshot)

    def stop(self) -> None:
        self._stop.set()
        self._holds.put(None)       # wakes the watcher
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._health is not None:
            self._health.stop(timeout=0)
        if self.snapshot.dnsbl is not None:
            self.snapshot.dnsbl.close()

    def _start_health(self, snapshot: Snapshot) -> None:
        if self._checking_health and snapshot.dnsbl is not None:
            self._health = HealthMonitor(snapshot.dnsbl, snapshot.config.dnsbl.health_interval)
            self._health.start()

    def _replace_dnsbl(self, previous: Snapshot) -> None:
        if self._health is not None:
            self._health.stop(timeout=0)
            self._health = None
        self._start_health(self.snapshot)
        if previous.dnsbl is not None:
            # Sessions may still collect lookups started on the old checker.
            grace = previous.config.dnsbl.timeout + 1.0
            timer = threading.Timer(grace, previous.dnsbl.close)
            timer.daemon = True
            timer.start()

    @staticmethod
    def _keep_restart_only_keys(running: Config, new: Config) -> Config:
        changed = [key for key in RESTART_ONLY_KEYS if running.values[key] != new.values[key]]
        if not changed:
            return new
        log.warning("%s: %s changed; takes effect at the next restart",
                    new.path, ", ".join(changed))
        values = {**new.values, **{key: running.values[key] for key in RESTART_ONLY_KEYS}}
        milter = replace(new.milter, socket=running.milter.socket, timeout=running.milter.timeout)
        return replace(new, milter=milter, metrics=running.metrics, policyd=running.policyd,
                       values=values)
