"""rediscounter - outbound limits counted in Redis, shared by every process and host.

NAME
    rediscounter - RedisCounter: the fleet's rate counter, with a local fallback

SYNOPSIS
    counter = RedisCounter("redis://counters.example/0", window=3600, auto_hold_factor=3,
                           timeout=0.05, on_error="local", metrics=recorder)
    charge = counter.charge(("user", "alice"), limit=500, instance="4F1A2.6554.0",
                            recipient="bob@example.org")
    counter.status(("user", "alice"))      # {"accepted": 12, "attempts": 12, "resets_in": 3170.2}
    counter.reset(("user", "alice"))       # True: there was a window
    counter.close()

DESCRIPTION
    The same counting as limits.RecipientCounter, kept in Redis so that
    every relaymilter process on every host counts one sender together,
    and a restart of relaymilter forgets nothing:

    Window. A sender's window opens with its first recipient and lasts
    `window` seconds on Redis's clock (the key's expiry): up to `limit`
    recipients are accepted in it, fleet-wide; further ones are refused
    and, with the accepted ones, counted as attempts; when the attempts
    reach auto_hold_factor x limit, hold_due is set once per window. The
    fixed window is the local counter's, so that a fallback counts alike;
    its known cost is that a sender may send `limit` at the end of one
    window and `limit` again at the start of the next.

    One round trip. Check and count are one Lua script (SCRIPT), which
    Redis runs atomically: two hosts never both take the last
    recipient of a limit, so the fleet never accepts more than `limit` in a
    window, and the precision is exact (not "one over per host").

    Asked again. With an instance (Postfix's per-message `instance`
    attribute) and a recipient, the script remembers the answer for
    ASKED_AGAIN_TTL seconds: the same recipient of the same message asked
    again (a client repeating RCPT TO, a second policy check) gets that
    answer and is not counted twice.

    Keys. KEY_PREFIX{kind:value}:w holds a window (a hash: accepted,
    attempts, hold_done) and KEY_PREFIX{kind:value}:r:INSTANCE:RECIPIENT
    an answer already given. The part in braces is a Redis Cluster hash
    tag, so a sender's keys share one slot; "{", "}", ":" and "%" in
    names are %-escaped so that no name can reach another sender's keys.

    Faults. A call waits at most `timeout` seconds (connect and answer).
    An error or a timeout opens the circuit for RETRY_AFTER seconds: the
    next charges go straight to the fallback, a RecipientCounter of this
    process (on_error "local"), or are answered `unavailable`
    (on_error "tempfail": the caller defers the recipient, never a 5xx).
    Then one charge tries Redis again, and a probe thread PINGs it every
    RETRY_AFTER seconds meanwhile (so the health report sees it back even
    when no limited recipient comes). The outage is logged once when it
    starts and once when it ends, and reported to the metrics recorder on
    every charge it touches.

    Thread-safe: redis-py's connection pool is, and the circuit's state is
    under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from typing import Any

import redis

from relaymilter.limits import Charge, RecipientCounter
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.storelocation import display_location

log = logging.getLogger(__name__)

KEY_PREFIX = "relaymilter:"
RETRY_AFTER = 5.0               # seconds the circuit stays open after a fault
ASKED_AGAIN_TTL = 3600          # seconds an answer is remembered for its message

# KEYS[1] the sender's window, KEYS[2] the answer of this recipient of this
# message (KEYS[1] again when there is none).
# ARGV limit, window in ms, auto-hold factor, 1 when KEYS[2] is an answer key,
# its TTL in seconds. Returns allowed (0/1), accepted, attempts, hold_due, the
# window's remaining ms.
SCRIPT = """
local window, limit = KEYS[1], tonumber(ARGV[1])
if ARGV[4] == '1' then
    local given = redis.call('GET', KEYS[2])
    if given then
        local counts = redis.call('HMGET', window, 'accepted', 'attempts')
        return {tonumber(given), tonumber(counts[1]) or 0, tonumber(counts[2]) or 0, 0,
                redis.call('PTTL', window)}
    end
end
if redis.call('EXISTS', window) == 0 then
    redis.call('HSET', window, 'accepted', 0, 'attempts', 0, 'hold_done', 0)
    redis.call('PEXPIRE', window, ARGV[2])
end
local attempts = redis.call('HINCRBY', window, 'attempts', 1)
local accepted = tonumber(redis.call('HGET', window, 'accepted'))
local allowed = 0
if accepted < limit then
    accepted = redis.call('HINCRBY', window, 'accepted', 1)
    allowed = 1
end
local hold_due, factor = 0, tonumber(ARGV[3])
if factor > 0 and attempts >= factor * limit
        and redis.call('HGET', window, 'hold_done') == '0' then
    redis.call('HSET', window, 'hold_done', 1)
    hold_due = 1
