"""rediscounter - outbound limits counted in Redis, shared by every process and host.

NAME
    rediscounter - RedisCounter: the fleet's limit counter, with a local fallback

SYNOPSIS
    counter = RedisCounter("redis://counters.example/0", hour=3600, auto_hold_factor=3,
                           timeout=0.05, on_error="local", metrics=recorder)
    charge = counter.charge(("user", "alice"), Limit(per_hour=500, messages_per_day=1000),
                            message="4F1A2.6554.0", recipient="bob@example.org")
    counter.status(("user", "alice"))         # {"per_hour": WindowCount(...), ...}
    counter.reset(("user", "alice"))          # True: something was counted
    counter.close()

DESCRIPTION
    The counting of limits.LimitCounter (sliding windows of SLOTS slots,
    recipient and message rates, attempts and the hold that falls due
    once, an answer remembered per message and recipient), kept in Redis
    so that every relaymilter process on every host counts one sender
    together, and a restart of relaymilter forgets nothing. The slots are
    numbered on Redis's clock (TIME), so the hosts' clocks do not matter.

    One round trip. Check and count are one Lua script (SCRIPT), which
    Redis runs atomically: two hosts never both take the last recipient of
    a rate, so the fleet never accepts more than a rate allows, exactly
    (not "one over per host").

    Keys. Under KEY_PREFIX{kind:value}: one hash per rate (":per_hour",
    ...; fields aSLOT and tSLOT, the accepted recipients and attempts of
    a slot), ":m:MESSAGE" the fate of a message (a message rate refused
    it, or not), ":r:MESSAGE:RECIPIENT" an answer already given. The part
    in braces is a Redis Cluster hash tag, so a sender's keys share one
    slot; "{", "}", ":" and "%" in names are %-escaped so that no name can
    reach another sender's keys. Every key expires by itself.

    Faults. A call waits at most `timeout` seconds (connect and answer).
    An error or a timeout opens the circuit for RETRY_AFTER seconds: the
    next charges go straight to the fallback, a LimitCounter of this
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

import redis

from relaymilter.limits import (ANSWER_TTL, RATE_NAMES, RATES, SLOTS, Charge, Limit,
                                LimitCounter, Rate, WindowCount, slot_seconds, window_count)
from relaymilter.recorder import NO_METRICS, Recorder
from relaymilter.storelocation import display_location

log = logging.getLogger(__name__)

KEY_PREFIX = "relaymilter:"
RETRY_AFTER = 5.0               # seconds the circuit stays open after a fault

# KEYS[1] the answer of this recipient of this message, KEYS[2] the
# message's fate (each a key of the sender's that is never written when
# there is none), KEYS[3...] one hash per rate.
# ARGV[1] "1" when KEYS[1] is an answer key, ARGV[2] "1" when KEYS[2] is a
# message key, ARGV[3] the auto-hold factor, ARGV[4] the TTL of answers and
# messages (s), then per rate: its name, "m" for messages or "r", its slot
# length (ms), its count. Returns {allowed 0/1, hold_due 0/1, the rate that
# refused ("" when none)}. The rules are limits.LimitCounter._count's.
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local has_answer, has_message = ARGV[1] == '1', ARGV[2] == '1'
local factor, ttl, slots = tonumber(ARGV[3]), tonumber(ARGV[4]), %(slots)d
if has_answer then
    local given = redis.call('GET', KEYS[1])
    if given then
        if given == '+' then return {1, 0, ''} end
        return {0, 0, given}
    end
end
local seen = false
if has_message then
    local fate = redis.call('GET', KEYS[2])
    if fate then
        if fate ~= '+' then
            if has_answer then redis.call('SET', KEYS[1], fate, 'EX', ttl) end
            return {0, 0, fate}
        end
        seen = true
    end
end
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local involved, exceeded, hold_due = {}, nil, 0
for i = 0, (#ARGV - 4) / 4 - 1 do
    local name, unit = ARGV[5 + 4 * i], ARGV[6 + 4 * i]
    local slot_ms, count = tonumber(ARGV[7 + 4 * i]), tonumber(ARGV[8 + 4 * i])
    if unit == 'r' or not seen then
        local key = KEYS[3 + i]
        local current = math.floor(now_ms / slot_ms)
        local flat = redis.call('HGETALL', key)
        local accepted, attempts, stale = 0, 0, {}
        for j = 1, #flat, 2 do
            local field = flat[j]
            local number = tonumber(string.sub(field, 2))
            if number <= current - slots then
                stale[#stale + 1] = field
            elseif string.sub(field, 1, 1) == 'a' then
                accepted = accepted + tonumber(flat[j + 1])
            else
                attempts = attempts + tonumber(flat[j + 1])
            end
        end
        if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
        if exceeded == nil and accepted >= count then exceeded = name end
        redis.call('HINCRBY', key, 't' .. current, 1)
        redis.call('PEXPIRE', key, slot_ms * (slots + 1))
        local threshold = factor * count
        if threshold > 0 and attempts < threshold and threshold <= attempts + 1 then
            hold_due = 1
        end
        involved[#involved + 1] = {key, current}
    end
end
if exceeded == nil then
    for _, rate in ipairs(involved) do
        redis.call('HINCRBY', rate[1], 'a' .. rate[2], 1)
    end
end
if has_message and not seen and (exceeded == nil or string.sub(exceeded, 1, 8) == 'messages') then
    redis.call('SET', KEYS[2], exceeded or '+', 'EX', ttl)
end
if has_answer then redis.call('SET', KEYS[1], exceeded or '+', 'EX', ttl) end
if exceeded == nil then return {1, hold_due, ''} end
return {0, hold_due, exceeded}
""" % {"slots": SLOTS}

