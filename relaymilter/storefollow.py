"""storefollow - the domain policy in force follows the store named by [store].

NAME
    storefollow - StoreFollower: loads, follows and writes the store for the runtime

SYNOPSIS
    follower = StoreFollower(metrics)
    policy = follower.load(config.store.location)     # at start, on the starting thread
    policy = follower.poll(config.store.location, in_force)   # watcher thread: new or None
    follower.put_on_hold(config.store.location, request)
    follower.close()

DESCRIPTION
    Wraps storewatch.StoreWatcher (one store connection, change detection,
    errors logged once) with what a running daemon adds: [store] path may
    change on a reload (the connection to the old store is closed, "no
    store" gives the empty policy), the first load happens on the starting
    thread before the watcher thread exists, and an error already reported
    by that first load is not reported again by the watcher's connection.

    Not thread-safe: load() before the watcher thread starts, everything
    else on that thread.
"""

from __future__ import annotations

import logging
import time

from relaymilter.autohold import HoldRequest
from relaymilter.domainpolicy import EMPTY_POLICY, DomainPolicy
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.storewatch import StoreWatcher

log = logging.getLogger(__name__)


class StoreFollower:
    """See the module docstring."""

    def __init__(self, metrics: Recorder = NO_METRICS) -> None:
        self._metrics = metrics
        self._watcher: StoreWatcher | None = None
        self._seen: tuple[str | None, bool] = (None, False)   # by load(): error, loaded
        self._swept = False     # ended entries removed through this watcher

    def load(self, path: str | None) -> DomainPolicy | None:
        """Read the store now, with a connection of its own; None: no store or unreadable."""
        if path is None:
            return None
        watcher = StoreWatcher(path, self._metrics)
        try:
            policy = watcher.poll()
        finally:
            watcher.close()
        # The watcher thread's own StoreWatcher starts from what this one saw.
        self._seen = (watcher.last_error, watcher.loaded)
        return policy

    def poll(self, path: str | None, in_force: DomainPolicy) -> DomainPolicy | None:
        """The policy to swap in, or None: unchanged (or unreadable: keep the last).

        Once an entry of the policy in force has ended (DomainPolicy.next_expiry),
        delete it from the store, writing its end in the history, and read
        the store again, changed or not: the new policy leaves it out."""
        if path is None:
            self._drop()
            return None if in_force is EMPTY_POLICY else EMPTY_POLICY
        ended = in_force.next_expiry is not None and time.time() >= in_force.next_expiry
        watcher = self._connected(path)
        policy = watcher.poll(force=ended)
        if ended or not self._swept:
            # Also once per connection: entries that ended while no daemon ran.
            self._swept = watcher.remove_ended() or self._swept
        return policy

    def put_on_hold(self, path: str | None, request: HoldRequest,
                    expires: float | None = None) -> bool:
        """Write an automatic hold (ending at expires, unix time, if given); the next
        poll() brings it into force. True when it was written."""
        if path is None:
            log.warning("%s %s should be put on hold (%s), but there is no store "
                        "([store] path or url)", request.kind, request.value, request.reason)
            return False
        return self._connected(path).put_on_hold(request.kind, request.value, request.reason,
                                                 expires, request.scope)

    def close(self) -> None:
        self._drop()

    def _connected(self, path: str) -> StoreWatcher:
        """The watcher of the store at path; one of another path ([store] changed) goes."""
        if self._watcher is not None and self._watcher.path != path:
            self._drop()
        if self._watcher is None:
            last_error, loaded = self._seen
            self._watcher = StoreWatcher(path, self._metrics, last_error, loaded)
            self._swept = False
        return self._watcher

    def _drop(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
