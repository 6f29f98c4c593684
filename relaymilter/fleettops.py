"""fleettops - the status page's top lists for a whole fleet, in Redis.

NAME
    fleettops - FleetTops: each process shares its counts; any reads the fleet's

SYNOPSIS
    tops = FleetTops("redis://counters.example/0", activity)    # [counters] url
    tops.start()                 # every PUBLISH_EVERY seconds: this process's new counts
    tops.tops(now, 10)           # {"refused": [("192.0.2.9", 41), ...], "senders": [...]}
                                 # over the fleet, or None
    tops.stop()

DESCRIPTION
    With [counters] url, the top refused clients and outbound senders of
    the status page cover every process on every host. Each process adds
    what its activity.Activity counted since the last time (drain()) to
    one sorted set per kind and minute, KEY_PREFIX{top}:KIND:MINUTE
    (ZINCRBY in one pipeline, every PUBLISH_EVERY seconds, off the decision
    path: a decision never waits for this), each set expiring after the
    hour it covers. A reader sums the last hour's sets (ZUNION). The hash
    tag puts them all in one Redis Cluster slot.

    Redis down: the counts of that round are lost to the fleet view (each
    process still shows its own), top() answers None and the caller shows
    the local lists; the outage is logged once. The fleet view lags by up
    to PUBLISH_EVERY seconds.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from relaymilter.rediscounter import KEY_PREFIX
from relaymilter.storelocation import display_location

log = logging.getLogger(__name__)

PUBLISH_EVERY = 5.0
MINUTES = 60
KINDS = ("refused", "senders")


def _key(kind: str, minute: int) -> str:
    return f"{KEY_PREFIX}{{top}}:{kind}:{minute}"


class FleetTops:
    """See the module docstring."""

    def __init__(self, url: str, activity: Any, timeout: float = 0.5,
                 every: float = PUBLISH_EVERY) -> None:
        self.shown = display_location(url)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout)
        self._activity = activity
        self._every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        activity.sharing = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="relaymilter-fleet-tops",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.publish()

    def publish(self) -> None:
        """Add this process's new counts to the fleet's sets."""
        pending = self._activity.drain()
        if not pending:
            return
        try:
            with self._client.pipeline(transaction=False) as pipeline:
                for minute, kinds in pending.items():
                    for kind, counts in kinds.items():
                        key = _key(kind, minute)
                        for member, count in counts.items():
                            pipeline.zincrby(key, count, member)
                        pipeline.expire(key, (MINUTES + 5) * 60)
                pipeline.execute()
        except redis.RedisError as error:
            self._failed(error)
            return
        if self._failing:
            self._failing = False
            log.warning("fleet top lists: Redis at %s answers again", self.shown)

    def tops(self, now: float, count: int) -> dict[str, list[tuple[str, int]]] | None:
        """The fleet's top count of each kind over the last hour, in one round
        trip; None when Redis fails."""
        current = int(now // 60) * 60
        try:
            with self._client.pipeline(transaction=False) as pipeline:
                for kind in KINDS:
                    pipeline.zunion([_key(kind, current - 60 * back) for back in range(MINUTES)],
                                    withscores=True)
                summed = pipeline.execute()
        except redis.RedisError as error:
            self._failed(error)
            return None
        return {kind: sorted(((member.decode("utf-8", "replace"), int(score))
                              for member, score in members),
                             key=lambda item: (-item[1], item[0]))[:count]
                for kind, members in zip(KINDS, summed)}

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            log.error("fleet top lists: Redis at %s unavailable, showing this process's own: "
                      "%s: %s", self.shown, type(error).__name__, error)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._client.close()