UNAVAILABLE = Charge(allowed=False, unavailable=True)


def _escaped(text: str) -> str:
    return (text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
            .replace(":", "%3A"))


def sender_tag(key: Hashable) -> str:
    """The hash tag of a sender key (kind, value): "{user:alice}"."""
    kind, value = key      # type: ignore[misc]
    return "{" + _escaped(str(kind)) + ":" + _escaped(str(value)) + "}"


class RedisCounter:
    """See the module docstring."""

    def __init__(self, url: str, hour: float = 3600.0, auto_hold_factor: int = 0,
                 timeout: float = 0.05, on_error: str = "local",
                 metrics: Recorder = NO_METRICS, counts: str = "outbound limits") -> None:
        self.hour = hour
        self.counts = counts            # what it counts, for the log: one Redis, two counters
        self.auto_hold_factor = auto_hold_factor
        self.shown = display_location(url)
        self._on_error = on_error
        self._metrics = metrics
        self._client = redis.Redis.from_url(url, socket_timeout=timeout,
                                            socket_connect_timeout=timeout,
                                            retry_on_timeout=False)
        self._script = self._client.register_script(SCRIPT)
        self.fallback = LimitCounter(hour=hour, auto_hold_factor=auto_hold_factor)
        self._lock = threading.Lock()
        self._open_until = 0.0          # monotonic time the circuit closes again
        self._outage: str | None = None     # the error that opened it, until Redis answers

    def _slot_ms(self, rate: Rate) -> int:
        return max(1, round(slot_seconds(self.hour, rate) * 1000))

    def charge(self, key: Hashable, limit: Limit, message: str | None = None,
               recipient: str | None = None) -> Charge:
        """Count one recipient for key against every rate of limit, fleet-wide
        (see the module docstring); a fault counts in this process or answers
        UNAVAILABLE."""
        if time.monotonic() < self._open_until:
            return self._fallen_back(key, limit, message, recipient)
        tag = KEY_PREFIX + sender_tag(key)
        rates = list(limit.rates())
        has_answer = bool(message and recipient)
        keys = [f"{tag}:r:{_escaped(message)}:{_escaped(recipient)}" if has_answer
                else tag + ":r",
                f"{tag}:m:{_escaped(message)}" if message else tag + ":m"]
        args: list = [int(has_answer), int(bool(message)), self.auto_hold_factor,
                      int(ANSWER_TTL)]
        for rate in rates:
            keys.append(f"{tag}:{rate.name}")
            args += [rate.name, "m" if rate.unit == "messages" else "r", self._slot_ms(rate),
                     rate.count]
        try:
            allowed, hold_due, exceeded = self._script(keys=keys, args=args)
        except redis.RedisError as error:
            self._failed(error)
            return self._fallen_back(key, limit, message, recipient)
        if self._outage is not None:
            self._recovered()
        exceeded = exceeded.decode() if isinstance(exceeded, bytes) else exceeded
        return Charge(bool(allowed), bool(hold_due), exceeded or None)

    def status(self, key: Hashable) -> dict[str, WindowCount]:
        """Per rate (by name: "per_hour" ...), what the sender's window holds now,
        on Redis's clock. Raises redis.RedisError."""
        tag = KEY_PREFIX + sender_tag(key)
        rates = [Rate(name, unit, hours, 0) for name, unit, hours in RATES]
        with self._client.pipeline(transaction=True) as pipeline:
            pipeline.time()
            for rate in rates:
                pipeline.hgetall(f"{tag}:{rate.name}")
            (seconds, microseconds), *hashes = pipeline.execute()
        now = seconds + microseconds / 1e6
        counts = {}
        for rate, fields in zip(rates, hashes):
            accepted: dict[int, int] = {}
            attempts: dict[int, int] = {}
            for field, value in fields.items():
                field = field.decode()
                (accepted if field[0] == "a" else attempts)[int(field[1:])] = int(value)
            counts[rate.name] = window_count(accepted, attempts, now,
                                             self._slot_ms(rate) / 1000)
        return counts

    def reset(self, key: Hashable) -> bool:
        """Forget the sender's counts now; True when it had some. Raises
        redis.RedisError."""
        tag = KEY_PREFIX + sender_tag(key)
        return bool(self._client.delete(*(f"{tag}:{name}" for name in RATE_NAMES)))

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------ faults ---

    def _fallen_back(self, key: Hashable, limit: Limit, message: str | None,
                     recipient: str | None) -> Charge:
        self._metrics.counter_fallback()
        if self._on_error == "tempfail":
            return UNAVAILABLE
        return self.fallback.charge(key, limit, message, recipient)

    def _failed(self, error: Exception) -> None:
        with self._lock:
            self._open_until = time.monotonic() + RETRY_AFTER
            first = self._outage is None
            self._outage = f"{type(error).__name__}: {error}"
        self._metrics.counter_failed(self._outage)
        if first:
            doing = ("counting in this process" if self._on_error == "local"
                     else "deferring limited recipients (on_error = tempfail)")
            log.error("Redis counters at %s unavailable (%s), %s until they answer (retried "
                      "every %.0f s): %s", self.shown, self.counts, doing, RETRY_AFTER,
                      self._outage)
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
        log.warning("Redis counters at %s answer again (%s): counting fleet-wide", self.shown,
                    self.counts)
