"""reload - config + the files it names -> a Snapshot, built again when they change.

NAME
    reload - build_snapshot() at start, ConfigReloader for every change after

SYNOPSIS
    snapshot = build_snapshot(config)          # raises ConfigError
    reloader = ConfigReloader(snapshot.config, metrics)
    new = reloader.reload(snapshot)            # None: nothing changed, or a bad change

DESCRIPTION
    Reloads are driven by change detection (libmilter owns the signals of
    the milter process): the config file and the local domains file are
    stat()ed on every call; when either changed, a complete new Snapshot
    (engine.py) is built, which the caller swaps in with one reference.
    Readers never see a half-built state and need no lock. A reload that
    fails (bad TOML, bad key, a domains file with a bad line, a file that
    vanished) returns None, keeps the running snapshot and logs the file,
    key and reason once per distinct error.

    Keys flagged restart-only in the config schema (the sockets, the
    metrics listener) are reported when they change, and keep their
    running values. Loads and failed reloads are reported to the metrics
    recorder, which /healthz reads.

    The DNSBL checker (dnsbl.py) is part of the snapshot. A reload that does
    not change [dnsbl] or [cache] keeps the same checker, cache and all; one
    that changes [dnsbl] only keeps the cache (it holds DNS answers, not
    verdicts). Retiring a replaced checker is dnsblwatch.py's job. The
    domain policy of the previous snapshot is kept while [store] is the
    same; following the store is storefollow.py's job.
"""

from __future__ import annotations

import logging
import os

from relaymilter.address import normalise_domain, transitional_variant
from relaymilter.cache import LookupCache
from relaymilter.config import Config, ConfigError, keep_restart_only, load_config
from relaymilter.dnsbl import DnsblChecker
from relaymilter.dnsclient import DnsResolver
from relaymilter.domainpolicy import EMPTY_POLICY
from relaymilter.engine import Snapshot
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.relay import RelayRules

log = logging.getLogger(__name__)

NO_LOCAL_DOMAINS = ("no local domains ([relay] local_domains and local_domains_file are "
                    "empty): every recipient from an untrusted client is refused as relaying, "
                    "inbound mail included")


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
    if not domains:
        log.warning("%s: %s", config.path, NO_LOCAL_DOMAINS)
    rules = RelayRules.build(local_domains=domains,
                             trusted_networks=config.relay.trusted_networks,
                             own_literals=config.relay.local_address_literals,
                             trust_authenticated=config.relay.trust_authenticated)
    same_store = previous is not None and previous.config.store == config.store
    return Snapshot(config=config, relay_rules=rules, local_domain_count=len(domains),
                    dnsbl=build_dnsbl(config, previous, metrics),
                    domain_policy=previous.domain_policy if same_store else EMPTY_POLICY)


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


def _watched_paths(config: Config) -> tuple:
    return (config.path, config.relay.local_domains_file)


class ConfigReloader:
    """Follows the config file and its local domains file. One owner thread."""

    def __init__(self, config: Config, metrics: Recorder = NO_METRICS) -> None:
        self._metrics = metrics
        # The files named by the newest config that parsed, even if it failed
        # to build: creating a missing domains file must trigger a retry.
        self._watched = _watched_paths(config)
        self._stamps = tuple(_stamp(path) for path in self._watched)
        self._last_error: str | None = None

    def reload(self, running: Snapshot, force: bool = False) -> Snapshot | None:
        """A new Snapshot if a watched file changed (or force: SIGHUP) and the
        change is good, else None."""
        # Stamps are taken before reading, so a change during the read is
        # seen on the next call instead of being lost.
        stamps = tuple(_stamp(path) for path in self._watched)
        if stamps == self._stamps and not force:
            return None
        config_stamp = _stamp(running.config.path)
        try:
            config = load_config(running.config.path)
        except ConfigError as error:
            self._failed(error, self._watched, stamps)
            return None
        watched = _watched_paths(config)
        stamps = (config_stamp,) + tuple(_stamp(path) for path in watched[1:])
        try:
            config, changed = keep_restart_only(running.config, config)
            if changed:
                log.warning("%s: %s changed; takes effect at the next restart",
                            config.path, ", ".join(changed))
            snapshot = build_snapshot(config, running, self._metrics)
        except ConfigError as error:
            self._failed(error, watched, stamps)
            return None
        self._watched, self._stamps = watched, stamps
        self._last_error = None
        self._metrics.config_loaded(config.path, reload=True)
        log.info("configuration reloaded from %s (%d local domains)",
                 config.path, snapshot.local_domain_count)
        return snapshot

    def _failed(self, error: ConfigError, watched: tuple, stamps: tuple) -> None:
        self._metrics.config_failed(str(error))
        if str(error) != self._last_error:
            log.error("reload failed, keeping the running configuration: %s", error)
            self._last_error = str(error)
        # Do not retry the same broken files every second; retry on change.
        self._watched, self._stamps = watched, stamps