end
if ARGV[4] == '1' then
    redis.call('SET', KEYS[2], allowed, 'EX', ARGV[5])
end
return {allowed, accepted, attempts, hold_due, redis.call('PTTL', window)}
"""

UNAVAILABLE = Charge(allowed=False, accepted=0, attempts=0, hold_due=False, unavailable=True)


def _escaped(text: str) -> str:
    return (text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
            .replace(":", "%3A"))


def sender_tag(key: Hashable) -> str:
    """The hash tag of a sender key (kind, value): "{user:alice}"."""
    kind, value = key      # type: ignore[misc]
    return "{" + _escaped(str(kind)) + ":" + _escaped(str(value)) + "}"


class RedisCounter:
    """See the module docstring."""

    def __init__(self, url: str, window: float = 3600.0, auto_hold_factor: int = 0,
                 timeout: float = 0.05, on_error: str = "local",
                 metrics: Recorder = NO_METRICS) -> None:
        self.window = window
        self.auto_hold_factor = auto_hold_factor
        self.shown = display_location(url)
        self._on_error = on_error
        self._metrics = metrics
        self._client = redis.Redis.from_url(url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout,
                                            retry_on_timeout=False)
        self._script = self._client.register_script(SCRIPT)
        self.fallback = RecipientCounter(window=window, auto_hold_factor=auto_hold_factor)
        self._lock = threading.Lock()
        self._open_until = 0.0          # monotonic time the circuit closes again
        self._outage: str | None = None     # the error that opened it, until Redis answers

    def charge(self, key: Hashable, limit: int, instance: str | None = None,
               recipient: str | None = None) -> Charge:
        """Count one recipient for key against limit, fleet-wide (see the module
        docstring); a fault counts in this process or answers UNAVAILABLE."""
        if time.monotonic() < self._open_until:
            return self._fallen_back(key, limit)
        tag = sender_tag(key)
        window_key = KEY_PREFIX + tag + ":w"
        asked_again = bool(instance and recipient)
        answer_key = (f"{KEY_PREFIX}{tag}:r:{_escaped(instance)}:{_escaped(recipient)}"
                      if asked_again else window_key)
        try:
            allowed, accepted, attempts, hold_due, _ = self._script(
                keys=[window_key, answer_key],
                args=[limit, max(1, int(self.window * 1000)), self.auto_hold_factor,
                      int(asked_again), ASKED_AGAIN_TTL])
        except redis.RedisError as error:
            self._failed(error)
            return self._fallen_back(key, limit)
        if self._outage is not None:
            self._recovered()
        return Charge(bool(allowed), int(accepted), int(attempts), bool(hold_due))

    def status(self, key: Hashable) -> dict[str, Any] | None:
        """The sender's open window: accepted, attempts and the seconds until it
        ends; None when it has none. Raises redis.RedisError."""
        window_key = KEY_PREFIX + sender_tag(key) + ":w"
        with self._client.pipeline(transaction=True) as pipeline:
            counts, remaining = pipeline.hgetall(window_key).pttl(window_key).execute()
        if not counts:
            return None
        return {"accepted": int(counts[b"accepted"]), "attempts": int(counts[b"attempts"]),
                "resets_in": max(0, remaining) / 1000}

    def reset(self, key: Hashable) -> bool:
        """End the sender's window now; True when it had one. Raises redis.RedisError."""
        return bool(self._client.delete(KEY_PREFIX + sender_tag(key) + ":w"))

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------ faults ---

    def _fallen_back(self, key: Hashable, limit: int) -> Charge:
        self._metrics.counter_fallback()
        if self._on_error == "tempfail":
            return UNAVAILABLE
        return self.fallback.charge(key, limit)

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self._open_until = time.monotonic() + RETRY_AFTER
            first = self._outage is None
            self._outage = f"{type(error).__name__}: {error}"
        self._metrics.counter_failed(self._outage)
        if first:
            doing = ("counting in this process" if self._on_error == "local"
                     else "deferring limited recipients (on_error = tempfail)")
            log.error("Redis counters at %s unavailable, %s until they answer (retried every "
                      "%.0f s): %s", self.shown, doing, RETRY_AFTER, self._outage)
            threading.Thread(target=self._probe, name="relaymilter-redis-probe",
                             daemon=True).start()

    def _probe(self) -> None:
        """During an outage, PING every RETRY_AFTER seconds, so that the health
        report and the log see Redis back even while no limited recipient comes."""
        while self._outage is not None:
            time.sleep(RETRY_AFTER)
            try:
                self._client.ping()
            except redis.RedisError:
                continue
            with self._lock:
                self._open_until = 0.0
            self._recovered()

    def _recovered(self) -> None:
        with self._lock:
            if self._outage is None:
                return
            self._outage = None
        self._metrics.counter_recovered()
        log.warning("Redis counters at %s answer again: counting fleet-wide", self.shown)
