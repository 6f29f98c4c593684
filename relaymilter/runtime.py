"""runtime - the running daemon's state: the snapshot in force, and who changes it.

NAME
    runtime - Runtime: owner of the current Snapshot and of the watcher thread

SYNOPSIS
    runtime = Runtime.start(config, metrics)   # raises ConfigError
    engine = Engine(runtime)                   # reads runtime.snapshot per answer
    runtime.load_domain_policy()               # the store, read once before serving
    runtime.watch(interval=1.0)                # the watcher thread
    runtime.reload_now()                       # SIGHUP: reload at once, changed or not
    runtime.check_health()                     # DNSBL health checks
    runtime.stop()

DESCRIPTION
    The engine reads one reference, `snapshot`, once per answer; only the
    watcher thread replaces it, with a complete new Snapshot, so readers
    never lock. The jobs that produce new snapshots each have their own
    object, and the watcher thread runs them in turn, every interval or
    when woken by a hold request or by reload_now() (SIGHUP, which also
    reloads a config file that did not change):

      ConfigReloader   (reload.py)       the config file and domains file
      StoreFollower    (storefollow.py)  the domain policy in the store
      HoldQueue        (autohold.py)     automatic holds, written to the store
      DnsblWatch       (dnsblwatch.py)   health checks, retired checkers

    The outbound limits' counter (limits.py, or rediscounter.py with
    [counters] url) is the one piece of mutable state the engine writes; a
    reload that changes [limits] or [counters] starts a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from relaymilter.autohold import HoldQueue, HoldRequest
from relaymilter.config import Config
from relaymilter.decision import PROBING
from relaymilter.dnsblwatch import DnsblWatch
from relaymilter.domainpolicy import DomainPolicy
from relaymilter.engine import Snapshot
from relaymilter.holdnotify import notify
from relaymilter.limits import LimitCounter
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.reload import ConfigReloader, build_snapshot
from relaymilter.storefollow import StoreFollower
from relaymilter.storelocation import is_url

if TYPE_CHECKING:
    from relaymilter.pgnotify import ChangeListener
    from relaymilter.rediscounter import RedisCounter

log = logging.getLogger(__name__)


def _counter(config: Config, metrics: Recorder, hour: float, auto_hold_factor: int,
             on_error: str, counts: str) -> "LimitCounter | RedisCounter":
    """A counter in Redis ([counters] url), else in this process."""
    counters = config.counters
    if counters.url is None:
        return LimitCounter(hour=hour, auto_hold_factor=auto_hold_factor)
    from relaymilter.rediscounter import RedisCounter     # redis-py only when configured
    return RedisCounter(counters.url, hour=hour, auto_hold_factor=auto_hold_factor,
                        timeout=counters.timeout_ms / 1000, on_error=on_error,
                        metrics=metrics, counts=counts)


def _limits_counter(config: Config, metrics: Recorder) -> "LimitCounter | RedisCounter":
    """The outbound limits' counter."""
    limits = config.limits
    return _counter(config, metrics, limits.window, limits.auto_hold_factor,
                    config.counters.on_error, "outbound limits")


def _probe_counter(config: Config, metrics: Recorder) -> "LimitCounter | RedisCounter":
    """The refused relay attempts per client, over [probes] window, beside the
    limits' counts (a fleet counts together). The hold falls due when the
    attempts reach [probes] refusals. Never a 4xx for this count: a Redis
    fault counts here, whatever [counters] on_error says."""
    return _counter(config, metrics, config.probes.window, 1, "local", "relay probes")


