"""storewatch - follows the domain policy store for the running milter.

NAME
    storewatch - change detection and automatic holds for the store

SYNOPSIS
    watcher = StoreWatcher("/var/lib/relaymilter/policy.sqlite3")
    policy = watcher.poll()          # a new DomainPolicy, or None: unchanged
    watcher.put_on_hold("user", "alice", "sent 3 times its limit")
    watcher.close()

DESCRIPTION
    Owned by one thread (the watcher of runtime.py, through
    storefollow.py): a store connection is never shared between threads.
    The store is opened with openstore.open_store(), whatever its backend. poll() is cheap when nothing
    changed: one data_version() (SQLite: `PRAGMA data_version`), which
    moves when another connection (the CLI, an import, this process's hold
    writer) commits. When it moved, the whole store is read into a new
    immutable DomainPolicy.

    A store that cannot be opened or read (missing directory, permissions,
    a corrupt file, a schema newer than this program) keeps the last
    snapshot in force: poll() returns None and logs the reason once per
    distinct error, and the next poll tries again from scratch. Each read
    and each failed poll is reported to the metrics recorder.
"""

from __future__ import annotations

import gc
import logging
import time

from relaymilter.domainpolicy import DomainPolicy
from relaymilter.openstore import open_store
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.store import Storage, StoreError
from relaymilter.storelocation import display_location

log = logging.getLogger(__name__)

AUTO_HOLD_ACTOR = "relaymilter"


class StoreWatcher:
    """See the module docstring. Not thread-safe by design: one owner thread."""

    def __init__(self, path: str, metrics: Recorder = NO_METRICS,
                 last_error: str | None = None, loaded: bool = False) -> None:
        """last_error, loaded: what an earlier watcher of the same store saw,
        so that one error is logged once per process, not once per watcher."""
        self.path = path
        self._shown = display_location(path)       # for logs: no password
        self._metrics = metrics
        self._store: Storage | None = None
        self._version: int | None = None
        self._last_error = last_error
        self._remove_error: str | None = None
        self.loaded = loaded

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def poll(self, force: bool = False) -> DomainPolicy | None:
        """The store's content if it changed since the last poll (or force), else None."""
        if force:
            self._version = None
        try:
            if self._store is None:
                self._store = open_store(self.path)
                self._version = None
            version = self._store.data_version()
            if version == self._version:
                return None
            started = time.monotonic()
            policy = self._store.load_policy()
            self._version = version
            # A store of a million entries is millions of objects that live
            # until the next reload: frozen, the cyclic collector stops
            # walking them on every full collection (pauses of tens of ms in
            # the middle of SMTP sessions). Refcounting still frees them.
            gc.freeze()
        except (StoreError, OSError) as error:
            self._failed(error)
            return None
        if self._last_error is not None:
            log.warning("policy store %s is readable again", self._shown)
            self._last_error = None
        seconds = time.monotonic() - started
        self._metrics.store_loaded(seconds)
        log.info("policy store %s loaded in %.3fs: %s", self._shown, seconds,
                 ", ".join(f"{count} {kind}" for kind, count in policy.counts.items()))
        wide = policy.wide_relay_clients()
        if wide:
            log.warning("policy store %s: relay client %s wider than /8 (IPv4) or /32 (IPv6): "
                        "every client in %s may relay anywhere (an open relay)", self._shown,
                        ", ".join(wide), "them" if len(wide) > 1 else "it")
        self.loaded = True
        return policy

    def put_on_hold(self, kind: str, value: str, reason: str,
                    expires: float | None = None, scope: str = "relay") -> bool:
        """Write an automatic hold (ending at expires, unix time, if given; scope
        "all" blocks the client); the next poll() brings it into force. False
        when it could not be written."""
        try:
            if self._store is None:
                self._store = open_store(self.path)
            self._store.add_hold(kind, value, reason=reason, added_by=AUTO_HOLD_ACTOR,
                                 expires=expires, scope=scope)
            # data_version does not move for this connection's own commits.
            self._version = None
        except (StoreError, OSError) as error:
            log.error("could not put %s %s on hold in %s: %s", kind, value, self._shown,
                      error)
            self._drop()
            return False
        if scope == "all":
            until = "until removed" if expires is None else \
                f"for {expires - time.time():.0f} s"
            log.warning("%s %s blocked %s, every recipient refused: %s", kind, value, until,
                        reason)
        else:
            log.warning("%s %s put on hold: %s", kind, value, reason)
        return True

    def remove_ended(self) -> bool:
        """Delete the entries that have ended, with their "expire" events in the
        history (Storage.remove_ended), through the connection poll() opened
        (none: nothing to do). A store that cannot be written is logged, once
        per distinct error, and left as it is: the ended entries are out of
        force all the same. False when there was no connection to try."""
        if self._store is None:
            return False
        try:
            removed = self._store.remove_ended()
        except (StoreError, OSError) as error:
            text = f"{type(error).__name__}: {error}"
            if text != self._remove_error:
                log.error("could not remove ended entries from %s (they are out of force "
                          "all the same): %s", self._shown, text)
                self._remove_error = text
            return True
        self._remove_error = None
        for section, entry in removed:
            log.info("%s %s ended", section, entry)
        return True

    def close(self) -> None:
        self._drop()

    def _failed(self, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"
        self._metrics.store_failed(text)
        if text != self._last_error:
            keeping = ("keeping the policy last read" if self.loaded else
                       "running without per-domain policy until it can be read "
                       "(does its directory exist, writable by relaymilter?)")
            log.error("policy store %s unreadable, %s: %s", self._shown, keeping, text)
            self._last_error = text
        self._drop()

    def _drop(self) -> None:
        store, self._store, self._version = self._store, None, None
        if store is not None:
            try:
                store.close()
            except StoreError:
                pass        # the connection is dropped either way