class Runtime:
    """See the module docstring. Only the watcher thread writes `snapshot`."""

    def __init__(self, snapshot: Snapshot, metrics: Recorder = NO_METRICS) -> None:
        self.snapshot = snapshot
        self.metrics = metrics      # metrics.py; NO_METRICS when off
        self.counter = _limits_counter(snapshot.config, metrics)
        self.probes = _probe_counter(snapshot.config, metrics)
        self._reloader = ConfigReloader(snapshot.config, metrics)
        self._store = StoreFollower(metrics)
        self._holds = HoldQueue()
        self._dnsbl = DnsblWatch()
        self._stop = threading.Event()
        self._reload_requested = False
        self._thread: threading.Thread | None = None
        self._listener: "ChangeListener | None" = None     # a PostgreSQL store's NOTIFY
        # Set by cli.py in the first of several policy service workers.
        self.workers_counting_apart = 0
        self._warned_limits = False
        metrics.config_loaded(snapshot.config.path, reload=False)

    @classmethod
    def start(cls, config: Config, metrics: Recorder = NO_METRICS) -> "Runtime":
        return cls(build_snapshot(config, metrics=metrics), metrics)

    # -- the jobs, each run by the watcher thread (or a test) ---------------
    def refresh(self, force: bool = False) -> bool:
        """Reload if the config or domains file changed, or always with force.
        True when swapped."""
        snapshot = self._reloader.reload(self.snapshot, force=force)
        if snapshot is None:
            return False
        previous, self.snapshot = self.snapshot, snapshot
        self._dnsbl.follow(previous, snapshot)
        if (previous.config.limits, previous.config.counters) != \
                (snapshot.config.limits, snapshot.config.counters):
            # The old one is left to the collector: a decision may still be using it.
            self.counter = _limits_counter(snapshot.config, self.metrics)
        if (previous.config.probes, previous.config.counters) != \
                (snapshot.config.probes, snapshot.config.counters):
            self.probes = _probe_counter(snapshot.config, self.metrics)
        return True

    def load_domain_policy(self) -> bool:
        """Read the store now, on this thread (before serving). True when read."""
        return self._swap_in(self._store.load(self.snapshot.config.store.location))

    def refresh_domain_policy(self) -> bool:
        """Follow the store (watcher thread only). True when swapped."""
        snapshot = self.snapshot
        return self._swap_in(self._store.poll(snapshot.config.store.location,
                                              snapshot.domain_policy))

    def _swap_in(self, policy: DomainPolicy | None) -> bool:
        if policy is None:
            return False
        self.snapshot = replace(self.snapshot, domain_policy=policy)
        self._warn_limits_counted_apart(policy)
        return True

    def _warn_limits_counted_apart(self, policy: DomainPolicy) -> None:
        """Workers started without limits in the store (cli.py refuses them with)
        count limits added later each for itself: say so, once."""
        config = self.snapshot.config
        workers = self.workers_counting_apart
        if workers > 1 and config.counters.url is None and policy.counts["limits"] \
                and not self._warned_limits:
            self._warned_limits = True
            log.warning("the policy store now holds limits, and %d policy service workers "
                        "count them each for itself ([counters] url is not set): a sender may "
                        "send %d times its limit; set [counters] url or workers = 1",
                        workers, workers)

    def reload_now(self) -> None:
        """Have the watcher thread reload the config and follow the store at
        once, changed or not (SIGHUP). Any thread, and safe in a signal
        handler: it sets a flag and puts on a SimpleQueue, nothing else."""
        self._reload_requested = True
        self._holds.wake()

    def request_hold(self, kind: str, value: str, reason: str) -> None:
        """Ask the watcher thread to write a hold (any thread; never blocks)."""
        self.metrics.auto_hold()
        self._holds.request(kind, value, reason)

    def request_block(self, address: str) -> None:
        """Ask the watcher thread to block a relay prober (any thread; never blocks)."""
        probes = self.snapshot.config.probes
        self.metrics.probe_blocked()
        log.warning("client %s made %d refused relay attempts within %d s: blocking it for "
                    "%d s (relay probing)", address, probes.refusals, probes.window,
                    probes.block_for)
        self._holds.request("client", address, PROBING, scope="all",
                            duration=probes.block_for)

    # -- life cycle ------------------------------------------------------------
    def watch(self, interval: float = 1.0) -> None:
        """Start the watcher thread (a daemon thread)."""
        def loop() -> None:
            while not self._stop.is_set():
                request = self._holds.take(timeout=interval)
                if self._stop.is_set():
                    break
                forced, self._reload_requested = self._reload_requested, False
                try:
                    if request is not None:
                        self._hold(request)
                    if forced:
                        log.info("SIGHUP: reloading the configuration and the domain policy")
                    self.refresh(force=forced)
                    self._listen(self.snapshot.config.store.location)
                    self.refresh_domain_policy()
                except Exception:  # keep watching: a reload bug must not end reloads
                    log.exception("unexpected error while checking for a reload")
            self._listen(None)
            self._store.close()
        self._thread = threading.Thread(target=loop, name="relaymilter-reload", daemon=True)
        self._thread.start()

    def _hold(self, request: HoldRequest) -> None:
        """Write an automatic hold, then run [holds] notify for it (watcher thread)."""
        config = self.snapshot.config
        duration = config.limits.auto_hold_duration if request.duration is None \
            else request.duration
        expires = time.time() + duration if duration > 0 else None
        if self._store.put_on_hold(config.store.location, request, expires) \
                and config.holds.notify is not None:
            notify(config.holds.notify, request, expires)

    def _listen(self, location: str | None) -> None:
        """Wake the watcher on the NOTIFY of a PostgreSQL store at location (watcher
        thread): a listener for it, none for anything else."""
        if self._listener is not None and self._listener.url == location:
            return
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if location is not None and is_url(location):
            from relaymilter.pgnotify import ChangeListener     # psycopg only when used
            self._listener = ChangeListener(location, self._holds.wake)
            self._listener.start()

    def check_health(self) -> None:
        """Start the DNSBL health checks (a thread) for this and later checkers."""
        self._dnsbl.start(self.snapshot)

    def stop(self) -> None:
        self._stop.set()
        self._holds.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._dnsbl.stop(self.snapshot)
